"""Which hand-over keeps what RELA teaches? RELA at a budget with each hand-over (rela.train --handover ...),
against the method alone at 100% and at the same budget, seed by seed.

    python benchmarks/handover.py --method byol [--recipe project|reference] [--seeds 3] [--budget 0.2]
        [--variants hard linear rho ...] [--out benchmarks/results --name handover-cpu-mnist5k-byol]

Per seed (seeds outermost): the method at 100% and at --budget, RELA at --budget with each variant, RELA
throughout (--rela-phase 1.0), and the untrained backbone, which for --prior rand is also the prior's own
features probed (the rand prior is the student's initial network). Per variant: final linear probe and kNN,
mean ± std, and the deltas to the method at 100% and at the budget, paired by seed, with 95% t-intervals; the
kNN monitor's curve of every run (the time-to-accuracy plot: benchmarks/handover_plot.py). A variant is a
default candidate only where it wins on seeds it was not chosen on; this script reports, it does not choose.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput_runs import interval_text, mean_std, paired_interval, trained_row, untrained_row  # noqa: E402
from benchmarks.timing import environment, write_json  # noqa: E402
from rela.config import METHOD_NAMES  # noqa: E402
from rela.options import resolve_config  # noqa: E402
from rela.train import evaluate_untrained, run  # noqa: E402
from rela.utils.device import pick_device  # noqa: E402

# Each variant's rela.train options over the RELA run's (--prior, --budget), each hand-over option spelled out so
# that a variant means the same run whatever the defaults and the recipe are.
VARIANTS: dict[str, dict] = {
    "hard": {"handover": "hard", "handover_teacher_reset": False},
    "linear": {"handover": "linear", "handover_teacher_reset": False},
    "linear-reset": {"handover": "linear", "handover_teacher_reset": True},
    "rho": {"handover": "rho", "handover_teacher_reset": False},
    "hard-reset": {"handover": "hard", "handover_teacher_reset": True},
    "throughout": {"rela_phase": "1.0"},
}
REFERENCES = ("method-100%", "method-budget")


def plan(variants: list[str]) -> list[tuple[str, dict]]:
    """One seed's runs: (name, options over the base)."""
    return [("method-100%", {"prior": "none", "budget": 1.0}), ("method-budget", {"prior": "none"})] + \
        [(f"rela-{v}", VARIANTS[v]) for v in variants] + [("untrained", {})]


