"""The picture of benchmarks/throughput.py. Left, the claim: the kNN monitor's accuracy against the training
clock, one thin line per seed, one colour per (run kind, budget), the SSL method's 100% run's target and each group's median
time to reach it. Right: final accuracy against wall-clock, one point per run."""
from __future__ import annotations

from pathlib import Path


def group_colours(groups: list[tuple[str, float | None]]) -> dict:
    """BYOL in greys/blacks (100% darkest), RELA in warm colours, RELA transfer in greens, untrained grey:
    the eye finds the method by hue and the budget by shade."""
    import matplotlib.pyplot as plt

    maps = {"byol": "Greys", "rela": "autumn_r", "rela-transfer": "Greens"}
    colours = {}
    for method, cmap in maps.items():
        budgets = sorted(b for m, b in groups if m == method)
        for i, budget in enumerate(budgets):
            shade = 0.45 + 0.5 * (i + 1) / len(budgets)
            colours[(method, budget)] = plt.get_cmap(cmap)(shade)
    colours[("untrained", None)] = (0.6, 0.6, 0.6, 1.0)
    return colours


def plot_time_to_accuracy(runs: list[dict], summary: list[dict], ttt: dict, path: str | Path, title: str = "",
                          tolerance_pp: float = 1.0) -> Path:
    """runs, summary, ttt: throughput.py's end-to-end rows, per-group summary and time-to-target.
    Left: monitor kNN (%) against training_clock_s (the run's clock, bank included, without the monitor's
    own time); a dashed line per run, the target as a horizontal line, a marker at each group's median time
    to the target. Right: final linear-probe (filled) and kNN (hollow) accuracy against wall-clock, seeds small,
    means large, the method's 100% run's linear-probe mean down to `tolerance_pp` below it as a band."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    groups = [(r["method"], r["budget"]) for r in summary]
    reference = next(r for r in summary if (r["method"], r["budget"]) == ("byol", 1.0))  # the method alone, 100%
    colours = group_colours(groups)
    fig, (curve_ax, final_ax) = plt.subplots(1, 2, figsize=(14, 5.5), width_ratios=(1.6, 1), constrained_layout=True)

    target = ttt.get("target_knn_top1")
    for row in summary:
        group = (row["method"], row["budget"])
        if row["method"] == "untrained":
            continue
        colour = colours[group]
        lw = 2.2 if group == ("byol", 1.0) else 1.4
        for r in runs:
            if (r["method"], r["budget"]) != group or not r["monitor"]:
                continue
            xs, ys = [p[0] for p in r["monitor"]], [p[1] for p in r["monitor"]]
            curve_ax.plot(xs, ys, color=colour, lw=lw, alpha=0.75, marker=".", ms=4)
        reached = f"{row['reached_target']}/{row['seeds']}"
        label = (f"{row['group']}: target at {row['time_to_target_s']:.0f}s ({reached})"
                 if row["time_to_target_s"] is not None else f"{row['group']}: target not reached ({reached})")
        curve_ax.plot([], [], color=colour, lw=lw, label=label)
        if row["time_to_target_s"] is not None and target is not None:
            curve_ax.plot([row["time_to_target_s"]], [target], marker="v", ms=11, color=colour, mec="black",
                          zorder=5)
            curve_ax.axvline(row["time_to_target_s"], color=colour, lw=0.8, ls=":", alpha=0.9)
    if target is not None:
        curve_ax.axhline(target, color="black", lw=1, ls="--")
        curve_ax.annotate(f"target {target:.1f}% ({reference['group']} final - {ttt['target_drop_pp']:g})",
                          xy=(1, target), xycoords=("axes fraction", "data"), xytext=(-4, 4),
                          textcoords="offset points", ha="right", va="bottom", fontsize=8)
        points = [p[1] for r in runs for p in r["monitor"]] + [target]
        finals = [p[1] for r in runs for p in r["monitor"][-1:]] + [target]
        # The first points of slow runs can sit far below; the race is near the target.
        curve_ax.set_ylim(max(min(points), min(finals) - 15) - 1, max(points) + 1)
    curve_ax.set_xlim(left=0)
    curve_ax.set_xlabel("training clock (s): target bank + training, without the kNN monitor's own time")
    curve_ax.set_ylabel("kNN monitor top-1 (%)")
    curve_ax.set_title("time to accuracy (one line per seed; \u25bc median time to the target)", fontsize=10)
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=8, loc="best", framealpha=0.9)

    mean = reference["linear_probe_top1"]
    final_ax.axhspan(mean - tolerance_pp, mean, color="black", alpha=0.08, lw=0)
    final_ax.axhline(mean, color="black", ls="--", lw=1)
    for row in summary:
        colour = colours[(row["method"], row["budget"])]
        for key, fill in (("linear_probe_top1", True), ("knn_top1", False)):
            xs, ys = row["wall_clock_s_per_seed"], row[key + "_per_seed"]
            face = colour if fill else "none"
            final_ax.scatter(xs, ys, s=16, alpha=0.6, facecolors=face, edgecolors=colour)
            final_ax.scatter([row["wall_clock_s"]], [row[key]], s=80, marker="D" if row["method"] == "byol" else "o",
                             facecolors=face, edgecolors="black" if fill else colour, linewidths=1.2,
                             label=row["group"] if fill else None)
    final_ax.scatter([], [], s=60, facecolors="white", edgecolors="black", label="hollow: kNN; filled: linear")
    final_ax.set_xlabel("wall-clock per run (s), bank and evaluation included")
    final_ax.set_ylabel("final top-1 (%)")
    final_ax.set_title(f"final accuracy (band: {reference['group']} linear probe - {tolerance_pp:g})", fontsize=10)
    final_ax.set_xlim(left=0)
    final_ax.margins(0.1)
    final_ax.grid(alpha=0.3)
    final_ax.legend(fontsize=7, loc="best", framealpha=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
