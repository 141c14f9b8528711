"""The picture of benchmarks/handover.py: the kNN monitor (a 300-image kNN on the mnist5k preset) against the
training clock, the mean over seeds per run kind, with the method's 100% run's final monitor level dashed.
The full evaluation (linear probe and a kNN over the whole training split) is in the tables, not here."""
from __future__ import annotations

import statistics
from pathlib import Path

# Run kinds in the order they are drawn, and their colours: the method alone in greys, RELA variants warm.
COLOURS = {"method-100%": "black", "method-budget": "grey", "rela-hard": "tab:red", "rela-linear": "tab:orange",
           "rela-linear-reset": "tab:olive", "rela-rho": "tab:purple", "rela-hard-reset": "tab:pink",
           "rela-throughout": "tab:brown"}


def mean_curve(runs: list[dict], axis: int) -> tuple[list[float], list[float]]:
    """(x, monitor kNN) averaged over seeds point by point (the monitor rows fall on the same steps in every
    seed), as far as the shortest curve goes; x is the training clock (axis 0) or the step (axis 2)."""
    curves = [r["monitor"] for r in runs if r["monitor"]]
    if not curves:
        return [], []
    length = min(len(c) for c in curves)
    xs = [statistics.fmean(c[i][axis] for c in curves) for i in range(length)]
    accuracies = [statistics.fmean(c[i][1] for c in curves) for i in range(length)]
    return xs, accuracies


def plot_handover(result: dict, path: str | Path, title: str) -> Path:
    """Left: the monitor against the step (where the hand-overs happen, load-free). Right: against the training
    clock (bank included, the monitor's own time excluded), which on a shared machine carries its load."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (by_step, by_clock) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    kinds = [k for k in COLOURS if any(r["run"] == k for r in result["runs"])]
    full = [r["monitor"][-1][1] for r in result["runs"] if r["run"] == "method-100%" and r["monitor"]]
    for ax, axis, label in ((by_step, 2, "step"), (by_clock, 0, "training clock (s, bank included, monitor excluded)")):
        for kind in kinds:
            xs, accuracies = mean_curve([r for r in result["runs"] if r["run"] == kind], axis)
            if xs:
                ax.plot(xs, accuracies, color=COLOURS[kind], label=kind, lw=2 if kind.startswith("rela") else 1.5)
        if full:
            ax.axhline(statistics.fmean(full), color="black", ls="--", lw=1, label="method-100% final (monitor)")
        ax.set_xlabel(label)
        ax.set_ylabel("monitor kNN top-1 (%), mean over seeds")
    by_step.set_xscale("log")
    by_clock.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
