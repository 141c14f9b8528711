"""--config FILE (YAML or JSON) and --print-config.

A file holds options by their names (`batch_size` or `batch-size`), the same values the command line takes.
Layers, lowest first: the dataclass default, the dataset's preset (and the SSL method's defaults), `--recipe
reference`, the file, the flags (resolve_config applies the first ones; the file's values enter it as given, under the flags'). A run's own
config.json is such a file: `--config RUN/config.json --out NEW` repeats the run.

--print-config prints the resolved options with where each came from, as YAML that --config reads back.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from rela.config import PRESETS, REFERENCE_RECIPE, Config, resolve_config
from rela.errors import RelaError

# resolve_config sets these for --recipe reference besides REFERENCE_RECIPE (lr per 256 images from the
# reference's absolute lr; blur off at 32 px and below).
RECIPE_DERIVED = ("lr", "byol_blur")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options a YAML or JSON file sets, checked against Config's names and types (RelaError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise RelaError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise RelaError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                                "a .json file needs nothing") from None
            raw = yaml.safe_load(text)
    except RelaError:
        raise
    except Exception as err:  # a syntax error in the user's file: its first line says where
        raise RelaError(f"--config {path}: cannot parse: {str(err).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RelaError(f"--config {path}: expected a mapping of option: value, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        raise RelaError(f"--config {path}: unknown option(s) {', '.join(unknown)} (python -m rela.train --help "
                        "lists them)")
    hints = typing.get_type_hints(Config)
    return {name: _coerce(path, name, value, hints[name]) for name, value in values.items()}


def _coerce(path: Path, name: str, value: Any, hint: Any) -> Any:
    """The value as the option's type: ints for floats, and numeric strings for floats (PyYAML reads `1e-4`,
    without a dot, as a string); anything else of the wrong type is an error naming the option."""
    allowed = [t for t in typing.get_args(hint)] or [hint]
    if value is None:
        if type(None) in allowed:
            return None
        raise RelaError(f"--config {path}: {name} cannot be null")
    kind = next(t for t in allowed if t is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. rela_phase: 0.3
    raise RelaError(f"--config {path}: {name} must be {kind.__name__}, got {value!r}")


def resolve_with_file(file_values: dict[str, Any], flag_values: dict[str, Any]) -> Config:
    """Flags over the file; resolve_config puts both over the recipe, the preset and the defaults."""
    return resolve_config({**file_values, **flag_values})


def option_sources(file_values: dict[str, Any], flag_values: dict[str, Any], file_name: str | None) -> dict[str, str]:
    """Where each resolved option came from: default, preset NAME, method NAME, recipe reference, file PATH or
    flag. It follows resolve_config's layers."""
    given = {**file_values, **flag_values}
    preset = given.get("preset") or given.get("dataset", Config.dataset)
    sources = {f.name: "default" for f in dataclasses.fields(Config)}
    sources["preset"] = f"default (the dataset's: {preset})"
    for name in PRESETS.get(preset, {}):
        sources[name] = f"preset {preset}"
    # The SSL method's own defaults over the preset, and with --recipe reference its own reference choices
    # (DINO's head) over the recipe's, as resolve_config layers them.
    from rela.methods.registry import method_defaults, method_reference_recipe  # torch: not at import time
    method = given.get("method", Config.method)
    for name in method_defaults(method, preset):
        sources[name] = f"method {method}"
    if given.get("recipe") == "reference":
        for name in (*REFERENCE_RECIPE, *RECIPE_DERIVED, *method_reference_recipe(method)):
            sources[name] = "recipe reference"
    for name in file_values:
        sources[name] = f"file {file_name}"
    for name in flag_values:
        sources[name] = "flag"
    return sources


def format_config(cfg: Config, sources: dict[str, str]) -> str:
    """The options as YAML, each with its source as a comment: --config reads the output back."""
    width = max(len(f.name) for f in dataclasses.fields(Config))
    lines = ["# resolved options of python -m rela.train (source: default, preset, method, recipe, file or flag)"]
    for f in dataclasses.fields(Config):
        value = json.dumps(getattr(cfg, f.name))  # JSON scalars are YAML scalars
        lines.append(f"{f.name + ':':<{width + 1}} {value:<24} # {sources[f.name]}")
    return "\n".join(lines)
