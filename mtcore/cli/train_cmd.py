"""``mtcore train``: build the experiment from the config and train it, writing a run folder."""

from __future__ import annotations

import argparse
import json

from mtcore.cli.config_cmd import add_config_args, overrides
from mtcore.cli.paths import out_folder
from mtcore.config import load_toml, resolve_config
from mtcore.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a multi-task model (default: the built-in shapes experiment)",
        description="Train from a config (default: shapes, U-Net backbone, segmentation + "
        "classification + VAE + GAN). Writes config.toml, metrics.jsonl, metrics.json, "
        "checkpoints/{last,best}.pt, samples/epoch_NNN.png and curves.png to --out.")
    add_config_args(p)
    p.add_argument("--out", default="runs/default", metavar="DIR", help="run folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoints/last.pt with DIR/config.toml")
    p.add_argument("--quiet", action="store_true", help="no progress bars (one line per epoch)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore.distributed import shutdown
    from mtcore.experiment import build_experiment
    from mtcore.trainer import Trainer

    out = out_folder(args.out)
    if args.resume:
        saved = out / "config.toml"
        if not saved.exists():
            raise ConfigError(f"--resume: {saved} does not exist; nothing to resume in {out}")
        if args.config or args.preset:
            raise ConfigError("--resume uses the run's own config.toml; drop --config/--preset")
        cfg = resolve_config(load_toml(saved), args.overrides)
    else:
        cfg = resolve_config(load_toml(args.config) if args.config else None, overrides(args))
    exp = build_experiment(cfg, resolved=True, restoring=args.resume)
    cfg = exp.config  # as the transfer strategy configured it (structure transfer: its backbone)
    try:
        trainer = Trainer(exp, out, progress=False if args.quiet else None)
        world = trainer.world  # under torchrun: one of several processes; the main one speaks
        where = (f"{world.size} processes x device {trainer.device.type}" if world.active
                 else f"device {exp.device}")
        trainer.log(f"mtcore train: {exp.info.name} {exp.info.image_size[0]}x"
                    f"{exp.info.image_size[1]}, backbone {cfg['model']['backbone']['name']}, "
                    f"tasks {', '.join(cfg['tasks'])}, balancer {cfg['balancer']['name']}, "
                    f"{where}, out {out}")
        result = trainer.fit(resume=args.resume)
        trainer.log(json.dumps(result["metrics"], indent=2))
    finally:
        shutdown()
    return 0
