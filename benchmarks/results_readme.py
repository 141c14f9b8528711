"""The README's measured results, regenerated from the committed JSON under benchmarks/results/: every number
in the section between the README's results markers comes from a file named beside it.

    python benchmarks/results_readme.py            # rewrite the section (and the hand-over pictures)
    python benchmarks/results_readme.py --check    # exit 1 if README.md is not what the JSON gives

Per (method, recipe) with a hand-over JSON (benchmarks/handover.py): the runs' final linear probe and kNN,
the deltas to the method alone at 100% and at the same budget paired by seed with their 95% t-intervals,
the hand-over steps and the wall-clock; then, plainly, where RELA at the budget reaches the 100% run and
where it does not (a verdict says "reaches" only where the whole interval lies above -tolerance).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.handover import verdict_word  # noqa: E402
from benchmarks.throughput_runs import median_time, paired_interval, time_to_target  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin (python benchmarks/results_readme.py) -->", "<!-- results:end -->"

METHOD_LABELS = {"byol": "BYOL", "dino": "DINO", "simclr": "SimCLR", "mocov3": "MoCo v3", "barlowtwins": "Barlow Twins",
                 "vicreg": "VICReg", "simsiam": "SimSiam", "supervised": "Supervised"}
METHOD_ORDER = tuple(METHOD_LABELS)
VARIANT_LABELS = {"hard": "hard hand-over (the reference's)", "linear": "linear hand-over",
                  "linear-reset": "linear hand-over + teacher reset (the default)", "rho": "rho-driven hand-over",
                  "hard-reset": "hard hand-over + teacher reset", "throughout": "RELA throughout (--rela-phase 1.0)"}


def run_label(kind: str, method: str, budget: float) -> str:
    name = METHOD_LABELS[method]
    if kind == "method-100%":
        return f"{name} alone, 100%"
    if kind == "method-budget":
        return f"{name} alone, {budget:.0%}"
    if kind == "untrained":
        return "untrained backbone (= the rand prior's own features)"
    return f"RELA + {name}, {budget:.0%}, {VARIANT_LABELS.get(kind.removeprefix('rela-'), kind)}"


def delta_text(entry: dict, short: str, reference: str) -> str:
    key = f"{short}_delta_vs_{reference}"
    if key not in entry:
        return "–"
    interval = entry.get(key + "_ci95")
    ci = "" if interval is None else f" [{interval[0]:+.2f}, {interval[1]:+.2f}]"
    return f"{entry[key]:+.2f}{ci}"


def accuracy_text(entry: dict, key: str) -> str:
    seeds = ", ".join(f"{v:.1f}" for v in entry[key + "_per_seed"])
    return f"{entry[key]:.2f} ± {entry[key + '_std']:.2f} ({seeds})"


def seeds_text(seeds: list[int], args: dict) -> str:
    """'3 seeds', or 'seeds 3-5, held out' for a run on seeds other than the ones the variants were chosen on."""
    if not args.get("first_seed"):
        return f"{len(seeds)} seeds"
    return f"seeds {min(seeds)}-{max(seeds)}, held out"


def hand_over_text(entry: dict, runs: list[dict]) -> str:
    """The step each seed's RELA phase ended at; "none" where it lasted the whole run (the rule did not fire)."""
    if entry["run"] in ("method-100%", "method-budget", "untrained"):
        return "–"
    ended = [(r["rela_phase_end_step"], r["rela_phase_ended_by"]) for r in sorted(runs, key=lambda r: r["seed"])
             if r["run"] == entry["run"]]
    return ", ".join("none" if by in (None, "end of training") else str(step) for step, by in ended)


def command_of(result: dict) -> str:
    args = result["args"]
    parts = ["python benchmarks/handover.py", f"--method {args['method']}"]
    if args["recipe"] != "project":
        parts.append(f"--recipe {args['recipe']}")
    if args.get("first_seed"):
        parts.append(f"--first-seed {args['first_seed']}")
    if args.get("threads"):
        parts.append(f"--threads {args['threads']}")
    parts += [f"--seeds {args['seeds']}", f"--budget {args['budget']:g}", "--variants " + " ".join(args["variants"])]
    return " ".join(parts)


