"""``mtcore eval``: metrics of a checkpoint on a split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtcore.cli.paths import out_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Print every task's metrics on a split and write them to "
                       "--out (default: eval_<split>.json next to the checkpoint).")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--out", metavar="FILE", help="where to write the metrics JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore.api import evaluate

    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}.json"
    out = out_file(out)  # before the evaluation: a bad --out costs nothing
    metrics = evaluate(args.checkpoint, args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"written to {out}")
    return 0
