"""Command-line options generated from the config dataclasses, so each option's default and help live once.

    @dataclass
    class ExtractConfig:
        dataset: str = option(help="a split folder")                  # no default: a required option
        batch_size: int = option(32, help="prompts per batch")
        mode: str = option("sequential", choices=("sequential", "parallel"))

    add_options(parser, ExtractConfig)          # --dataset, --batch-size, --mode, with defaults shown in --help
    cfg = from_args(ExtractConfig, args)

Every field becomes `--field-name`. A field with `option(cli=False)` (or no `option`) is not on the command line.
bool fields become `--x/--no-x`; `X | None` fields take an X. Rules about values (ranges, files) live in the
dataclass's `__post_init__`, so the Python API and the CLI refuse the same inputs with the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING

_KEY = "specalign_option"


def option(default=MISSING, *, help: str = "", choices=None, type=None, metavar=None, cli: bool = True,
           default_factory=MISSING, flag: str | None = None):  # fmt: skip
    """A dataclass field that is also a command-line option (`type`: a parser for str -> value)."""
    meta = {_KEY: {"help": help, "choices": choices, "type": type, "metavar": metavar, "cli": cli, "flag": flag}}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    meta = f.metadata.get(_KEY, {})
    return meta.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(hint):
    """(type, optional) of a field's annotation: `int | None` -> (int, True)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return hint, False


def add_options(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """Add one option per CLI field of `config_cls` (fields named in `skip` are left to the caller)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata.get(_KEY)
        if meta is None or not meta["cli"] or f.name in skip:
            continue
        kind, _ = _base_type(hints[f.name])
        kwargs = {"dest": f.name, "help": meta["help"] or None}
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        default = f.default if f.default is not MISSING else (f.default_factory() if has_default else None)
        if kind is bool:  # an off-by-default switch is `--x`; an on-by-default one also gets `--no-x`
            kwargs.update(action=argparse.BooleanOptionalAction if default else "store_true", default=bool(default))
        else:
            kwargs.update(type=meta["type"] or kind, default=default)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        if not has_default:
            kwargs["required"] = True
            kwargs.pop("default")
        parser.add_argument(flag_name(f), **kwargs)


def from_args(config_cls, args: argparse.Namespace, **overrides):
    """Build `config_cls` from parsed args (every field the parser has) plus `overrides`."""
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    given = {k: v for k, v in vars(args).items() if k in names}
    return config_cls(**{**given, **overrides})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default; leaves out "(default: None)" and the defaults of required options."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required or not action.option_strings:
            return action.help or ""
        return super()._get_help_string(action)


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480): the one spelling of a WIDTHxHEIGHT option."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected a positive WIDTHxHEIGHT, got {text!r}")
    return w, h