def monitor_times(result: dict) -> tuple[float, dict[str, list[float | None]], dict[str, float]]:
    """The kNN monitor's target (the method at 100%: its mean final monitor value minus 1 point), each run
    kind's per-seed training clock to reach it (None: never), and each kind's mean final monitor value."""
    by_kind: dict[str, list[dict]] = {}
    for run in result["runs"]:
        by_kind.setdefault(run["run"], []).append(run)
    final = {kind: statistics.fmean(r["monitor"][-1][1] for r in runs if r["monitor"]) for kind, runs in by_kind.items()
             if any(r["monitor"] for r in runs)}
    target = final["method-100%"] - 1.0
    times = {kind: [time_to_target(r["monitor"], target) for r in runs] for kind, runs in by_kind.items()}
    return target, times, final


def monitor_agreement_text(result: dict) -> str:
    """How the kNN monitor's final value compares with the full kNN evaluation over the file's trained runs: the
    gap (full minus monitor) and Spearman's rank correlation."""
    pairs = [(r["monitor"][-1][1], r["knn_top1"]) for r in result["runs"] if r["run"] != "untrained" and r["monitor"]]
    if len(pairs) < 3:
        return ""
    monitor, full = [p[0] for p in pairs], [p[1] for p in pairs]
    gaps = [f - m for m, f in pairs]
    spearman = float(spearmanr(monitor, full).statistic) if len(set(monitor)) > 1 and len(set(full)) > 1 else None
    if spearman is None:  # one of the two is constant: no rank correlation
        return ""
    return (f" Over this file's {len(pairs)} trained runs the full kNN lies {statistics.fmean(gaps):+.1f} points from "
            f"the monitor's final value ({min(gaps):+.1f} to {max(gaps):+.1f}), and the two rank the runs with "
            f"Spearman's rho {spearman:.2f}.")


def load_text(result: dict) -> str:
    """The machine's 1-minute load around the runs, where the JSON has it: wall-clock compares only at like load."""
    loads = [r[key] for r in result["runs"] for key in ("load_1min_before", "load_1min_after") if key in r]
    if not loads:
        return ""
    return (f", at a 1-minute load of {min(loads):.1f}-{max(loads):.1f} on the 2 cores (other work shared the machine; "
            "compare clocks only between runs at like load)")


def time_text(times: list[float | None]) -> str:
    """The median over seeds (a seed that never reached the target counts as never), and how many reached it."""
    reached = sum(t is not None for t in times)
    median = median_time(times)
    return f"{'never' if median is None else f'{median:.0f} s'} ({reached}/{len(times)})"


