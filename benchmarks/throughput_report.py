"""The report of benchmarks/throughput.py: the JSON's header (environment, arguments, configuration,
notes, load), the tables on the terminal, DIR/NAME.json and the time-to-accuracy picture DIR/NAME.png.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.throughput_runs import interval_text, kind_labels
from benchmarks.throughput_steps import StepSetup
from benchmarks.timing import environment, print_table, write_json
from rela.config import Config
from rela.data.datasets import DatasetSplits


def payload_header(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict:
    """What the JSON says before any timing: the environment, the arguments and configuration, the notes
    that go with the numbers, and the load on the machine."""
    notes = ["images/s counts dataset images; each is two augmented views in BYOL and RELA steps, one in the "
             "supervised step",
             "steps run on synthetic batches resident on the device (no loader); the loader is timed on its own"]
    if "e2e" not in args.skip:
        notes.append("wall_clock_s is the trainer's: target bank (fresh folder per run) + training + evaluation")
    if device.type != "cuda":
        notes.append("fused ops on: not timed on the CPU (Triton's interpreter would run); the trainer uses the "
                     "pure-torch references there")
        notes.append("on the CPU the loader and the step share the cores: a run goes at about 1/(1/loader + 1/step)")
    return {"benchmark": "throughput", "environment": environment(device), "quick": args.quick,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "config": asdict(cfg), "notes": notes, "torch_threads": torch.get_num_threads(),
            # On a shared machine other work changes every number here; the load says how much there was.
            "load_average_start": list(os.getloadavg())}


def announce(payload: dict, cfg: Config, splits: DatasetSplits | None, setups: list[StepSetup], precision: str,
             device: torch.device) -> None:
    data = "synthetic batches only" if splits is None else f"{cfg.dataset} ({len(splits.train)} train images)"
    print(f"throughput benchmark on {payload['environment']['device']}; {data}, {cfg.arch} {cfg.image_size} px batch "
          f"{cfg.batch_size} {precision}{' channels_last' if device.type == 'cuda' else ''}"
          f"{f', compiled ({cfg.compile_backend})' if setups[0].compile else ''}", flush=True)


def report(payload: dict) -> None:
    print("\n== step throughput (images/s; synthetic batches on the device) ==")
    print_table(payload["step"]["rows"], ["setup", "step", "fused", "arch", "batch", "size", "precision",
                                          "channels_last", "compiled", "images_per_s", "median_ms", "p10_ms",
                                          "p90_ms", "rounds", "note"])
    for check in payload["step"]["like_for_like"]:
        train, prior = check["train_steps"], check["prior_forward"]
        print(f"{check['setup']}: supervised, BYOL and RELA steps "
              + (f"alike ({train['settings']})" if train["same"] else "NOT alike (see the rows)")
              + f"; prior forward {prior['settings']} "
              + ("as the target bank runs" if prior["same"] else f"NOT as the target bank runs ({prior['target_bank']})"))
    print("\n== step ratios (goals: RELA/BYOL >= 1.3; BYOL/supervised >= 0.35, parity 0.375) ==")
    print_table(payload["step"]["ratios"], ["setup", "fused", "rela_over_byol", "byol_over_supervised",
                                            "byol_images_per_s", "rela_images_per_s", "supervised_images_per_s"])
    if payload["step"]["methods"]:
        print("\n== each method's own step against the RELA-phase step on its networks (images/s) ==")
        print_table(payload["step"]["methods"], ["setup", "method", "fused", "method_images_per_s", "rela_images_per_s",
                                                 "rela_over_method", "method_median_ms", "rela_median_ms"])
    if "loader" in payload:
        print("\n== loader vs step (images/s) ==")
        print_table(payload["loader"]["rows"], ["loader", "views", "batch", "size", "images_per_s", "step",
                                                "step_images_per_s", "bottleneck"])
    if "target_bank" in payload:
        bank = payload["target_bank"]
        print("\n== target bank (fresh build) ==")
        print_table([bank], ["prior", "arch", "prior_input_size", "images", "dim", "builds", "seconds",
                             "seconds_per_1000_images", "images_per_s", "in_runs_seconds_mean"])
    if "end_to_end" in payload:
        e2e = payload["end_to_end"]
        print(f"\n== end-to-end runs, recipe {e2e['recipe']} (wall_clock_s includes the target bank and the "
              f"evaluation; training_clock_s is it without the kNN monitor; untrained: its evaluation alone) ==")
        print_table(e2e["runs"], ["run", "prior", "wall_clock_s", "training_clock_s", "target_bank_s", "eval_s",
                                  "train_steps", "images_seen", "rela_phase_end_step", "rela_phase_ended_by",
                                  "linear_probe_top1", "knn_top1", "time_to_target_s", "load_1min_before",
                                  "load_1min_after"])
        ttt = e2e["time_to_target"]
        target = "-" if ttt["target_knn_top1"] is None else f"{ttt['target_knn_top1']:.2f}%"
        print(f"\n== wall-clock saving against honest baselines (mean ± std over seeds, every seed; deltas to "
              f"{kind_labels(e2e.get('method', 'byol'))['byol']}-100% paired by seed; time to monitor kNN {target}, the median over seeds) ==")
        print_table(summary_display(e2e["summary"]),
                    ["group", "seeds", "linear", "linear_per_seed", "linear_delta [95% CI]", "knn", "knn_per_seed",
                     "knn_delta [95% CI]", "wall_clock_s", "wall_clock_ratio", "wall_clock_ratio_of_medians",
                     "time_to_target_s", "reached", "time_to_target_ratio"])
        for line in e2e["headline"]:
            print(line)
        if e2e["warning"]:
            print(e2e["warning"])
    if "projection" in payload:
        projection = payload["projection"]
        print(f"\n== {projection['what']}; RELA-phase fraction {projection['rela_phase_fraction_source']} ==")
        print_table(projection["rows"], ["run", "budget", "rela_phase_fraction", "images_trained", "bank_hours",
                                         "hours", "ratio_to_byol"])
    print("\nbenchmark sections took " + ", ".join(f"{k} {v:.0f}s" for k, v in payload["benchmark_seconds"].items()))
    print(f"torch threads {payload['torch_threads']}; load average (1, 5, 15 min) at start "
          f"{', '.join(f'{x:.1f}' for x in payload['load_average_start'])}, at end "
          f"{', '.join(f'{x:.1f}' for x in payload['load_average_end'])}")
    for note in payload["notes"]:
        print(f"note: {note}")


def summary_display(table: list[dict]) -> list[dict]:
    """The summary as the terminal shows it: mean ± std, every seed's number, paired deltas with intervals."""
    def seeds(values: list) -> str:
        return " ".join("-" if v is None else f"{v:.1f}" for v in values)

    out = []
    for r in table:
        out.append({
            "group": r["group"], "seeds": r["seeds"],
            "linear": f"{r['linear_probe_top1']:.2f} ± {r['linear_probe_top1_std']:.2f}",
            "linear_per_seed": seeds(r["linear_probe_top1_per_seed"]),
            "linear_delta [95% CI]": f"{r['linear_delta']:+.2f} {interval_text(r['linear_delta_ci95'])}",
            "knn": f"{r['knn_top1']:.2f} ± {r['knn_top1_std']:.2f}", "knn_per_seed": seeds(r["knn_top1_per_seed"]),
            "knn_delta [95% CI]": f"{r['knn_delta']:+.2f} {interval_text(r['knn_delta_ci95'])}",
            "wall_clock_s": f"{r['wall_clock_s']:.1f} ± {r['wall_clock_s_std']:.1f}",
            "wall_clock_ratio": r["wall_clock_ratio"], "wall_clock_ratio_of_medians": r["wall_clock_ratio_of_medians"],
            "time_to_target_s": r["time_to_target_s"],
            "reached": "-" if r["method"] == "untrained" else f"{r['reached_target']}/{r['seeds']}",
            "time_to_target_ratio": r["time_to_target_ratio"]})
    return out


def write_outputs(payload: dict, out: Path, name: str, cfg: Config, tolerance_pp: float) -> None:
    """out/NAME.json, and with end-to-end runs out/NAME.png: monitor kNN against training clock per run."""
    path = write_json(out / f"{name}.json", payload)
    print(f"wrote {path}")
    if "end_to_end" in payload:
        from benchmarks.throughput_plot import plot_time_to_accuracy
        e2e = payload["end_to_end"]
        png = plot_time_to_accuracy(e2e["runs"], e2e["summary"], e2e["time_to_target"], out / f"{name}.png",
                                    title=f"{kind_labels(e2e['method'])['byol']}: {cfg.dataset}, {cfg.arch}, "
                                          f"{cfg.epochs} epochs, recipe {cfg.recipe}, "
                                          f"{payload['environment']['device']}",
                                    tolerance_pp=tolerance_pp)
        print(f"wrote {png}")
