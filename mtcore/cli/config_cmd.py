"""``mtcore config``: print the resolved config (defaults + file + --set) as TOML."""

from __future__ import annotations

import argparse

from mtcore.config import dumps, load_toml, preset_overrides, resolve_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config, --set and --preset, shared by every command that builds an experiment."""
    p.add_argument("--config", metavar="FILE", help="experiment TOML (default: the built-in one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.001; repeatable")
    p.add_argument("--preset", metavar="NAME", default=None,
                   help="a named set of overrides applied before --set, e.g. 'quality' "
                   "(mtcore/configs/presets.toml)")


def overrides(args: argparse.Namespace) -> list[str]:
    """The preset's overrides, then the --set ones."""
    return [*preset_overrides(getattr(args, "preset", None)), *args.overrides]


def resolved(args: argparse.Namespace) -> dict:
    return resolve_config(load_toml(args.config) if args.config else None, overrides(args))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved experiment config",
                       description="Print the config a run would use, after defaults, the file "
                       "and --set overrides, as TOML.")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore.experiment import build_transfer, configured
    from mtcore.registry import Registry

    cfg = resolved(args)  # as a run would use it: structure transfer puts in its backbone
    print(dumps(configured(build_transfer(Registry(), cfg), cfg)), end="")
    return 0
