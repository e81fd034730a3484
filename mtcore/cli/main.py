"""Entry point of the ``mtcore`` command: global options, command dispatch and error reporting.

User errors (``MtcoreError``) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from mtcore import __version__
from mtcore.errors import MtcoreError

#: command name -> module under mtcore.cli exposing ``add_parser(subparsers)`` and ``run(args)``.
COMMANDS = {
    "plugins": "mtcore.cli.plugins_cmd",
    "config": "mtcore.cli.config_cmd",
    "train": "mtcore.cli.train_cmd",
    "eval": "mtcore.cli.eval_cmd",
    "sample": "mtcore.cli.sample_cmd",
    "predict": "mtcore.cli.predict_cmd",
    "export": "mtcore.cli.export_cmd",
    "build-ext": "mtcore.cli.build_ext_cmd",
    "bench": "mtcore.cli.bench_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtcore",
        description="Multi-task vision learning: one backbone, many heads, pluggable everything.",
    )
    parser.add_argument("--version", action="version", version=f"mtcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument(
        "--disable-plugin", action="append", default=[], metavar="NAME",
        help="do not load this plugin (entry-point or distribution name); repeatable. "
        "Same as MTCORE_DISABLE_PLUGINS=a,b. Built-in plugins cannot be disabled.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; an option the command does not know is reported with that command's usage
    (``mtcore bench --json``), not the top level's."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        owner = sub.choices.get(args.command, parser) if args.command else parser
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.disable_plugin:
        existing = os.environ.get("MTCORE_DISABLE_PLUGINS", "")
        os.environ["MTCORE_DISABLE_PLUGINS"] = ",".join(filter(None, [existing, *args.disable_plugin]))
    if not args.debug:
        warnings.formatwarning = lambda m, c, *a, **k: f"warning: {m}\n"
    try:
        return int(args.func(args) or 0)
    except MtcoreError as exc:
        if args.debug:
            raise
        print(f"mtcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
