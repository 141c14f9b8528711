"""Part 1 of benchmarks/throughput.py: how many images/s does each step train?

rela.step.train_step, the trainer's own step, on the networks rela.run.build_networks builds for the
trainer (no DDP), on synthetic batches resident on the device: a BYOL step and a RELA-phase step, each with
the fused ops on and off, next to a plain supervised step of the same backbone and the prior's forward as
the target bank runs it; each row says what it ran with, read off its networks. Every method's own step
against the RELA-phase step on its networks. Interleaved rounds (benchmarks.timing.interleaved), the median.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import interleaved
from rela.config import Config
from rela.data.loader import TrainBatch
from rela.methods.learner import phase_named
from rela.models.backbones import build_backbone
from rela.ops._dispatch import kernels_unavailable_reason
from rela.options import resolve_config
from rela.prior.specs import load_prior
from rela.prior.target_bank import TargetBank, prior_encoder, prior_precision
from rela.run import build_networks, compiles, peak_learning_rate
from rela.step import train_step
from rela.utils.distributed import DistInfo

# Forward-equivalents per image: BYOL runs 2 views x (online forward + backward (2) + target forward) = 8;
# a supervised step 1 x (forward + backward) = 3. At equal efficiency BYOL gets 3/8 of supervised images/s.
BYOL_PARITY = 3 / 8


@dataclass
class StepSetup:
    """One configuration whose steps are timed."""
    label: str
    arch: str
    batch_size: int
    image_size: int
    precision: str  # fp32 | bf16
    channels_last: bool
    proj_hidden: int
    proj_dim: int
    optimizer: str
    lr: float
    weight_decay: float
    base_momentum: float
    num_classes: int
    compile: bool = False  # torch.compile the backbones in place, as the trainer does (rela.run.build_networks)
    compile_backend: str = "inductor"


def setup_from_config(label: str, cfg: Config, precision: str, device: torch.device, num_classes: int) -> StepSetup:
    return StepSetup(label, cfg.arch, cfg.batch_size, cfg.image_size, precision, device.type == "cuda",
                     cfg.proj_hidden, cfg.proj_dim, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.base_momentum,
                     num_classes, compiles(cfg, device), cfg.compile_backend)


def is_compiled(module: nn.Module) -> bool:
    """Whether Module.compile() was called on `module` (it keeps the compiled call in _compiled_call_impl)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def is_channels_last(module: nn.Module) -> bool:
    """Whether the module's convolution weights are in channels_last (the first 4-D parameter's layout)."""
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last)


def observed_settings(backbones: list[nn.Module], autocast_dtype: torch.dtype | None, inputs: torch.Tensor,
                      backend: str) -> dict:
    """What a timed step really runs with, read off its networks and batch, not off the setup that asked."""
    compiled = all(is_compiled(b) for b in backbones)
    return {"precision": {None: "fp32", torch.bfloat16: "bf16"}[autocast_dtype],
            "channels_last": all(is_channels_last(b) for b in backbones),
            "input_dtype": str(inputs.dtype).removeprefix("torch."),
            "input_channels_last": inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last),
            "compiled": compiled, "compile_backend": backend if compiled else None}


