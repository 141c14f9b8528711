"""--method NAME -> the SSL method's class. Adding a method: one module with an `SslMethod` subclass, one
line here, its name in rela/config.py METHOD_NAMES; the training loop does not change."""
from __future__ import annotations

from typing import Any

from torch import nn

from rela.config import METHOD_NAMES, Config
from rela.methods.base import SslMethod, preset_defaults
from rela.methods.barlowtwins import BarlowTwins
from rela.methods.byol import Byol
from rela.methods.dino import Dino
from rela.methods.mocov3 import MocoV3
from rela.methods.simclr import SimClr
from rela.methods.simsiam import SimSiam
from rela.methods.supervised import Supervised
from rela.methods.vicreg import Vicreg

METHODS: dict[str, type[SslMethod]] = {cls.name: cls for cls in (Byol, Dino, SimClr, MocoV3, BarlowTwins, Vicreg,
                                                                 SimSiam, Supervised)}
assert tuple(METHODS) == METHOD_NAMES, "rela.config.METHOD_NAMES lists the registered methods, in order"


def method_class(name: str) -> type[SslMethod]:
    return METHODS[name]


def build_method(cfg: Config, backbone: nn.Module, num_classes: int | None = None) -> SslMethod:
    """The method's networks around `backbone` (heads from the global generator, seeded by --seed);
    `num_classes` for a method that learns from labels (supervised)."""
    cls = METHODS[cfg.method]
    if cls.uses_labels:
        if num_classes is None:
            raise ValueError(f"--method {cfg.method} learns from labels: build_method needs num_classes")
        return cls.from_config(backbone, cfg, num_classes=num_classes)
    return cls.from_config(backbone, cfg)


def method_reference_recipe(name: str) -> dict[str, Any]:
    """The reference code's own choices for this method, which --recipe reference applies over its general ones
    (empty for the methods the reference code does not have)."""
    return dict(METHODS[name].reference_recipe)


def method_defaults(name: str, preset: str) -> dict[str, Any]:
    """The method's own defaults for `preset` (its paper's or solo-learn's, cited in its module)."""
    return preset_defaults(METHODS[name].defaults, preset)
