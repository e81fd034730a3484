"""``mtcore sample``: a grid of generated images from a checkpoint."""

from __future__ import annotations

import argparse

from mtcore.cli.paths import out_file
from mtcore.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw generated images from a checkpoint",
                       description="Write a grid PNG of n generated images (optionally all of "
                       "one class) from the checkpoint's generative head. Without --label a "
                       "class-conditional head draws one row per class, titled by its name.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("-n", type=int, default=64, help="number of images (default: %(default)s)")
    p.add_argument("--out", default="samples.png", metavar="PNG")
    p.add_argument("--label", type=int, default=None, help="class to condition on")
    p.add_argument("--task", default=None, help="which generative task (default: the GAN)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore import api
    from mtcore.artifacts import save_grid

    if args.n < 1:
        raise ConfigError(f"-n: expected a positive number of images, got {args.n}")
    out_file(args.out, image=True)
    rows = api.sample_rows(args.checkpoint, args.n, label=args.label, task=args.task,
                           seed=args.seed)
    path = save_grid(rows, args.out)
    total = sum(len(v) for v in rows.values())
    print(f"wrote {total} samples to {path}" + (f" (rows: {', '.join(rows)})"
                                                if len(rows) <= 10 else ""))
    return 0