class TrainerStep:
    """The trainer's step (rela.step.train_step) on the networks that rela.run.build_networks builds for
    `python -m rela.train` (no DDP), fed synthetic batches resident on the device."""

    def __init__(self, setup: StepSetup, device: torch.device, fused: bool, seed: int = 0, method: str = "byol",
                 preset: str | None = None):
        given = {"arch": setup.arch, "batch_size": setup.batch_size, "image_size": setup.image_size,
                 "optimizer": setup.optimizer, "lr": setup.lr, "weight_decay": setup.weight_decay, "seed": seed,
                 "method": method, "compile": "on" if setup.compile else "off",
                 "compile_backend": setup.compile_backend}
        if method == "byol":  # the setup's heads; another method's come from its own defaults for the preset
            given.update(proj_hidden=setup.proj_hidden, proj_dim=setup.proj_dim, base_momentum=setup.base_momentum)
        cfg = resolve_config({**given, **({"preset": preset} if preset else {})})
        backbone = build_backbone(cfg.arch, seed=cfg.seed)
        # The bank is PCA-reduced to the backbone's width, so the map is square.
        self.learner, _, self.ema, self.optimizer = build_networks(
            cfg, backbone, backbone.feature_dim, setup.num_classes, DistInfo(), device,
            channels_last=setup.channels_last, fused=fused)
        self.lr, self.momentum, self.fused = peak_learning_rate(cfg), cfg.base_momentum, fused
        self.autocast_dtype = torch.bfloat16 if setup.precision == "bf16" else None
        rows = 4 * setup.batch_size
        self.bank = TargetBank(torch.randn(rows, backbone.feature_dim, device=device), {}, 0.0, reused=False)
        self.batch = synthetic_batch(setup, device, rows)
        self.settings = observed_settings(list(self.learner.method.backbones()), self.autocast_dtype,
                                          self.batch.view1, setup.compile_backend)

    def __call__(self, phase: str, batch: TrainBatch | None = None) -> None:
        """One step on `batch` (benchmarks/loader.py's, from a loader), else on the synthetic batch."""
        step_phase = phase_named(phase)
        train_step(self.learner, self.optimizer, self.ema, [self.batch if batch is None else batch], phase=step_phase,
                   bank=self.bank if step_phase.is_rela else None, lr=self.lr, momentum=self.momentum,
                   autocast_dtype=self.autocast_dtype, fused=self.fused)


class SupervisedStep:
    """The baseline a BYOL step is compared with: backbone + linear classifier, cross-entropy, SGD. It runs as
    the trainer's steps do: same autocast, same memory format, the backbone compiled in place (same backend)
    when theirs is."""

    def __init__(self, setup: StepSetup, device: torch.device, batch: TrainBatch):
        memory_format = torch.channels_last if setup.channels_last else torch.preserve_format
        backbone = build_backbone(setup.arch, seed=0)
        self.model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, setup.num_classes))
        self.model = self.model.to(device, memory_format=memory_format)
        if setup.compile:  # as rela.run.build_networks compiles the SSL backbones: in place, after the move
            backbone.compile(backend=setup.compile_backend)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.autocast_dtype = torch.bfloat16 if setup.precision == "bf16" else None
        self.images, self.labels = batch.view1, batch.label
        self.settings = observed_settings([backbone], self.autocast_dtype, self.images, setup.compile_backend)

    def __call__(self) -> None:
        device_type, dtype = self.images.device.type, self.autocast_dtype
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class PriorForward:
    """The prior's forward as the target bank runs it (a random-init copy of the arch, eval, no grad): through
    the bank's own rela.prior.target_bank.prior_encoder at the bank's precision on this device (bf16 autocast
    on channels_last on CUDA, fp32 elsewhere), on float32 NCHW images as the bank's loader hands them over."""

    def __init__(self, setup: StepSetup, device: torch.device, batch: TrainBatch):
        prior = load_prior("rand", arch=setup.arch, image_size=setup.image_size, seed=1, prior_size=None,
                           data_mean=(0.5,) * 3, data_std=(0.25,) * 3)
        encoder = prior.encoder.to(device)
        self.precision = prior_precision(device)
        self.encode = prior_encoder(encoder, self.precision)
        self.images = batch.view1.float().contiguous()
        self.settings = observed_settings([encoder], torch.bfloat16 if self.precision == "bf16" else None,
                                          self.images, "")

    def __call__(self) -> None:
        with torch.no_grad():
            self.encode(self.images)


