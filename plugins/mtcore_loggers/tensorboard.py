"""TensorBoard: every record's numbers as scalars ``<split>/<metric>`` by epoch, the sample grids
as images, the resolved config as text; event files in ``<run>/tensorboard`` by default."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mtcore.plugin import RunLogger


class TensorBoardLogger(RunLogger):
    """Writes through ``torch.utils.tensorboard`` (the ``tensorboard`` package:
    ``pip install "mtcore[tensorboard]"``). ``log_dir``: where the event files go (default: the
    run's ``tensorboard/`` folder); ``flush_secs``: how often they are written out."""

    def __init__(self, log_dir: str | None = None, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("the tensorboard logger needs the tensorboard package: "
                             "pip install \"mtcore[tensorboard]\" (or tensorboard)") from err
        if log_dir is not None and (not isinstance(log_dir, str) or not log_dir):
            raise ValueError(f"log_dir must be a folder path, got {log_dir!r}")
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, int) or flush_secs < 1:
            raise ValueError(f"flush_secs must be an integer >= 1, got {flush_secs!r}")
        self._writer_cls, self.log_dir, self.flush_secs = SummaryWriter, log_dir, flush_secs
        self.writer = None

    def start(self, out_dir: Path | None, config: Mapping[str, Any], epoch: int) -> None:
        if self.log_dir is None and out_dir is None:
            raise ValueError("the tensorboard logger needs a folder: give the run an output "
                             "folder or the logger params.log_dir")
        where = Path(self.log_dir) if self.log_dir is not None else Path(out_dir) / "tensorboard"
        # a resumed run: what an interrupted attempt logged after the checkpoint is dropped; a
        # fresh run: everything an earlier run logged into this folder
        self.writer = self._writer_cls(str(where), purge_step=epoch + 1 if epoch else 0,
                                       flush_secs=self.flush_secs)
        if epoch == 0:
            text = json.dumps(config, indent=2, default=str)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def log(self, row: Mapping[str, Any]) -> None:
        epoch, split = int(row["epoch"]), row["split"]
        for key, value in row.items():
            if key in ("epoch", "split") or isinstance(value, bool) or not isinstance(
                    value, int | float):
                continue  # the training row's stage name
            self.writer.add_scalar(f"{split}/{key}", float(value), epoch)

    def log_image(self, name: str, image: np.ndarray, epoch: int) -> None:
        self.writer.add_image(name, image, epoch, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
