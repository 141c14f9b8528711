"""curves.png: a run at a glance, drawn from its own files (metrics.jsonl, summary.json, config.json).

Six panels: the loss of each phase (RELA's 1 - cos and the SSL method's, each on its own axis), rho against
its threshold, learning rate and EMA momentum, images/s and the data-wait fraction, the kNN monitor against
wall-clock, and the run's numbers. The switch from RELA to the SSL method is a dashed line in every panel
that has the step (or the time) on its axis. `python -m rela.plots RUN_DIR` draws it again for a finished run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RELA_COLOR, SSL_COLOR, SWITCH_COLOR = "tab:orange", "tab:blue", "0.35"


def write_curves(run_dir: str | Path) -> Path:
    """Draws RUN/curves.png from RUN/metrics.jsonl (and summary.json, config.json when present)."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: no display, whatever backend the user set
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = _read_json(run_dir / "summary.json")
    cfg = _read_json(run_dir / "config.json")
    train = [r for r in rows if "loss" in r]
    monitor = [r for r in rows if "monitor_knn_top1" in r]
    switch = next((r for r in rows if "rela_phase_end_step" in r), None)
    switch_step = switch["rela_phase_end_step"] if switch else None
    switch_clock = switch.get("wall_clock_s") if switch else None
    method = (cfg.get("method") or "ssl").upper() if cfg else "SSL"

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    fig.suptitle(_title(run_dir, cfg, summary), fontsize=13)

    def mark_switch(ax, x=switch_step, start=0):
        """The RELA phase shaded, the switch a dashed line."""
        if x is not None:
            ax.axvspan(start, x, color=RELA_COLOR, alpha=0.08, linewidth=0)
            ax.axvline(x, color=SWITCH_COLOR, linestyle="--", linewidth=1.2,
                       label=f"switch to {method} (step {switch_step})")

    # 1. loss per phase: the two losses have different scales, so each has its own axis and colour
    ax = axes[0, 0]
    rela_rows = [r for r in train if r.get("phase") == "rela"]
    ssl_rows = [r for r in train if r.get("phase") != "rela"]
    lines = []
    if rela_rows:
        lines += ax.plot(_col(rela_rows, "step"), _col(rela_rows, "loss"), color=RELA_COLOR, label="RELA loss (1 - cos)")
        ax.set_ylabel("RELA loss", color=RELA_COLOR)
        ax.tick_params(axis="y", colors=RELA_COLOR)
    if ssl_rows:
        ssl_ax = ax.twinx() if rela_rows else ax
        lines += ssl_ax.plot(_col(ssl_rows, "step"), _col(ssl_rows, "loss"), color=SSL_COLOR, label=f"{method} loss")
        ssl_ax.set_ylabel(f"{method} loss", color=SSL_COLOR)
        ssl_ax.tick_params(axis="y", colors=SSL_COLOR)
    mark_switch(ax)
    for loss_ax in {line.axes for line in lines}:  # headroom: the legend sits above the curves
        low, high = loss_ax.get_ylim()
        loss_ax.set_ylim(low, high + 0.3 * (high - low))
    lines += [h for h in ax.get_legend_handles_labels()[0] if h not in lines]
    ax.legend(handles=lines, loc="upper right", fontsize=8)
    _finish(ax, "loss per phase", "step")

    # 2. rho and its threshold: the adaptive rule ends RELA when rho reaches the threshold
    ax = axes[0, 1]
    if rela_rows and any("rho" in r for r in rela_rows):
        steps, rho = _col(rela_rows, "step"), _col(rela_rows, "rho")
        ax.plot(steps, rho, color=RELA_COLOR, marker=".", label="rho (RELA phase)")
        threshold = rela_rows[-1].get("rela_threshold", cfg.get("rela_threshold") if cfg else None)
        if threshold is not None:
            ax.axhline(threshold, color="tab:red", linestyle=":", label=f"threshold {threshold:g}")
        mark_switch(ax)
        low = min(rho + ([threshold] if threshold is not None else []))
        ax.set_ylim(max(0.0, low - 0.1 * (1.0 - low) - 1e-3), 1.0 + 0.05 * (1.0 - low) + 1e-4)
        ax.legend(loc="lower right", fontsize=8)
        if threshold is not None and threshold < 1:
            _zoom_on_threshold(ax, steps, rho, threshold, switch_step)
    else:
        _empty(ax, "no RELA phase (--prior none)")
    _finish(ax, "rho = exp(-max(slow - fast, 0))", "step")

    # 3. learning rate and EMA momentum
    ax = axes[0, 2]
    lines = ax.plot(_col(train, "step"), _col(train, "lr"), color="tab:green", label="learning rate")
    ax.set_ylabel("learning rate", color="tab:green")
    ax.tick_params(axis="y", colors="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if any("momentum" in r for r in train):
        mom_ax = ax.twinx()
        lines += mom_ax.plot(_col(train, "step"), _col(train, "momentum"), color="tab:purple", label="EMA momentum")
        mom_ax.set_ylabel("EMA momentum", color="tab:purple")
        mom_ax.tick_params(axis="y", colors="tab:purple")
    mark_switch(ax)
    ax.legend(handles=lines + ax.get_legend_handles_labels()[0][len(lines):], loc="center right", fontsize=8)
    _finish(ax, "schedules", "step")

    # 4. images/s and the fraction of time spent waiting for data
    ax = axes[1, 0]
    lines = ax.plot(_col(train, "step"), _col(train, "images_per_s"), color="tab:cyan", label="images/s")
    ax.set_ylabel("images/s", color="tab:cyan")
    ax.tick_params(axis="y", colors="tab:cyan")
    ax.set_ylim(bottom=0)
    if any("data_wait_fraction" in r for r in train):
        wait_ax = ax.twinx()
        lines += wait_ax.plot(_col(train, "step"), [100 * v for v in _col(train, "data_wait_fraction")],
                              color="tab:brown", alpha=0.7, label="waiting for data (%)")
        wait_ax.set_ylabel("waiting for data (%)", color="tab:brown")
        wait_ax.tick_params(axis="y", colors="tab:brown")
        wait_ax.set_ylim(0, 100)
    mark_switch(ax)
    ax.legend(handles=lines + ax.get_legend_handles_labels()[0][len(lines):], loc="lower right", fontsize=8)
    _finish(ax, "throughput", "step")

    # 5. kNN monitor against wall-clock
    ax = axes[1, 1]
    if monitor:
        ax.plot(_col(monitor, "wall_clock_s"), _col(monitor, "monitor_knn_top1"), color="tab:red", marker="o",
                label="kNN top-1 (monitor subsets)")
        mark_switch(ax, switch_clock, start=monitor[0].get("wall_clock_s", 0))
        ax.set_ylabel("kNN top-1 (%)")
        ax.legend(loc="lower right", fontsize=8)
    else:
        _empty(ax, "kNN monitor off (--no-monitor)")
    _finish(ax, "kNN monitor", "wall-clock (s, target bank included)")

    # 6. the run's numbers
    ax = axes[1, 2]
    ax.axis("off")
    ax.text(0.0, 1.0, _numbers(summary, switch), va="top", ha="left", family="monospace", fontsize=11,
            transform=ax.transAxes)

    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_curves_logged(run_dir: Path, log) -> Path | None:
    """write_curves for the end of a run: a plotting error is logged (one line), never raised."""
    try:
        path = write_curves(run_dir)
    except Exception as err:  # noqa: BLE001 - the picture is a convenience; the run's results stand without it
        log.info(f"curves.png not written: {type(err).__name__}: {err}")
        return None
    log.info(f"curves: {path}")
    return path


def _zoom_on_threshold(ax, steps: list, rho: list, threshold: float, switch_step) -> None:
    """Near the threshold (0.995 by default) rho and the line are a pixel apart at the panel's scale: an inset
    shows the band just below the threshold, where the adaptive rule decides."""
    band = 4 * (1.0 - threshold)
    near = [(s, r) for s, r in zip(steps, rho) if r >= threshold - band]
    if len(near) < 2:
        return
    inset = ax.inset_axes([0.38, 0.3, 0.57, 0.38])
    inset.plot([s for s, _ in near], [r for _, r in near], color=RELA_COLOR, marker=".")
    inset.axhline(threshold, color="tab:red", linestyle=":")
    if switch_step is not None:
        inset.axvline(switch_step, color=SWITCH_COLOR, linestyle="--", linewidth=1.2)
    inset.set_ylim(threshold - band, min(1.0, threshold + band / 2))
    inset.set_title("zoom: the last steps before the threshold", fontsize=8)
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _col(rows: list[dict], key: str) -> list:
    return [r.get(key, float("nan")) for r in rows]


def _finish(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _title(run_dir: Path, cfg: dict, summary: dict) -> str:
    if not cfg:
        return run_dir.name
    return (f"{run_dir.name}: {cfg.get('dataset')}, {cfg.get('arch')}, prior {cfg.get('prior')}, "
            f"budget {cfg.get('budget')}, {cfg.get('method', 'byol')}, seed {cfg.get('seed')}")


def _numbers(summary: dict, switch: dict | None) -> str:
    def fmt(key, unit="", digits=2):
        value = summary.get(key)
        return "-" if value is None else f"{value:.{digits}f}{unit}"

    lines = ["results (summary.json)", "",
             f"linear probe top-1  {fmt('linear_probe_top1', '%')}",
             f"kNN top-1           {fmt('knn_top1', '%')}",
             f"probe protocol      {summary.get('probe_protocol', '-')}",
             f"steps               {summary.get('train_steps', '-')}",
             f"images seen         {summary.get('images_seen', '-')}",
             f"wall-clock          {fmt('wall_clock_s', ' s', 1)}",
             f"  target bank       {fmt('target_bank_s', ' s', 1)}",
             f"  kNN monitor       {fmt('monitor_s', ' s', 1)}",
             ""]
    if switch is not None:
        lines.append(f"RELA ended at step {switch['rela_phase_end_step']} ({switch.get('rela_phase_ended_by')})")
    elif summary.get("rela_phase_ended_by"):
        lines.append(f"RELA ended at step {summary.get('rela_phase_end_step')} ({summary['rela_phase_ended_by']})")
    else:
        lines.append("no RELA phase")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m rela.plots RUN_DIR")
    print(write_curves(sys.argv[1]))