def run_all(base: dict, variants: list[str], seeds: list[int], work: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        for name, options in plan(variants):
            tag = f"{name}-seed{seed}"
            cfg = resolve_config({**base, **({"prior": "rand"} if name.startswith("rela") else {}), **options,
                                  "seed": seed, "out": str(work / tag), "bank_dir": str(work / "banks" / tag),
                                  "progress": False})
            start, load_before = time.time(), os.getloadavg()[0]
            with open(work / f"{tag}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                result = evaluate_untrained(cfg) if name == "untrained" else run(cfg)
            row = untrained_row(result) if name == "untrained" else trained_row(result, Path(cfg.out), "rela")
            # Other work on a shared machine shows here: the 1-minute load around the run (wall-clock is only
            # comparable between runs at similar load).
            rows.append({"run": name, "seed": seed, "options": options, **row, "load_1min_before": load_before,
                         "load_1min_after": os.getloadavg()[0]})
            print(f"  {tag}: linear {row['linear_probe_top1']:.2f} kNN {row['knn_top1']:.2f}, hand-over at "
                  f"{row['rela_phase_end_step']}, {time.time() - start:.0f}s", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per run kind: mean ± std over seeds, and the paired deltas to the method at 100% and at the budget."""
    by_kind: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_kind.setdefault(r["run"], {})[r["seed"]] = r
    table = []
    for kind, per_seed in by_kind.items():
        seeds = sorted(per_seed)
        entry = {"run": kind, "seeds": seeds}
        for key in ("linear_probe_top1", "knn_top1", "wall_clock_s"):
            values = [per_seed[s][key] for s in seeds]
            entry[key], entry[key + "_std"] = mean_std(values)
            entry[key + "_per_seed"] = values
        entry["rela_phase_end_step_per_seed"] = [per_seed[s]["rela_phase_end_step"] for s in seeds]
        for reference in REFERENCES:
            if kind == reference or reference not in by_kind:
                continue
            for key, short in (("linear_probe_top1", "linear"), ("knn_top1", "knn")):
                deltas = [per_seed[s][key] - by_kind[reference][s][key] for s in seeds if s in by_kind[reference]]
                entry[f"{short}_delta_vs_{reference}"] = statistics.fmean(deltas)
                entry[f"{short}_delta_vs_{reference}_ci95"] = paired_interval(deltas)
        table.append(entry)
    return table


def verdict_word(interval: list[float] | None, tolerance_pp: float) -> str:
    """Does a paired interval of (RELA - the method at 100%) say RELA reaches it within `tolerance_pp`?
    "reaches" only where the whole interval lies above -tolerance, "does not reach" where it lies below,
    "undecided" where it covers both (or there is one seed)."""
    if interval is None:
        return "undecided (1 seed)"
    if interval[0] >= -tolerance_pp:
        return "reaches"
    if interval[1] < -tolerance_pp:
        return "does not reach"
    return "undecided"


def verdicts(table: list[dict], tolerance_pp: float) -> list[str]:
    """Per RELA variant and metric: `verdict_word` on its paired interval against the method at 100%."""
    lines = []
    for entry in table:
        if not entry["run"].startswith("rela-"):
            continue
        for short, label in (("linear", "linear"), ("knn", "kNN")):
            interval = entry.get(f"{short}_delta_vs_method-100%_ci95")
            delta = entry[f"{short}_delta_vs_method-100%"]
            lines.append(f"{entry['run']} {label}: {verdict_word(interval, tolerance_pp)} the method at 100% within "
                         f"{tolerance_pp:g} points (delta {delta:+.2f}, 95% paired CI {interval_text(interval)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHOD_NAMES, default="byol")
    parser.add_argument("--recipe", choices=("project", "reference"), default="project")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds FIRST..FIRST+SEEDS-1 (held-out seeds for a variant chosen on others)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the dataset preset's")
    parser.add_argument("--arch", default=None, help="default: the dataset preset's")
    parser.add_argument("--image-size", type=int, default=None, help="default: the dataset preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the dataset preset's")
    parser.add_argument("--probe-epochs", type=int, default=None, help="default: the dataset preset's")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tolerance-pp", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write OUT/NAME.json")
    parser.add_argument("--name", default=None, help="default: handover-DEVICE-DATASET-METHOD[-reference]")
    args = parser.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    base = {"dataset": args.dataset, "method": args.method, "recipe": args.recipe, "budget": args.budget}
    for name in ("epochs", "arch", "image_size", "batch_size", "probe_epochs"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    started = time.time()
    env = environment(pick_device(resolve_config(base).device))  # the commit whose code these runs run
    with tempfile.TemporaryDirectory(prefix="rela-handover-") as tmp:
        rows = run_all(base, args.variants, list(range(args.first_seed, args.first_seed + args.seeds)), Path(tmp))
    table = summarise(rows)
    lines = verdicts(table, args.tolerance_pp)
    result = {"benchmark": "handover", "environment": env, "args": {k: str(v) if isinstance(v, Path) else v
                                                                     for k, v in vars(args).items()},
              "base": base, "variants": {v: VARIANTS[v] for v in args.variants}, "runs": rows, "summary": table,
              "verdicts": lines, "seconds": time.time() - started,
              "notes": ["untrained: the backbone at its initialisation, which --prior rand also is (the prior's own "
                        "features probed)",
                        "monitor: [training_clock_s, monitor kNN top-1 (a 300-image kNN), step] per monitor row"]}
    for line in lines:
        print(line)
    if args.out is not None:
        name = args.name or f"handover-{env['device_type']}-{args.dataset}-{args.method}" + (
            "-reference" if args.recipe == "reference" else "")
        write_json(args.out / f"{name}.json", result)
        print(f"wrote {args.out / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
