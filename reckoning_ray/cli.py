"""The command lines' shared parsing (``python -m reckoning_ray.train`` and ``tune``).

    python -m reckoning_ray.<command> [preset | --config FILE] [key=value ...] [--print-config]
    python -m reckoning_ray.<command> --help-config [GROUP]

:func:`parse_args` reads a preset or a saved config, the ``key=value`` overrides and the options
every command shares; ``--help-config`` prints every config key (or one group's) with its type,
default and documentation, read from the schema (:mod:`reckoning_ray.core.schema`).
:func:`run_command` loads and validates the config and runs the command's job (exit status 2 on an
input error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import typing
from enum import Enum
from typing import Any, Callable, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf

from reckoning_ray.core.config import available_presets, load_config, to_yaml
from reckoning_ray.core.errors import ConfigError, InputError
from reckoning_ray.core.schema import DOC, Choice, Config

WIDTH = 100  # --help-config wraps the documentation to this many columns


def config_groups(cls: type = Config, prefix: str = "") -> list[tuple[str, type]]:
    """``[("model", ModelConfig), ("data", DataConfig), ("data.generator", GeneratorConfig), ...]``:
    every config group (a dataclass field of a dataclass type), in schema order, read from
    :class:`Config` so that it follows the schema."""
    rows = []
    for f in dataclasses.fields(cls):
        kind = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            rows.append((f"{prefix}{f.name}", kind))
            rows.extend(config_groups(kind, f"{prefix}{f.name}."))
    return rows


def type_text(kind: Any) -> str:
    """A key's type as ``--help-config`` shows it: ``int``, ``int or null``, ``list of int``,
    ``adamw | sgd`` (a closed set of values), ..."""
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{type_text(rest[0])} or null"
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"dict of {type_text(args[0])} to {type_text(args[1])}"
    if isinstance(kind, type) and issubclass(kind, Choice):
        return " | ".join(kind.values())
    return getattr(kind, "__name__", str(kind))


def value_text(value: Any) -> str:
    """A default as it is written in an override (``key=<value>``) or a YAML config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, str):  # quoted where YAML would read another value (yes: true, "": null)
        return value if value and _reads_back(value) else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _reads_back(text: str) -> bool:
    try:
        return OmegaConf.from_dotlist([f"key={text}"])["key"] == text
    except Exception:  # not valid YAML on its own
        return False


def config_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, doc)`` of every key of config dataclass ``cls`` (not its groups),
    keys prefixed with ``prefix``; the default as :func:`value_text` writes it."""
    hints, defaults = get_type_hints(cls), cls()
    return [(f"{prefix}{f.name}", type_text(hints[f.name]), value_text(getattr(defaults, f.name)),
             f.metadata.get(DOC, ""))
            for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]


def _summary(cls: type) -> str:
    """The first sentence of a config group's docstring."""
    text = " ".join((cls.__doc__ or "").split())
    return text.split(". ")[0].rstrip(".")


def config_help(group: Optional[str] = None) -> str:
    """``--help-config [GROUP]``: every key of the schema (or of ``group`` and its subgroups) as
    ``key: type = default`` and its documentation. ConfigError for an unknown group."""
    groups = config_groups()
    if group is not None:
        group = group.removesuffix(".*").strip(".")
        if group not in dict(groups):
            raise ConfigError(f"--help-config: unknown config group {group!r}; choose one of "
                              f"{', '.join(name for name, _ in groups)} (or none for every key)")
    sections = [(name, cls) for name, cls in groups if group is None or name == group or name.startswith(group + ".")]
    out = []
    if group is None:
        out += ["config keys as `key: type = default` and what each means. Set any of them in a preset or",
                "--config file, or override it on the command line with key=value (e.g. train.epochs=2).", ""]
        out += _key_lines(config_keys(Config), indent="")
    for name, cls in sections:
        out += textwrap.wrap(" ".join((cls.__doc__ or "").split()), WIDTH, initial_indent=f"{name}.*  ",
                             subsequent_indent="    ")
        out += _key_lines(config_keys(cls, f"{name}."), indent="  ")
    return "\n".join(out).rstrip() + "\n"


def _key_lines(keys: list[tuple[str, str, str, str]], indent: str) -> list[str]:
    lines = []
    for key, kind, default, text in keys:
        lines.append(f"{indent}{key}: {kind} = {default}")
        lines += textwrap.wrap(text, WIDTH, initial_indent=indent + "    ", subsequent_indent=indent + "    ")
    return lines + [""]


class _HelpConfig(argparse.Action):
    """``--help-config [GROUP]``: print :func:`config_help` and exit, as ``--help`` does (exit
    status 2, naming the groups, for an unknown group)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        try:
            text = config_help(values or None)
        except ConfigError as exc:
            parser.exit(2, f"error: {exc}\n")
        print(text, end="")
        parser.exit(0)


def config_groups_help() -> str:
    """The ``--help`` block naming each config group, with a pointer to ``--help-config``."""
    rows = [(f"{name}.*", _summary(cls)) for name, cls in config_groups()]
    width = max(len(key) for key, _ in rows) + 2
    lines = ["config groups (--help-config GROUP lists a group's keys with their types, defaults and meanings):"]
    for key, summary in rows:
        lines += textwrap.wrap(summary, WIDTH, initial_indent=f"  {key:<{width}}",
                               subsequent_indent=" " * (width + 2))
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]], prog: str, description: str, epilog: str,
               extra: Optional[Callable[[argparse.ArgumentParser], Any]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog=epilog.format(presets=", ".join(available_presets())) + "\n" + config_groups_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("preset", nargs="?", default=None,
                        help="preset name or YAML config path (default: embedded)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--config", default=None, help="a saved config YAML (e.g. best_config.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (preset or --config, then overrides, validated) as "
                             "YAML and exit, starting nothing; the output is a valid --config file")
    parser.add_argument("--help-config", nargs="?", const="", default=None, metavar="GROUP", action=_HelpConfig,
                        help="print every config key (or GROUP's, e.g. inner) with its type, default and meaning, "
                             "and exit")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.preset is not None and "=" in args.preset:  # first positional was an override
        args.overrides.insert(0, args.preset)
        args.preset = None
    if args.config is not None:
        if args.preset is not None:
            parser.error("give either a preset or --config, not both")
        args.preset = args.config
    return args


def run_command(args: argparse.Namespace, job: Callable[[DictConfig], Any],
                check: Optional[Callable[[DictConfig], Any]] = None) -> int:
    """Load the config of ``args``, print it, run ``job(cfg)``; exit status 2 with the message of
    any :class:`ConfigError` (bad key, value or file, before or during the run), else 0.

    ``--print-config``: load and validate the config the same way, run ``check(cfg)`` (the
    command's own checks that need no work, e.g. a sweep's search space), print the resolved YAML
    and return 0 without running ``job``.
    """
    try:
        cfg = load_config(args.preset, args.overrides)
        if getattr(args, "print_config", False):
            if check is not None:
                check(cfg)
            print(to_yaml(cfg), end="")
            return 0
        print(OmegaConf.to_yaml(cfg))
        job(cfg)
    except InputError as exc:  # config, data, model, checkpoint: the same every time
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
