"""Run loggers: components that receive a run's records as the trainer writes them (config key
``loggers``), to send them to TensorBoard or an experiment tracker."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


class RunLogger:
    """Base class of run loggers. The trainer calls :meth:`start` once before its first record,
    :meth:`log` with every record (the rows of ``metrics.jsonl``), :meth:`log_image` with every
    sample grid it writes, and :meth:`close` when the run ends, however it ends."""

    def start(self, out_dir: Path | None, config: Mapping[str, Any], epoch: int) -> None:
        """The run begins: its output folder (None for a run that writes none), its resolved
        config, and the epoch it starts from (above 0 when it resumes: records of later epochs
        from an interrupted attempt are stale)."""

    def log(self, row: Mapping[str, Any]) -> None:
        """One record: ``epoch`` (int), ``split`` ("train", the validation split, or "init" for
        the untrained generator's metrics) and the metrics by name (numbers; the training row's
        ``stage`` is a string)."""

    def log_image(self, name: str, image: np.ndarray, epoch: int) -> None:
        """An image the run wrote (``name`` "samples": the epoch's sample grid), uint8 [H, W, 3]."""

    def close(self) -> None:
        """The run ended (finished, stopped early, or failed): flush and release."""

