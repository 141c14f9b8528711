"""--prior timm:NAME[:WEIGHTS]: a timm model as the prior, random (seeded) or with weights from a local
.safetensors or .pth file (nothing is downloaded). Its input size and normalisation are timm's for that
model (pretrained_cfg), as the weights were trained with them."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rela.errors import RelaError
from rela.models.backbones import timm_model
from rela.utils.digest import file_digest


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or a .pth/.pt file holding one (or a checkpoint with it under
    'state_dict' or 'model', as timm's and torchvision's training scripts write)."""
    if not path.is_file():
        raise RelaError(f"{what}: file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to deserialise is the user's file, not our bug
        raise RelaError(f"{what}: cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RelaError(f"{what}: {path} holds no state dict of tensors")
    return state


def load_timm_weights(net: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path, what: str) -> None:
    """Loads `state` into timm's `name` built without its classifier: a file's classifier weights (a model
    saved with its head) are left out; any other missing, extra or mis-shaped tensor is an error."""
    classifier = net.pretrained_cfg.get("classifier") or ""
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(c and (k == c or k.startswith(c + ".")) for c in classifiers)}
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes: "size mismatch for X: copying a param with shape ..."
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise RelaError(f"{what}: {path} does not fit timm model {name}: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise RelaError(f"{what}: {path} does not fit timm model {name}: tensors {', '.join(parts)}")


def load_timm_prior(spec: str, rest: str, seed: int):
    """(encoder, input size, mean, std, fingerprint) of `--prior timm:NAME[:WEIGHTS]`."""
    name, _, weights = rest.partition(":")
    what = f"--prior {spec}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm_model(name, what=what)
    if weights:
        path = Path(weights)
        load_timm_weights(net, read_state_dict(path, what), name, path, what)
        fingerprint = f"timm:{name}:sha256={file_digest(path)}"
    else:
        fingerprint = f"timm:{name}:random:seed={seed}"
    cfg = net.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    return net, size, mean, std, fingerprint