def synthetic_batch(setup: StepSetup, device: torch.device, rows: int) -> TrainBatch:
    """Two normalised views as the loaders deliver them (autocast dtype, the model's layout), bank indices
    and labels, on the device."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (setup.batch_size, 3, setup.image_size, setup.image_size)
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    views = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2)]
    if setup.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    index = torch.randint(0, rows, (setup.batch_size,), generator=generator).to(device)
    label = torch.randint(0, setup.num_classes, (setup.batch_size,), generator=generator).to(device)
    return TrainBatch(views[0], views[1], index, label, views="byol")  # random pixels: any mode


def fused_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "not timed: on the CPU the fused path is Triton's interpreter"
    unavailable = kernels_unavailable_reason()
    return None if unavailable is None else f"not timed: {unavailable}"


def time_steps(setup: StepSetup, device: torch.device, *, warmup: int, rounds: int, repeats: int) -> list[dict]:
    """One row per (step, fused): images/s from the median step time over interleaved rounds."""
    skip = fused_skip_reason(device)
    fused_modes = [False] if skip else [False, True]
    learners = {fused: TrainerStep(setup, device, fused) for fused in fused_modes}
    batch = learners[False].batch
    supervised, prior = SupervisedStep(setup, device, batch), PriorForward(setup, device, batch)
    methods, settings = {("supervised", None): supervised}, {("supervised", None): supervised.settings}
    for fused, learner in learners.items():
        for phase in ("byol", "rela"):
            methods[(phase, fused)] = lambda learner=learner, phase=phase: learner(phase)
            settings[(phase, fused)] = learner.settings
    methods[("prior forward", None)], settings[("prior forward", None)] = prior, prior.settings
    for fn in methods.values():  # interleaved() warms each up once more
        for _ in range(max(warmup - 1, 0)):
            fn()
    timings = interleaved({key: (fn, repeats) for key, fn in methods.items()}, rounds=rounds, device=device)
    rows = []
    for (step, fused), timing in timings.items():
        rows.append(step_row(setup, step, fused, timing, settings=settings[(step, fused)]))
        if step == "rela" and fused is False and skip:
            rows.append(step_row(setup, "byol", True, None, skip))
            rows.append(step_row(setup, "rela", True, None, skip))
    del learners, methods
    release_memory(device)
    order = {"supervised": 0, "byol": 1, "rela": 2, "prior forward": 3}
    return sorted(rows, key=lambda r: (order[r["step"]], str(r["fused"])))


def time_method_steps(setup: StepSetup, cfg: Config, device: torch.device, methods: list[str], *, warmup: int,
                      rounds: int, repeats: int) -> list[dict]:
    """Per method: its own step and the RELA-phase step on its networks (heads at the method's defaults for
    the dataset's preset), the fused ops as the trainer picks them; interleaved rounds, the median."""
    fused = fused_skip_reason(device) is None
    steps = {m: TrainerStep(setup, device, fused, method=m, preset=cfg.preset) for m in methods}
    calls = {}
    for m, step in steps.items():
        for phase in (m, "rela"):
            call = (lambda step=step, phase=phase: step(phase))
            for _ in range(warmup):
                call()
            calls[(m, phase)] = (call, repeats)
    timings = interleaved(calls, rounds=rounds, device=device)
    del steps, calls
    release_memory(device)
    rows = []
    for m in methods:
        own, rela = (setup.batch_size / timings[(m, phase)]["median_ms"] * 1e3 for phase in (m, "rela"))
        rows.append({"setup": setup.label, "method": m, "fused": "on" if fused else "off",
                     "method_images_per_s": own, "rela_images_per_s": rela, "rela_over_method": rela / own,
                     "method_median_ms": timings[(m, m)]["median_ms"], "rela_median_ms": timings[(m, "rela")]["median_ms"]})
    return rows


def step_row(setup: StepSetup, step: str, fused: bool | None, timing: dict | None, note: str = "",
             settings: dict | None = None) -> dict:
    """settings: what the timed step ran with (observed_settings); a step not timed names the setup's."""
    if settings is None:
        settings = {"precision": setup.precision, "channels_last": setup.channels_last, "input_dtype": None,
                    "input_channels_last": None, "compiled": setup.compile,
                    "compile_backend": setup.compile_backend if setup.compile else None}
    row = {"setup": setup.label, "step": step, "fused": {None: "-", False: "off", True: "on"}[fused],
           "arch": setup.arch, "batch": setup.batch_size, "size": setup.image_size, **settings,
           "images_per_s": None, "median_ms": None, "p10_ms": None, "p90_ms": None, "rounds": None, "note": note}
    if timing is not None:
        row.update(images_per_s=setup.batch_size / timing["median_ms"] * 1e3, median_ms=timing["median_ms"],
                   p10_ms=timing["p10_ms"], p90_ms=timing["p90_ms"], rounds=timing["repeats"])
    return row


def step_ratios(rows: list[dict]) -> list[dict]:
    """Per setup and fused mode: RELA-phase over BYOL images/s (goal >= 1.3) and BYOL over supervised
    images/s (goal >= 0.35; 0.375 is parity, see BYOL_PARITY)."""
    out = []
    for setup in dict.fromkeys(r["setup"] for r in rows):
        ips = {(r["step"], r["fused"]): r["images_per_s"] for r in rows if r["setup"] == setup}
        for fused in ("off", "on"):
            byol, rela, supervised = ips.get(("byol", fused)), ips.get(("rela", fused)), ips.get(("supervised", "-"))
            if byol is None or rela is None:
                continue
            out.append({"setup": setup, "fused": fused, "byol_images_per_s": byol, "rela_images_per_s": rela,
                        "supervised_images_per_s": supervised, "rela_over_byol": rela / byol,
                        "byol_over_supervised": byol / supervised, "byol_over_supervised_at_parity": BYOL_PARITY})
    return out


TRAIN_STEP_SETTINGS = ("precision", "channels_last", "input_dtype", "input_channels_last", "compiled", "compile_backend")
PRIOR_SETTINGS = ("precision", "channels_last")


def like_for_like(rows: list[dict], device: torch.device) -> list[dict]:
    """Per setup, what each comparison ran with: the supervised, BYOL and RELA steps (their ratios compare
    them) must share precision, memory format, input and compilation; the prior's forward (the projection's
    bank rate) must run as the target bank does on this device. `same` says whether they did."""
    out = []
    bank = {"precision": prior_precision(device), "channels_last": prior_precision(device) == "bf16"}
    for setup in dict.fromkeys(r["setup"] for r in rows):
        timed = [r for r in rows if r["setup"] == setup and r["images_per_s"] is not None]
        train = [r for r in timed if r["step"] in ("supervised", "byol", "rela")]
        train_settings = {tuple(r[k] for k in TRAIN_STEP_SETTINGS) for r in train}
        prior = next((r for r in timed if r["step"] == "prior forward"), None)
        out.append({"setup": setup,
                    "train_steps": {"steps": sorted({f"{r['step']} (fused {r['fused']})" for r in train}),
                                    "same": len(train_settings) == 1,
                                    "settings": dict(zip(TRAIN_STEP_SETTINGS, *train_settings))
                                    if len(train_settings) == 1 else None},
                    "prior_forward": {"settings": None if prior is None else {k: prior[k] for k in PRIOR_SETTINGS},
                                      "target_bank": bank,
                                      "same": prior is not None and all(prior[k] == bank[k] for k in PRIOR_SETTINGS)}})
    return out


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_throughput(setups: list[StepSetup], cfg: Config, device: torch.device, methods: list[str], *, warmup: int,
                    rounds: int, repeats: int) -> dict:
    """The JSON's "step": every setup's rows (step_row), their ratios, each method's step against the
    RELA-phase step on the first setup (none when `methods` is empty) and whether the compared rows agree."""
    step_rows = []
    for setup in setups:
        print(f"timing steps: {setup.label} ({setup.arch} {setup.image_size} px batch {setup.batch_size} "
              f"{setup.precision})", flush=True)
        step_rows += time_steps(setup, device, warmup=warmup, rounds=rounds, repeats=repeats)
    ratios = step_ratios(step_rows)
    method_rows = []
    if methods:
        print(f"timing each method's step against the RELA-phase step: {', '.join(methods)}", flush=True)
        method_rows = time_method_steps(setups[0], cfg, device, methods, warmup=warmup, rounds=rounds,
                                        repeats=repeats)
    return {"setups": [asdict(s) for s in setups], "rows": step_rows, "ratios": ratios, "methods": method_rows,
            "like_for_like": like_for_like(step_rows, device),
            "goals": {"rela_over_byol": 1.3, "byol_over_supervised": 0.35,
                      "byol_over_supervised_parity": BYOL_PARITY}}
