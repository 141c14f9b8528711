"""Part 3 of benchmarks/throughput.py: does RELA reach the SSL method's accuracy in less wall-clock?

rela.train.run per seed (seeds outermost, after an untimed warm-up run) for the method at 100% and at each
reduced budget, RELA at each budget, RELA from a transfer prior, and the untrained backbone
(rela.train.evaluate_untrained); per (method, budget) the mean ± std over seeds, the deltas to the 100% run
paired by seed with their 95% t-interval, the time to a monitor-kNN target, and the headline: the claim,
tested as stated.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rela.config import Config
from rela.options import resolve_config
from rela.train import evaluate_untrained, run


@dataclass(frozen=True)
class PlannedRun:
    """One run of the end-to-end plan. method: byol | rela | rela-transfer | untrained (budget None)."""
    method: str
    prior: str
    budget: float | None

    @property
    def group(self) -> tuple[str, float | None]:
        return self.method, self.budget


METHOD_LABELS = {"byol": "BYOL", "rela": "RELA", "rela-transfer": "RELA transfer", "untrained": "untrained"}
# --method's display names. The plan's run kinds keep their names whatever the method: "byol" is the SSL
# method alone (BYOL unless --method says otherwise), "rela" is RELA handing over to it.
SSL_LABELS = {"byol": "BYOL", "dino": "DINO", "simclr": "SimCLR", "mocov3": "MoCo v3", "barlowtwins": "Barlow Twins",
              "vicreg": "VICReg", "simsiam": "SimSiam", "supervised": "Supervised"}


def kind_labels(ssl: str = "byol") -> dict[str, str]:
    """Each run kind's display name when the SSL method is `ssl`."""
    if ssl == "byol":
        return METHOD_LABELS
    name = SSL_LABELS[ssl]
    return {"byol": name, "rela": f"RELA+{name}", "rela-transfer": f"RELA+{name} transfer", "untrained": "untrained"}


def plan_runs(prior: str, budgets: list[float], transfer_prior: str | None) -> list[PlannedRun]:
    """One seed's runs: BYOL-100% (the reference), BYOL at each reduced budget (does RELA add anything over
    simply training less?), RELA at each budget, RELA from a prior trained elsewhere, and the untrained
    backbone (what any learning is measured from)."""
    reduced = sorted(b for b in budgets if b < 1.0)
    plan = [PlannedRun("byol", "none", 1.0)] + [PlannedRun("byol", "none", b) for b in reduced]
    plan += [PlannedRun("rela", prior, b) for b in sorted(budgets)]
    if transfer_prior is not None:
        plan += [PlannedRun("rela-transfer", transfer_prior, b) for b in sorted(budgets)]
    return plan + [PlannedRun("untrained", "none", None)]


def group_label(method: str, budget: float | None, ssl: str = "byol") -> str:
    return kind_labels(ssl)[method] + ("" if budget is None else f" {budget_label(budget)}")


def run_name(planned: PlannedRun, seed: int, ssl: str = "byol") -> str:
    budget = "" if planned.budget is None else f"-{budget_label(planned.budget)}"
    kind = planned.method if ssl == "byol" else planned.method.replace("byol", ssl)
    return f"{kind}{budget}-seed{seed}"


def monitor_curve(run_dir: Path) -> list[list[float]]:
    """[training_clock_s, monitor_knn_top1, step] per kNN-monitor row of the run's metrics.jsonl."""
    curve = []
    with open(run_dir / "metrics.jsonl") as rows:
        for line in rows:
            row = json.loads(line)
            if "monitor_knn_top1" in row:
                curve.append([row["training_clock_s"], row["monitor_knn_top1"], row["step"]])
    return curve


