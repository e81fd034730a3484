"""``mtcore build-ext``: compile the C++ (and, with CUDA torch, CUDA) kernels ahead of time."""

from __future__ import annotations

import argparse

from mtcore.errors import MtcoreError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-ext", help="build the fused C++/CUDA kernels now (cached)",
                       description="Compile csrc/ with ninja into the kernel cache "
                       "($MTCORE_CACHE or ~/.cache/mtcore), so the first run does not wait.")
    p.add_argument("--verbose", action="store_true", help="show the compiler output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore import kernels
    from mtcore.kernels import _build

    try:
        path = kernels.build_extensions(verbose=args.verbose)
    except Exception as exc:  # the build reports compiler errors; keep them on one line
        raise MtcoreError(f"kernel build failed: {exc}") from exc
    if path is None:  # the build warned and fell back: as a command, that is a failure
        raise MtcoreError(f"kernel build failed: {_build.build_error()}"
                          + ("" if args.verbose else " (run `mtcore build-ext --verbose` for the "
                             "compiler log)"))
    print(f"kernels ready: {path}")
    return 0
