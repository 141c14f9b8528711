"""The picture of benchmarks/throughput.py: accuracy against wall-clock, one point per end-to-end run."""
from __future__ import annotations

from pathlib import Path


def plot_accuracy_vs_wall_clock(runs: list[dict], path: str | Path, title: str = "", tolerance_pp: float = 1.0
                                ) -> Path:
    """runs: throughput.py's end-to-end rows (method, budget, seed, wall_clock_s, linear_probe_top1,
    knn_top1). Small markers are seeds, large ones the mean over seeds; linear probe left, kNN right.
    The band is BYOL-100%'s mean accuracy down to `tolerance_pp` points below it."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, key, name in zip(axes, ("linear_probe_top1", "knn_top1"), ("linear-probe top-1 (%)", "kNN top-1 (%)")):
        for i, ((method, budget), rs) in enumerate(groups.items()):
            label = f"{'BYOL' if method == 'byol' else 'RELA'} {100 * budget:g}%"
            xs, ys = [r["wall_clock_s"] for r in rs], [r[key] for r in rs]
            ax.scatter(xs, ys, s=18, alpha=0.5, color=colours(i))
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=90, marker="D" if method == "byol" else "o",
                       color=colours(i), edgecolor="black", label=label)
            if method == "byol" and budget == 1.0:
                mean = sum(ys) / len(ys)
                ax.axhspan(mean - tolerance_pp, mean, color=colours(i), alpha=0.12, lw=0)
                ax.axhline(mean, color=colours(i), ls="--", lw=1)
        ax.set_xlabel("wall-clock per run (s), target bank and evaluation included")
        ax.set_ylabel(name)
        ax.margins(0.15)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(f"Accuracy against wall-clock: {title}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
