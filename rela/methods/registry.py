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
from rela.methods.vicreg import Vicreg

METHODS: dict[str, type[SslMethod]] = {cls.name: cls for cls in (Byol, Dino, SimClr, MocoV3, BarlowTwins, Vicreg,
                                                                 SimSiam)}
assert tuple(METHODS) == METHOD_NAMES, "rela.config.METHOD_NAMES lists the registered methods, in order"


def method_class(name: str) -> type[SslMethod]:
    return METHODS[name]


def build_method(cfg: Config, backbone: nn.Module) -> SslMethod:
    """The method's networks around `backbone` (heads from the global generator, seeded by --seed)."""
    return METHODS[cfg.method].from_config(backbone, cfg)


def method_reference_recipe(name: str) -> dict[str, Any]:
    """The reference code's own choices for this method, which --recipe reference applies over its general ones
    (empty for the methods the reference code does not have)."""
    return dict(METHODS[name].reference_recipe)


def method_defaults(name: str, preset: str) -> dict[str, Any]:
    """The method's own defaults for `preset` (its paper's or solo-learn's, cited in its module)."""
    return preset_defaults(METHODS[name].defaults, preset)
