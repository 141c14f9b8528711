"""Part 4 of benchmarks/throughput.py: what would ImageNet-1K on ResNet-50 and 8 GPUs take? A projection
from the measured ResNet-50 step rates (on the CPU measured at a small resolution and scaled by pixel count),
not a measurement.
"""
from __future__ import annotations

import statistics

from benchmarks.throughput_runs import budget_label
from benchmarks.throughput_steps import StepSetup

IMAGENET_TRAIN_IMAGES = 1_281_167
PROJECTION_SIZE = 224


def project_imagenet(step_rows: list[dict], setup: StepSetup, fused: str, rela_fraction: dict[float, float],
                     *, epochs: int, gpus: int, images: int = IMAGENET_TRAIN_IMAGES) -> dict:
    """Days of a BYOL-100% run and of RELA at each budget, from the measured per-device images/s.

    RELA at budget b trains epochs x b x images, a fraction f of its steps in the RELA phase (at the RELA
    step's rate) and the rest as BYOL, plus a bank: one prior forward per image, sharded over the GPUs.
    """
    ips = {r["step"]: r["images_per_s"] for r in step_rows
           if r["setup"] == setup.label and r["fused"] in (fused, "-") and r["images_per_s"]}
    scale = (PROJECTION_SIZE / setup.image_size) ** 2  # conv cost grows with pixels; heads are small
    byol, rela, prior = (ips[k] / scale for k in ("byol", "rela", "prior forward"))
    byol_s = epochs * images / (byol * gpus)
    rows = [{"run": "byol-100%", "budget": 1.0, "rela_phase_fraction": 0.0, "images_trained": epochs * images,
             "bank_hours": 0.0, "hours": byol_s / 3600, "ratio_to_byol": 1.0}]
    bank_s = images / (prior * gpus)
    for budget, f in sorted(rela_fraction.items()):
        trained = epochs * budget * images
        seconds = trained * (f / rela + (1 - f) / byol) / gpus + bank_s
        rows.append({"run": f"rela-{budget_label(budget)}", "budget": budget, "rela_phase_fraction": f,
                     "images_trained": trained, "bank_hours": bank_s / 3600, "hours": seconds / 3600,
                     "ratio_to_byol": seconds / byol_s})
    measured_at = f"{setup.arch} {setup.image_size} px batch {setup.batch_size} {setup.precision}, fused {fused}"
    basis = (f"measured at {measured_at} on this device" if scale == 1 else
             f"measured at {measured_at} on this device, scaled by pixel count x{scale:.3g} to {PROJECTION_SIZE} px")
    return {"what": f"PROJECTION (not a measurement): ImageNet-1K ({images} images), {epochs} epochs, ResNet-50 at "
                    f"{PROJECTION_SIZE} px on {gpus} of this device, perfect scaling, no data or communication "
                    f"stalls; per-device images/s {basis}",
            "per_device_images_per_s": {"byol": byol, "rela": rela, "prior_forward": prior},
            "epochs": epochs, "gpus": gpus, "images": images, "rows": rows}


def rela_phase_fractions(budgets: list[float], given: float | None, end_to_end: dict | None
                         ) -> tuple[dict[float, float], str]:
    """Per budget, the fraction of RELA's steps in the RELA phase, and where it comes from: `given`
    (--projection-rela-fraction), else measured in the end-to-end RELA runs, else 1.0."""
    if given is not None:
        return {b: given for b in budgets}, "--projection-rela-fraction"
    if end_to_end is not None:
        return ({b: statistics.fmean(r["rela_phase_fraction"] for r in end_to_end["runs"]
                                     if r["method"] == "rela" and r["budget"] == b) for b in budgets},
                "measured in this run's end-to-end RELA runs at each budget")
    return {b: 1.0 for b in budgets}, "assumed 1.0 (no end-to-end runs)"
