"""``mtcore bench``: time every kernel backend against eager PyTorch and print the table."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the fused kernels against PyTorch",
                       description="Time each op (reference eager, torch.compile of the "
                       "reference, and every available backend): forward, backward and both; "
                       "median and spread; peak memory; fraction of the bandwidth floor.")
    p.add_argument("--ops", nargs="*", default=None, help="only these ops")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore.kernels import bench

    return bench.main(ops=args.ops, quick=args.quick, markdown=args.markdown)