def section_for(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    env, args = result["environment"], result["args"]
    method, budget = args["method"], args["budget"]
    summary = {entry["run"]: entry for entry in result["summary"]}
    full = summary["method-100%"]
    picture = path.with_suffix(".png")
    target, times, finals = monitor_times(result)
    lines = [f"#### {METHOD_LABELS[method]}, the {args['recipe']} recipe, {args['dataset']}, {seeds_text(full['seeds'], args)}",
             "",
             f"`{path.relative_to(REPO)}`: `{command_of(result)}`, on {environment_text(env)}. Deltas are paired by "
             f"seed; wall-clock includes the target bank and the evaluation{load_text(result)}.",
             "",
             "| run | hand-over at step | linear probe | Δ vs 100% [95% CI] | Δ vs same budget | kNN | Δ vs 100% "
             f"[95% CI] | Δ vs same budget | monitor kNN, final | monitor to {target:.1f}% | wall-clock |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in result["summary"]:
        ratio = entry["wall_clock_s"] / full["wall_clock_s"]
        clock = "–" if entry["run"] == "untrained" else f"{entry['wall_clock_s']:.0f} s ({ratio:.2f}x)"
        lines.append(" | ".join([
            f"| {run_label(entry['run'], method, budget)}", hand_over_text(entry, result["runs"]),
            accuracy_text(entry, "linear_probe_top1"), delta_text(entry, "linear", "method-100%"),
            delta_text(entry, "linear", "method-budget"), accuracy_text(entry, "knn_top1"),
            delta_text(entry, "knn", "method-100%"), delta_text(entry, "knn", "method-budget"),
            "–" if entry["run"] == "untrained" else f"{finals[entry['run']]:.1f}",
            "–" if entry["run"] == "untrained" else time_text(times[entry["run"]]), clock]) + " |")
    if picture.exists():
        lines += ["", f"![{path.stem}]({picture.relative_to(REPO)})"]
    lines += ["", "The monitor columns and the picture are the kNN monitor: 300 training images as memory, 150 "
                  "queries, every 50 steps, read during training (its time excluded from the clock), a cheap proxy; "
                  "the kNN column is the full evaluation (every training image as memory, the whole validation "
                  "split), and the two can disagree. The monitor target is the method at 100%'s mean final monitor "
                  "value minus 1 point; its column gives the median training clock over seeds to reach it."
              + monitor_agreement_text(result)]
    return lines + [""]


def environment_text(env: dict) -> str:
    return f"{env['device']}, commit {env['commit'][:7]}, {env['date'][:10]}, torch {env['versions']['torch']}"


def method_steps_section(path: Path) -> list[str]:
    """Each method's own step against the RELA-phase step on its networks (benchmarks/throughput.py)."""
    result = json.loads(path.read_text())
    rows = result["step"]["methods"]
    lines = ["#### Each method's step against the RELA-phase step", "",
             f"`{path.relative_to(REPO)}`: `python benchmarks/throughput.py --dataset {result['args']['dataset']} --skip "
             f"{' '.join(result['args']['skip'])}`, on {environment_text(result['environment'])}: images/s, the median "
             f"of {result['args']['step_rounds']} interleaved rounds, the pure-torch ops (the fused ones need a GPU).", "",
             "| method | own step | RELA-phase step | RELA / method |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {METHOD_LABELS[row['method']]} | {row['method_images_per_s']:.0f} | "
                     f"{row['rela_images_per_s']:.0f} | {row['rela_over_method']:.2f} |")
    return lines + [""]


def verdict_cell(entry: dict, short: str, reference: str, tolerance_pp: float) -> str:
    key = f"{short}_delta_vs_{reference}"
    word = verdict_word(entry.get(key + "_ci95"), tolerance_pp)
    return f"{word} ({delta_text(entry, short, reference)})"


def paired_deltas(runs: list[dict], kind: str, reference: str, key: str) -> list[float]:
    """kind's `key` minus reference's, seed by seed, over the seeds both ran."""
    theirs = {r["seed"]: r[key] for r in runs if r["run"] == reference}
    return [r[key] - theirs[r["seed"]] for r in runs if r["run"] == kind and r["seed"] in theirs]


def paired_text(runs: list[dict], kind: str, reference: str, key: str) -> str:
    """The mean difference kind - reference over the seeds both ran, with its 95% paired t-interval."""
    deltas = paired_deltas(runs, kind, reference, key)
    if kind == reference or not deltas:
        return "–"
    interval = paired_interval(deltas)
    ci = "" if interval is None else f" [{interval[0]:+.2f}, {interval[1]:+.2f}]"
    return f"{statistics.fmean(deltas):+.2f}{ci}"


def summary_table(paths: list[Path]) -> list[str]:
    """One row per (method, recipe, RELA variant): does RELA at the budget reach the method at 100%, and how
    far is it from the method alone at the same budget."""
    lines = ["| method | recipe | RELA run (20%) | linear vs 100% | kNN vs 100% | linear vs the method at 20% | kNN vs "
             "the method at 20% | linear vs the hard hand-over | kNN vs the hard hand-over |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        result = json.loads(path.read_text())
        args = result["args"]
        for entry in result["summary"]:
            if not entry["run"].startswith("rela-"):
                continue
            lines.append(" | ".join([
                f"| {METHOD_LABELS[args['method']]}", args["recipe"],
                VARIANT_LABELS.get(entry["run"].removeprefix("rela-"), entry["run"]),
                verdict_cell(entry, "linear", "method-100%", args["tolerance_pp"]),
                verdict_cell(entry, "knn", "method-100%", args["tolerance_pp"]),
                delta_text(entry, "linear", "method-budget"), delta_text(entry, "knn", "method-budget"),
                paired_text(result["runs"], entry["run"], "rela-hard", "linear_probe_top1"),
                paired_text(result["runs"], entry["run"], "rela-hard", "knn_top1")]) + " |")
    return lines + [""]


def plain_lines(paths: list[Path]) -> list[str]:
    """Per (method, recipe), in words: which RELA runs reach the 100% run by the whole interval, which beat the
    method alone at 20% (interval above 0), and the best variant by kNN against the hard hand-over."""
    lines = []
    for path in paths:
        result = json.loads(path.read_text())
        args, runs = result["args"], result["runs"]
        name = METHOD_LABELS[args["method"]]
        rela = [e for e in result["summary"] if e["run"].startswith("rela-")]
        reached = []
        for e in rela:
            metrics = [short for short, key in (("linear", "linear"), ("kNN", "knn"))
                       if verdict_word(e.get(f"{key}_delta_vs_method-100%_ci95"), args["tolerance_pp"]) == "reaches"]
            if metrics:
                reached.append(f"{VARIANT_LABELS.get(e['run'][5:], e['run'])} ({' and '.join(metrics)})")
        beat = [e for e in rela if (e.get("knn_delta_vs_method-budget_ci95") or [0])[0] > 0]
        seeds = sorted({r["seed"] for r in runs})
        text = (f"- **{name}, {args['recipe']} recipe, {seeds_text(seeds, args)}:** RELA at {args['budget']:.0%} "
                f"reaches {name} at 100% by the whole interval "
                f"{'with ' + '; '.join(reached) if reached else 'in none of its runs'}; its kNN is above {name} "
                f"alone at {args['budget']:.0%} (interval above 0) in {len(beat)} of {len(rela)} RELA runs.")
        others = [e for e in rela if e["run"] != "rela-hard"]
        if others and any(r["run"] == "rela-hard" for r in runs):
            best = max(others, key=lambda e: statistics.fmean(paired_deltas(runs, e["run"], "rela-hard", "knn_top1")))
            text += (f" Against the hard hand-over, the best other run by kNN is the "
                     f"{VARIANT_LABELS.get(best['run'][5:], best['run'])}: "
                     f"{paired_text(runs, best['run'], 'rela-hard', 'knn_top1')} kNN, "
                     f"{paired_text(runs, best['run'], 'rela-hard', 'linear_probe_top1')} linear.")
        if all(r["rela_phase_ended_by"] == "end of training" for r in runs if r["run"].startswith("rela-")):
            text += (" The adaptive rule did not fire within any of these runs: the hard hand-over never switched "
                     "(RELA throughout), and a rho blend never reached lambda 0.")
        lines.append(text)
    return lines + [""]


def handover_files() -> list[Path]:
    def order(path: Path) -> tuple[int, int, int]:
        result = json.loads(path.read_text())
        args = result["args"]
        return (args["recipe"] != "project", METHOD_ORDER.index(args["method"]), args.get("first_seed") or 0)
    return sorted(RESULTS.glob("handover-*.json"), key=order)


def render() -> str:
    lines = [BEGIN, "", "### Measured: does RELA at 20% reach the method at 100%? (generated from JSON)", "",
             "Every number below is read from the JSON file named above its table by "
             "`python benchmarks/results_readme.py`, which writes this section; `--check` fails where the README and "
             "the JSON disagree (a test runs it). CPU figures, measured on this project's 2-core machine; no GPU "
             "figure appears here.", ""]
    paths = handover_files()
    if paths:
        lines += ["Where RELA at 20% reaches the method at 100%, per method and recipe: \"reaches\" only where the "
                  "whole 95% paired interval of the difference lies above -1 point, \"does not reach\" where it lies "
                  "below, \"undecided\" where it covers both; differences in points, [95% CI]. The tables after it "
                  "give every run.", ""]
        lines += plain_lines(paths)
        lines += summary_table(paths)
    for path in paths:
        lines += section_for(path)
    steps = RESULTS / "throughput-cpu-mnist5k-method-steps.json"
    if steps.exists():
        lines += method_steps_section(steps)
    return "\n".join(lines + [END])


def replace_section(readme: str, section: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no results markers ({BEGIN} ... {END})")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + section + tail


def draw_pictures() -> None:
    from benchmarks.handover_plot import plot_handover

    for path in handover_files():
        result = json.loads(path.read_text())
        seeds = sorted({run["seed"] for run in result["runs"]})
        args = result["args"]
        label = f"{METHOD_LABELS[args['method']]}, {args['recipe']} recipe, {seeds_text(seeds, args)}"
        plot_handover(result, path.with_suffix(".png"), f"kNN monitor against the step and the training clock: {label}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from what the JSON gives")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    readme = args.readme.read_text()
    if args.check:
        wanted = replace_section(readme, render())
        if wanted != readme:
            print(f"{args.readme}: the results section differs from the JSON; run python benchmarks/results_readme.py")
            return 1
        return 0
    draw_pictures()  # before render(): the section links the pictures that exist
    args.readme.write_text(replace_section(readme, render()))
    print(f"rewrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
