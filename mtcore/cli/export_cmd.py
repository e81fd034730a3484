"""``mtcore export``: a checkpoint's predicting heads as one program a plain torch can run."""

from __future__ import annotations

import argparse

from mtcore.cli.paths import add_tasks_option, task_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint for deployment (a torch.export .pt2 program)",
        description="Write the checkpoint's predicting heads (masks, labels, reconstructions) as "
        "one torch.export program: images float [N, C, H, W] in [0, 1] in, a dict of named "
        "predictions out, any batch size, standard PyTorch ops only, so it runs without mtcore: "
        "torch.export.load(PATH).module()(images). The file also describes its input and "
        "outputs (class names included) in its extra file mtcore.json. The saved program is "
        "checked against the model before it is put in place.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a run's checkpoints/best.pt or last.pt")
    p.add_argument("--out", default="model.pt2", metavar="PT2",
                   help="the program's file, ending in .pt2 (default: %(default)s)")
    add_tasks_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtcore.api import export
    from mtcore.deploy import check_export_path

    tasks = task_names(args.tasks)
    out = check_export_path(args.out)  # before the checkpoint loads
    description = export(args.checkpoint, out, tasks=tasks)
    what = ", ".join(f"{key} ({o['dtype']} [{', '.join(map(str, o['shape']))}])"
                     for key, o in description["outputs"].items())
    shape = ", ".join(map(str, description["input"]["shape"]))
    print(f"exported {what} to {out} ({out.stat().st_size / 2**20:.1f} MiB); input float32 "
          f"[{shape}] in [0, 1]. Run it with torch alone: "
          f"torch.export.load({str(out)!r}).module()(images)")
    return 0
