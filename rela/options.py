"""Where a run's options come from: the command line, --config FILE (YAML or JSON) and the layers below them;
--print-config.

Layers, lowest first (resolve_options, one loop): the dataclass default, the dataset's preset, the SSL
method's defaults, `--recipe reference` (with the method's own reference choices), the file, the flags.
Each option's source is the layer that set it last. A file holds options by their names (`batch_size` or
`batch-size`), the same values the command line takes. A run's own config.json is such a file: `--config
RUN/config.json --out NEW` repeats the run.

--print-config prints the resolved options with where each came from, as YAML that --config reads back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from rela.config import (METHOD_NAMES, PRESETS, REFERENCE_LR, REFERENCE_RECIPE, Config, shorten, validate,
                         value_type)
from rela.errors import RelaError
from rela.methods.registry import method_defaults, method_reference_recipe


def parse_config(argv: list[str] | None = None) -> Config:
    """The options from the command line, over --config FILE's; --print-config prints them with their sources
    and exits, as --help does."""
    args = vars(build_parser().parse_args(argv))
    config_file, print_config = args.pop("config"), args.pop("print_config")
    flags = {k: v for k, v in args.items() if v is not None}
    file_values = load_config_file(config_file) if config_file else {}
    cfg, sources = resolve_options(flags, file_values, config_file)
    if print_config:
        print(format_config(cfg, sources))
        raise SystemExit(0)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    """A flag per Config option (`--batch-size`, `--monitor/--no-monitor`), None when not given; then --config
    and --print-config."""
    parser = argparse.ArgumentParser(
        prog="python -m rela.train",
        description="Train a backbone with BYOL, accelerated by RELA (static targets from a frozen prior). "
                    "Options not given take the preset of the dataset (see --preset).",
        allow_abbrev=False)
    hints = typing.get_type_hints(Config)  # the annotations are strings (postponed evaluation)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": None, "help": f.metadata["help"], "dest": f.name}
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        kind = value_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, **kwargs)
        else:
            raise TypeError(f"Config.{f.name}: no command-line form for {hints[f.name]}")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="options from a YAML or JSON file (a run's config.json repeats it); flags override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved options and where each came from (default, preset, recipe, "
                             "file, flag), as YAML that --config reads, and exit")
    return parser


def resolve_config(given: dict[str, Any]) -> Config:
    """The options `given` in code (as flags) over the layers below them."""
    return resolve_options(given)[0]


def resolve_options(flags: dict[str, Any], file_values: dict[str, Any] | None = None,
                    file_name: str | None = None) -> tuple[Config, dict[str, str]]:
    """The resolved options, checked, and where each came from: the layers of option_layers applied in order,
    each over the ones before; an option's source is the last layer that set it ("default" if none did)."""
    values: dict[str, Any] = {}
    sources = {f.name: "default" for f in dataclasses.fields(Config)}
    for source, layer in option_layers(flags, file_values or {}, file_name):
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    cfg = Config(**values)
    validate(cfg)
    return cfg, sources


def option_layers(flags: dict[str, Any], file_values: dict[str, Any],
                  file_name: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(source, options) pairs, lowest first: the dataset's preset (named by --preset, or the dataset), the SSL
    method's own defaults for it, --recipe reference's choices, the file's, the flags'."""
    given = {**file_values, **flags}
    unknown = set(given) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise RelaError(f"unknown option(s): {', '.join(sorted(unknown))}")
    preset = given.get("preset") or given.get("dataset", Config.dataset)
    if preset not in PRESETS:
        raise RelaError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    method = given.get("method", Config.method)
    if method not in METHOD_NAMES:
        raise RelaError(f"unknown --method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    defaults = method_defaults(method, preset)
    layers = [(f"default (the dataset's: {preset})", {"preset": preset}),
              (f"preset {preset}", PRESETS[preset]),
              (f"method {method}", defaults)]
    if given.get("recipe") == "reference":
        sizes = {"batch_size": Config.batch_size, "image_size": Config.image_size, **PRESETS[preset], **defaults,
                 **given}
        layers.append(("recipe reference", reference_recipe(method, sizes["batch_size"], sizes["image_size"])))
    layers += [(f"file {file_name}", file_values), ("flag", flags)]
    return layers


def reference_recipe(method: str, batch_size: int, image_size: int) -> dict[str, Any]:
    """--recipe reference: the reference code's general choices, its absolute lr as --lr (per 256 images) at
    this batch size, blur off at 32 px and below, then the method's own reference choices (DINO's head)."""
    return {**REFERENCE_RECIPE, "lr": REFERENCE_LR * 256 / batch_size, "byol_blur": image_size > 32,
            **method_reference_recipe(method)}


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


def format_config(cfg: Config, sources: dict[str, str]) -> str:
    """The options as YAML, each with its source as a comment: --config reads the output back."""
    width = max(len(f.name) for f in dataclasses.fields(Config))
    lines = ["# resolved options of python -m rela.train (source: default, preset, method, recipe, file or flag)"]
    for f in dataclasses.fields(Config):
        value = json.dumps(getattr(cfg, f.name))  # JSON scalars are YAML scalars
        lines.append(f"{f.name + ':':<{width + 1}} {value:<24} # {sources[f.name]}")
    return "\n".join(lines)