def end_to_end(base: dict, *, prior: str, budgets: list[float], seeds: int, work_dir: Path,
               transfer_prior: str | None = None) -> list[dict]:
    """Every planned run for each seed, seeds outermost so that load drift on a shared machine hits every
    method alike. Each run gets an empty bank folder, so a bank's build is counted in its wall-clock."""
    def run_config(name: str, **options) -> Config:
        return resolve_config({**base, **options, "out": str(work_dir / "runs" / name),
                               "bank_dir": str(work_dir / "banks" / name), "progress": False})

    def quietly(name: str, fn, cfg: Config) -> dict | None:
        log_path = work_dir / "runs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return fn(cfg)

    # Untimed: the first run in a process pays for lazy imports and kernel set-up, which would land on
    # whichever method went first.
    quietly("warm-up", run, run_config("warm-up", prior=prior, budget=min(budgets), epochs=1, stop_after_steps=2))
    runs = []
    for seed in range(seeds):
        for planned in plan_runs(prior, budgets, transfer_prior):
            name = run_name(planned, seed, base.get("method", "byol"))
            load_before = os.getloadavg()[0]
            if planned.method == "untrained":
                row = untrained_row(quietly(name, evaluate_untrained, run_config(name, seed=seed)))
            else:
                cfg = run_config(name, prior=planned.prior, budget=planned.budget, seed=seed)
                row = trained_row(quietly(name, run, cfg), Path(cfg.out), planned.method)
            row = {"run": name, "method": planned.method, "budget": planned.budget, "seed": seed,
                   "prior": planned.prior, **row,
                   # Other work on a shared machine shows here first: the 1-minute load around the run.
                   "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}
            runs.append(row)
            print(f"  {name}: {row['wall_clock_s']:.1f}s (training clock {row['training_clock_s']:.1f}s, bank "
                  f"{row['target_bank_s']:.1f}s), {row['train_steps']} steps, {row['images_seen']} images, linear "
                  f"probe {row['linear_probe_top1']:.2f}%, kNN {row['knn_top1']:.2f}%", flush=True)
    return runs


def trained_row(summary: dict, run_dir: Path, method: str) -> dict:
    end = summary["rela_phase_end_step"]
    return {"wall_clock_s": summary["wall_clock_s"],
            # the run without its kNN monitor: bank, training and evaluation
            "training_clock_s": summary["wall_clock_s"] - summary["monitor_s"], "monitor_s": summary["monitor_s"],
            "target_bank_s": summary["target_bank_s"], "eval_s": summary.get("eval_s"),
            "train_steps": summary["train_steps"], "images_seen": summary["images_seen"],
            "rela_phase_end_step": end, "rela_phase_ended_by": summary.get("rela_phase_ended_by"),
            # Steps spent in the RELA phase: all of them when the phase never ended.
            "rela_phase_fraction": 0.0 if method == "byol" else (1.0 if end is None else end / summary["train_steps"]),
            "linear_probe_top1": summary["linear_probe_top1"], "knn_top1": summary["knn_top1"],
            "linear_probe_top1_std": summary.get("linear_probe_top1_std"),
            "probe_protocol": summary.get("probe_protocol"), "monitor": monitor_curve(run_dir)}


def untrained_row(results: dict) -> dict:
    """The untrained backbone's wall-clock is its evaluation alone (eval_s), which every trained run's
    wall-clock also holds: no bank, no training step, no monitor."""
    return {"wall_clock_s": results["eval_s"], "training_clock_s": results["eval_s"], "monitor_s": 0.0,
            "target_bank_s": 0.0, "eval_s": results["eval_s"], "train_steps": 0, "images_seen": 0,
            "rela_phase_end_step": None, "rela_phase_ended_by": None, "rela_phase_fraction": 0.0,
            "linear_probe_top1": results["linear_probe_top1"], "knn_top1": results["knn_top1"],
            "linear_probe_top1_std": results.get("linear_probe_top1_std"),
            "probe_protocol": results.get("probe_protocol"), "monitor": []}


def budget_label(budget: float) -> str:
    return f"{100 * budget:g}%"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_interval(deltas: list[float], level: float = 0.95) -> list[float] | None:
    """The t-interval of the mean of paired differences (n-1 degrees of freedom); None for one pair."""
    if len(deltas) < 2:
        return None
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency of the package

    mean, std = mean_std(deltas)
    half = t.ppf(0.5 + level / 2, len(deltas) - 1) * std / math.sqrt(len(deltas))
    return [float(mean - half), float(mean + half)]


def interval_text(interval: list[float] | None) -> str:
    return "n/a (1 seed)" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def time_to_target(curve: list[list[float]], target: float) -> float | None:
    """The first training clock (s) at which the monitor's kNN reached the target; None when it never did.
    The monitor runs at epoch ends (or every --monitor-every steps), so this is the first such point."""
    return next((clock for clock, accuracy, _ in curve if accuracy >= target), None)


def median_time(times: list[float | None]) -> float | None:
    """The median over seeds, a seed that never reached the target counting as infinitely slow: None when
    half or more never did."""
    median = statistics.median([math.inf if t is None else t for t in times])
    return None if math.isinf(median) else median


def summarise_runs(runs: list[dict], target_drop_pp: float, ssl: str = "byol") -> tuple[list[dict], dict]:
    """Per (method, budget): the mean and std over seeds and every seed's number; the difference to
    BYOL-100% paired by seed with its mean and 95% t-interval; the wall-clock ratio; the time to reach
    BYOL-100%'s mean final monitor kNN minus `target_drop_pp` points. Returns (groups, time-to-target)."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    reference = groups[("byol", 1.0)]
    reference_by_seed = {r["seed"]: r for r in reference}
    finals = [r["monitor"][-1][1] for r in reference if r["monitor"]]
    target = statistics.fmean(finals) - target_drop_pp if finals else None
    for r in runs:
        r["time_to_target_s"] = None if target is None else time_to_target(r["monitor"], target)
    reference_time = median_time([r["time_to_target_s"] for r in reference])
    table = []
    for (method, budget), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"group": group_label(method, budget, ssl), "method": method, "budget": budget, "prior": rs[0]["prior"],
               "seeds": len(rs), "seed_ids": [r["seed"] for r in rs]}
        for key in ("linear_probe_top1", "knn_top1", "wall_clock_s", "training_clock_s"):
            values = [r[key] for r in rs]
            row[key], row[key + "_std"] = mean_std(values)
            row[key + "_per_seed"] = values
        for key in ("target_bank_s", "train_steps", "images_seen", "rela_phase_fraction"):
            row[key] = statistics.fmean(r[key] for r in rs)
        row["wall_clock_s_median"] = statistics.median(row["wall_clock_s_per_seed"])
        for key, short in (("linear_probe_top1", "linear"), ("knn_top1", "knn")):
            deltas = [r[key] - reference_by_seed[r["seed"]][key] for r in rs]
            row[f"{short}_delta_per_seed"] = deltas
            row[f"{short}_delta"] = statistics.fmean(deltas)
            row[f"{short}_delta_ci95"] = paired_interval(deltas)
        ratios = [r["wall_clock_s"] / reference_by_seed[r["seed"]]["wall_clock_s"] for r in rs]
        row["wall_clock_ratio_per_seed"] = ratios
        row["wall_clock_ratio"] = row["wall_clock_s"] / statistics.fmean(r["wall_clock_s"] for r in reference)
        # Robust to one run slowed by other work on a shared machine; equal to the above when runs agree.
        row["wall_clock_ratio_of_medians"] = row["wall_clock_s_median"] / statistics.median(
            r["wall_clock_s"] for r in reference)
        times = [r["time_to_target_s"] for r in rs]
        row["time_to_target_s_per_seed"] = times
        row["time_to_target_s"] = None if method == "untrained" else median_time(times)
        row["reached_target"] = sum(t is not None for t in times)
        row["time_to_target_ratio"] = (None if row["time_to_target_s"] is None or not reference_time
                                       else row["time_to_target_s"] / reference_time)
        table.append(row)
    order = {"byol": 0, "rela": 1, "rela-transfer": 2, "untrained": 3}
    table.sort(key=lambda row: (order[row["method"]], -(row["budget"] or 0.0)))
    return table, {"target_knn_top1": target, "target_drop_pp": target_drop_pp,
                   "target_source": f"{kind_labels(ssl)['byol']}-100%'s mean final monitor kNN over {len(finals)} seed(s) minus "
                                    f"{target_drop_pp:g} points",
                   "reference_time_s": reference_time,
                   "clock": "training_clock_s: the run's clock (target bank included) without the monitor's time"}


def wall_clock_spread_warning(table: list[dict]) -> str | None:
    """A run whose wall-clock strays far from its seeds' median was most likely slowed by other work."""
    trained = [r for r in table if r["method"] != "untrained"]
    spread = max(r["wall_clock_s_std"] / r["wall_clock_s_median"] for r in trained)
    if spread < 0.25:
        return None
    worst = max(trained, key=lambda r: r["wall_clock_s_std"] / r["wall_clock_s_median"])
    return (f"warning: {worst['group']}'s wall-clock varies by {100 * spread:.0f}% (std/median) over seeds, most "
            f"likely other work on the machine (see load_1min_before/after per run); compare "
            f"wall_clock_ratio_of_medians")


def headline(table: list[dict], ttt: dict, tolerance_pp: float, claim_budget: float = 0.2, ssl: str = "byol"
             ) -> list[str]:
    """The claim, tested as stated: RELA at `claim_budget` within `tolerance_pp` points of BYOL-100% at under
    half its wall-clock; in linear probe, kNN and time-to-target. Says so plainly when it is not met, and
    puts BYOL at the same budget beside it (RELA must beat simply training less)."""
    labels = kind_labels(ssl)
    ssl_name, rela_name = labels["byol"], labels["rela"]
    rows = {(r["method"], r["budget"]): r for r in table}
    rela = rows.get(("rela", claim_budget))
    if rela is None:
        return [f"claim not tested: no {rela_name} run at {budget_label(claim_budget)} (--budgets)"]
    byol = rows[("byol", 1.0)]
    lines = []
    for key, short, name in (("linear_probe_top1", "linear", "linear probe"), ("knn_top1", "knn", "kNN")):
        close = rela[f"{short}_delta"] >= -tolerance_pp
        fast = rela["wall_clock_ratio"] < 0.5
        verdict = "MET" if close and fast else "NOT MET"
        lines.append(
            f"claim ({name}) {verdict}: {rela_name} {budget_label(claim_budget)} {rela[key]:.2f} ± {rela[key + '_std']:.2f}% "
            f"vs {ssl_name}-100% {byol[key]:.2f} ± {byol[key + '_std']:.2f}%, delta {rela[f'{short}_delta']:+.2f} points "
            f"(95% paired CI {interval_text(rela[f'{short}_delta_ci95'])}; {'within' if close else 'NOT within'} "
            f"{tolerance_pp:g}), wall-clock {rela['wall_clock_ratio']:.2f}x {ssl_name}-100%'s "
            f"({'under' if fast else 'NOT under'} half), {rela['seeds']} seed(s)")
    target = ttt["target_knn_top1"]
    if target is None:
        lines.append("claim (time-to-target) not tested: the runs logged no kNN monitor")
    else:
        ratio = rela["time_to_target_ratio"]
        met = ratio is not None and ratio < 0.5
        reached = f"{rela['reached_target']}/{rela['seeds']} seeds reached it"
        if rela["time_to_target_s"] is None:
            how = f"median time not reached ({reached})"
        else:
            how = (f"median {rela['time_to_target_s']:.1f}s ({reached}) vs {ssl_name}-100%'s "
                   + ("never" if ttt["reference_time_s"] is None else f"{ttt['reference_time_s']:.1f}s")
                   + ("" if ratio is None else f", {ratio:.2f}x"))
        lines.append(f"claim (time-to-target) {'MET' if met else 'NOT MET'}: {rela_name} {budget_label(claim_budget)} to "
                     f"monitor kNN >= {target:.2f}% ({ttt['target_source']}): {how}; under half needed")
    same_budget = rows.get(("byol", claim_budget))
    if same_budget is not None:
        gain = rela["linear_probe_top1"] - same_budget["linear_probe_top1"]
        lines.append(
            f"baseline {ssl_name} {budget_label(claim_budget)}: linear {same_budget['linear_probe_top1']:.2f}% (delta "
            f"{same_budget['linear_delta']:+.2f}), kNN {same_budget['knn_top1']:.2f}% (delta "
            f"{same_budget['knn_delta']:+.2f}), wall-clock {same_budget['wall_clock_ratio']:.2f}x; {rela_name} minus {ssl_name} "
            f"at {budget_label(claim_budget)}: linear {gain:+.2f}, "
            f"kNN {rela['knn_top1'] - same_budget['knn_top1']:+.2f} points")
    transfer = rows.get(("rela-transfer", claim_budget))
    if transfer is not None:
        lines.append(
            f"{labels['rela-transfer']} {budget_label(claim_budget)} (prior {transfer_prior_of(table)}): linear "
            f"{transfer['linear_probe_top1']:.2f}% (delta {transfer['linear_delta']:+.2f}, "
            f"{interval_text(transfer['linear_delta_ci95'])}), kNN {transfer['knn_top1']:.2f}% (delta "
            f"{transfer['knn_delta']:+.2f}), wall-clock {transfer['wall_clock_ratio']:.2f}x")
    untrained = rows.get(("untrained", None))
    if untrained is not None:
        lines.append(f"baseline untrained backbone: linear {untrained['linear_probe_top1']:.2f}%, kNN "
                     f"{untrained['knn_top1']:.2f}%")
        for key, name in (("linear_probe_top1", "linear probe"), ("knn_top1", "kNN")):
            if untrained[key] >= rela[key] - tolerance_pp:
                lines.append(f"caution: the untrained backbone's {name} ({untrained[key]:.2f}%) is within "
                             f"{tolerance_pp:g} points of {rela_name} {budget_label(claim_budget)}'s or above it "
                             f"({rela[key]:.2f}%): in {name} these runs show no learning to compare")
    return lines


def transfer_prior_of(table: list[dict]) -> str:
    return next((r["prior"] for r in table if r["method"] == "rela-transfer"), "-")


def compare_end_to_end(given: dict, cfg: Config, *, method: str, prior: str, budgets: list[float], seeds: int,
                       transfer_prior: str | None, target_drop_pp: float, tolerance_pp: float) -> dict:
    """The JSON's "end_to_end": every planned run per seed in a temporary folder (given: the benchmark's
    rela.train options; each run sets its own prior, budget and seed), their summary and the headline."""
    plan = plan_runs(prior, budgets, transfer_prior)
    print(f"end-to-end runs per seed: {', '.join(group_label(*p.group, method) for p in plan)}; {seeds} seed(s), "
          f"{cfg.epochs} epochs, recipe {cfg.recipe}", flush=True)
    base = {k: v for k, v in given.items() if k != "prior"}
    with tempfile.TemporaryDirectory(prefix="rela-throughput-") as work_dir:
        runs = end_to_end(base, prior=prior, budgets=budgets, seeds=seeds, work_dir=Path(work_dir),
                          transfer_prior=transfer_prior)
    table, ttt = summarise_runs(runs, target_drop_pp, method)
    return {"recipe": cfg.recipe, "method": method, "prior": prior, "transfer_prior": transfer_prior,
            "plan": [asdict(p) for p in plan], "runs": runs, "summary": table,
            "time_to_target": ttt, "headline": headline(table, ttt, tolerance_pp, ssl=method),
            "warning": wall_clock_spread_warning(table)}


def bank_seconds_in_runs(runs: list[dict]) -> float:
    """The mean seconds the RELA runs (at every budget and seed) spent building their target banks."""
    return statistics.fmean(r["target_bank_s"] for r in runs if r["method"] == "rela")
