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

from rela.config import PRESETS, REFERENCE_RECIPE, Config, resolve_config, shorten
from rela.errors import RelaError

# resolve_config sets these for --recipe reference besides REFERENCE_RECIPE (lr per 256 images from the
# reference's absolute lr; blur off at 32 px and below).
RECIPE_DERIVED = ("lr", "byol_blur")


# A config file is a screenful of options: anything much larger, or YAML that repeats a node through more
# aliases (a "billion laughs" document of a few hundred bytes expands to gigabytes), is refused.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 16  # k aliases on each of L levels expand to k**L values: at most 4**4 here


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options a YAML or JSON file sets, checked against Config's names and types (RelaError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise RelaError(f"--config {path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RelaError(f"--config {path}: cannot read it: {err.strerror or err}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise RelaError(f"--config {path}: {len(data)} bytes, more than an options file holds (at most "
                        f"{MAX_CONFIG_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RelaError(f"--config {path}: not UTF-8 text (byte {err.start} is {data[err.start]:#04x}); save it as "
                        "UTF-8") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raw = _load_yaml(path, text)
    except RelaError:
        raise
    except Exception as err:  # a syntax error in the user's file: its first line says where
        raise RelaError(f"--config {path}: cannot parse: {shorten(str(err).splitlines()[0])}") from None
    if raw is None:
        return {}
    return checked_options(f"--config {path}", raw)


def _load_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise RelaError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                        "a .json file needs nothing") from None

    class CountingLoader(yaml.SafeLoader):
        """SafeLoader that refuses a document with more than MAX_YAML_ALIASES aliases (*name)."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases = getattr(self, "aliases", 0) + 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise RelaError(f"--config {path}: more than {MAX_YAML_ALIASES} YAML aliases (*name): refused, "
                                    "as such a file can expand to gigabytes; write the values out")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=CountingLoader)  # noqa: S506 (a SafeLoader)


def checked_options(source: str, raw: Any, unknown: str = "error") -> dict[str, Any]:
    """`raw` (a parsed file: a mapping of option: value) as Config's options of their types; RelaError naming
    `source` otherwise. unknown="ignore" leaves out names that are not options (a run's config.json written by
    another version) instead of refusing them."""
    if not isinstance(raw, dict):
        raise RelaError(f"{source}: expected a mapping of option: value, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    names = sorted(k for k in values if k not in fields)
    if names and unknown == "error":
        raise RelaError(f"{source}: unknown option(s) {shorten(', '.join(names))} (python -m rela.train --help "
                        "lists them)")
    hints = typing.get_type_hints(Config)
    return {name: _coerce(source, name, value, hints[name]) for name, value in values.items() if name in fields}


def _coerce(source: str, name: str, value: Any, hint: Any) -> Any:
    """The value as the option's type: ints for floats, and numeric strings for floats (PyYAML reads `1e-4`,
    without a dot, as a string); anything else of the wrong type is an error naming the option."""
    allowed = [t for t in typing.get_args(hint)] or [hint]
    if value is None:
        if type(None) in allowed:
            return None
        raise RelaError(f"{source}: {name} cannot be null")
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
    raise RelaError(f"{source}: {name} must be {kind.__name__}, got {shorten(repr(value))}")


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
