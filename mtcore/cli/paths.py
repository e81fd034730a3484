"""The CLI's shared options: checks of output paths, made before any work so a bad --out costs
nothing, and the --tasks list of the commands that run a checkpoint's heads."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from mtcore.errors import ConfigError


def out_folder(path: str | Path) -> Path:
    """A run or output folder: not a file, and no file on the way to it."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {out}: {p} is a file; give a folder")
    return out


def out_file(path: str | Path, image: bool = False) -> Path:
    """A file to write: not a folder, its folder creatable; ``image``: a format Pillow writes,
    by its extension."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name")
    if image:
        Image.init()
        fmt = Image.registered_extensions().get(out.suffix.lower())
        if fmt is None or fmt not in Image.SAVE:
            raise ConfigError(f"--out {out}: not an image file name Pillow can write; end it in "
                              ".png, .jpg or .webp")
    out_folder(out.parent)
    return out


def add_tasks_option(p: argparse.ArgumentParser) -> None:
    """``--tasks A,B``: only these tasks of the checkpoint."""
    p.add_argument("--tasks", default=None, metavar="A,B",
                   help="only these tasks (default: every task that predicts from an image)")


def task_names(value: str | None) -> list[str] | None:
    """``--tasks``'s names (None: not given)."""
    return [t.strip() for t in value.split(",") if t.strip()] if value else None
