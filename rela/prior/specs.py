"""Prior specs: what frozen network encodes the training set for the target bank.

  none                          plain BYOL, no RELA phase
  rand                          the student's architecture, freshly initialised from --prior-seed
  torchvision:NAME[:WEIGHTS]    a torchvision architecture, random (seeded) or with a state-dict file
  timm:NAME[:WEIGHTS]           a timm model, random (seeded) or with a .safetensors/.pth file (timm_prior.py)
  torchscript:PATH              a TorchScript module; encode_image() is called when it has one (CLIP)
  run:DIR                       the backbone of a run of this trainer

Every file but a TorchScript one is read as weights only (safetensors, or torch's weights-only unpickler): it
runs nothing. A TorchScript file is a program: its code runs when the prior encodes an image, and it can read
and write any file the run can (torch.from_file(..., shared=True) writes one). Load only TorchScript files you
trust; a CLIP-like prior loads safely as weights, e.g. timm:vit_base_patch16_clip_224.openai:model.safetensors
(the image tower of hf.co/timm/vit_base_patch16_clip_224.openai, with CLIP's normalisation from timm).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torchvision

from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from rela.errors import RelaError
from rela.models.backbones import build_backbone
from rela.models.export import load_backbone
from rela.utils.digest import file_digest, state_digest

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Prior:
    spec: str
    encoder: nn.Module  # frozen, eval mode: (B, 3, S, S) normalised images -> (B, D) float32
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str  # what the bank is keyed by: the spec and a hash of the weights


class _Features(nn.Module):
    """Calls `encode_image` when the module has one (CLIP), else forward; flattens to (B, D) float32."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.use_encode_image = hasattr(module, "encode_image")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module.encode_image(x) if self.use_encode_image else self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1).float()


def _strip_classifier(net: nn.Module, name: str) -> nn.Module:
    for attr in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(net, attr, None), nn.Module):
            setattr(net, attr, nn.Identity())
            return net
    raise RelaError(f"torchvision model {name!r} has no fc/classifier/heads/head to remove for features")


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def code_warning(spec: str) -> str | None:
    """The run log's warning for a prior that is code rather than weights (torchscript:PATH); None otherwise."""
    if not spec.startswith("torchscript:"):
        return None
    return (f"warning: --prior {spec}: a TorchScript file runs code (it can read and write any file this run can); "
            "load only files you trust. Weights run nothing: timm:NAME:WEIGHTS.safetensors (CLIP image towers, e.g. "
            "timm:vit_base_patch16_clip_224.openai:model.safetensors) or torchvision:NAME:WEIGHTS.pth")


def load_prior(spec: str, *, arch: str, image_size: int, seed: int, prior_size: int | None,
               data_mean, data_std) -> Prior | None:
    kind, _, rest = spec.partition(":")
    if kind == "none" and not rest:
        return None
    if kind == "rand" and not rest:
        net = build_backbone(arch, seed=seed)
        return Prior(spec, _freeze(_Features(net)), prior_size or image_size, tuple(data_mean), tuple(data_std),
                     f"rand:{arch}:seed={seed}")
    if kind == "torchvision" and rest:
        name, _, weights = rest.partition(":")
        if name not in torchvision.models.list_models():
            raise RelaError(f"--prior {spec}: torchvision has no model {name!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.get_model(name, weights=None)
        if weights:
            path = Path(weights)
            state = _load_file(path, spec, lambda p: torch.load(p, map_location="cpu", weights_only=True))
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            try:
                net.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as err:
                raise RelaError(f"--prior {spec}: {path} does not fit {name}: "
                                f"{state_mismatch(net, state) or str(err).splitlines()[0]}") from None
            fingerprint = f"torchvision:{name}:sha256={file_digest(path)}"
        else:
            fingerprint = f"torchvision:{name}:random:seed={seed}"
        net = _strip_classifier(net, name)
        return Prior(spec, _freeze(_Features(net)), prior_size or 224, IMAGENET_MEAN, IMAGENET_STD, fingerprint)
    if kind == "timm" and rest:
        from rela.prior.timm_prior import load_timm_prior

        net, size, mean, std, fingerprint = load_timm_prior(spec, rest, seed)
        return Prior(spec, _freeze(_Features(net)), prior_size or size, mean, std, fingerprint)
    if kind == "torchscript" and rest:
        path = Path(rest)
        module = _load_file(path, spec, lambda p: torch.jit.load(str(p), map_location="cpu"))
        encoder = _Features(module)
        mean, std = (CLIP_MEAN, CLIP_STD) if encoder.use_encode_image else (IMAGENET_MEAN, IMAGENET_STD)
        return Prior(spec, _freeze(encoder), prior_size or 224, mean, std,
                     f"torchscript:sha256={file_digest(path)}")
    if kind == "run" and rest:
        return _load_run_prior(spec, Path(rest), prior_size)
    raise RelaError(f"unknown --prior {spec!r}; use none, rand, torchvision:NAME[:WEIGHTS.pth], timm:NAME[:WEIGHTS], "
                    "torchscript:PATH or run:DIR")


def _load_file(path: Path, spec: str, loader):
    if not path.is_file():
        raise RelaError(f"--prior {spec}: file {path} does not exist")
    try:
        return loader(path)
    except Exception as err:  # any failure to deserialise is the user's file, not our bug
        raise RelaError(f"--prior {spec}: cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _load_run_prior(spec: str, run_dir: Path, prior_size: int | None) -> Prior:
    """A backbone written by this trainer: RUN/backbone.pt at the end of a run."""
    path = run_dir / "backbone.pt"
    saved = _load_file(path, spec, load_backbone)  # weights-only: a crafted backbone.pt runs nothing
    try:
        net = build_backbone(saved["arch"])
        state, size, mean, std = saved["state_dict"], saved["image_size"], tuple(saved["mean"]), tuple(saved["std"])
    except (KeyError, TypeError, IndexError) as err:
        missing = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise RelaError(f"--prior {spec}: {path} is not a backbone written by rela.train ({missing})") from None
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise RelaError(f"--prior {spec}: the weights in {path} do not fit its architecture {saved['arch']}: "
                        f"{state_mismatch(net, state) or str(err).splitlines()[0]}") from None
    return Prior(spec, _freeze(_Features(net)), prior_size or size, mean, std,
                 f"run:{saved['arch']}:state={state_digest(net)}")


def state_mismatch(net: nn.Module, state) -> str:
    """One line on how `state` differs from `net`'s state dict (load_state_dict lists every key, on many lines)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a state dict"
    wanted = net.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    resized = [f"{k} {tuple(state[k].shape)} for {tuple(v.shape)}" for k, v in wanted.items()
               if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    parts = [f"{len(keys)} {what} (first: {keys[0]})"
             for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", resized))
             if keys]
    return "; ".join(parts)

