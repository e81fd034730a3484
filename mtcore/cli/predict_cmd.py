"""``mtcore predict``: what a checkpoint's heads make of new images, written as files."""

from __future__ import annotations

import argparse

from mtcore.cli.paths import add_tasks_option, task_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict masks, labels and reconstructions for new images",
        description="Run a checkpoint on image files (or folders of them), each converted and "
        "resized to the model's input as its dataset was, and write into --out: "
        "<stem>.<task>.mask.png (an indexed PNG at the image's size: pixel value = class index), "
        "other images such as <stem>.<task>.reconstruction.png, predictions.csv (a row per image: "
        "each label's class, index and probability, and each per-image value) and classes.json "
        "(class names by index).")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a run's checkpoints/best.pt or last.pt")
    p.add_argument("--out", default="predictions", metavar="DIR",
                   help="output folder (default: %(default)s)")
    add_tasks_option(p)
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="images loaded and predicted at a time (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore.api import load
    from mtcore.errors import ConfigError
    from mtcore.predict import check_distinct_names, check_out_dir, image_files, predict_files

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive number, got {args.batch_size}")
    tasks = task_names(args.tasks)
    files = image_files(args.inputs)
    check_distinct_names(files)
    check_out_dir(args.out, files)
    trainer = load(args.checkpoint, splits=())
    preds, written = predict_files(trainer.model, trainer.exp.info, trainer.device, files,
                                   args.out, tasks=tasks, batch_size=args.batch_size,
                                   progress=True)
    what = ", ".join(f"{task}.{name} ({p.kind})" for task, by in preds.items()
                     for name, p in by.items())
    print(f"predicted {len(files)} image(s): {what}; wrote {written['masks']} mask(s), "
          f"{written['images']} image(s), predictions.csv and classes.json to {args.out}")
    return 0
