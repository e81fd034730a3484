"""Which validation metric picks ``best.pt`` and stops a run early (``train.monitor``,
``train.monitor_mode``, ``train.patience``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mtcore.errors import ConfigError
from mtcore.heads import TaskHead
from mtcore.registry import suggest

MODES = ("auto", "max", "min")
# metric names (after the task's "name.") whose lower values are better, for monitor_mode "auto"
LOWER_IS_BETTER = ("loss", "fid", "kid", "mse", "nll")


@dataclass(frozen=True)
class Monitor:
    """A validation metric ``key`` (e.g. ``"seg.miou"``) and whether higher is better (None:
    not known, an error once the metric is known to exist); ``key`` None: the mean of the tasks'
    validation losses, lower is better (a run whose heads have no metric)."""

    key: str | None
    higher_is_better: bool | None = True

    @classmethod
    def from_config(cls, train_cfg: Mapping[str, Any], heads: Mapping[str, TaskHead]) -> Monitor:
        """``train.monitor`` ("" = the first task's primary metric) and ``train.monitor_mode``
        ("auto": the head's own direction for its primary metric, lower for losses and FID; any
        other metric needs "max" or "min", which :meth:`check` says)."""
        key, mode = train_cfg.get("monitor", ""), train_cfg.get("monitor_mode", "auto")
        if not key:
            for name, head in heads.items():
                if head.primary_metric:
                    metric, higher = head.primary_metric
                    return cls(f"{name}.{metric}", higher if mode == "auto" else mode == "max")
            return cls(None, False)
        task, _, metric = key.partition(".")
        if task not in heads or not metric:
            raise ConfigError(f"train.monitor: {key!r} is not TASK.METRIC of this run's tasks "
                              f"({', '.join(heads)}), e.g. {_example(heads)!r}")
        if mode != "auto":
            return cls(key, mode == "max")
        primary = heads[task].primary_metric
        if primary and primary[0] == metric:
            return cls(key, primary[1])
        if metric.split(".")[-1].lower().endswith(LOWER_IS_BETTER):
            return cls(key, False)
        return cls(key, None)

    @property
    def name(self) -> str:
        return self.key or "mean validation loss"

    def score(self, val: Mapping[str, Any]) -> float | None:
        """Higher is better: the metric, negated when lower is better; None without a finite
        value (a NaN never counts as the best)."""
        if self.key is None:
            losses = [v for k, v in val.items() if k.endswith(".loss")]
            value = sum(losses) / len(losses) if losses else None
        else:
            value = val.get(self.key)
            if value is not None:
                self._check_direction()
        if value is None or not math.isfinite(value):
            return None
        return float(value) if self.higher_is_better else -float(value)

    def check(self, val: Mapping[str, Any], hint: str = "") -> None:
        """Refuse a monitored metric that a validation result ``val`` lacks (``hint`` says why
        it may be missing), or whose direction is not known."""
        if self.key is None:
            return
        if self.key not in val:
            same = [k for k in val if k.lower() == self.key.lower()]  # only the case differs
            close = f" Did you mean {same[0]!r}?" if same else suggest(self.key, list(val))
            raise ConfigError(f"train.monitor: the validation metrics have no {self.key!r}"
                              f"{hint}.{close} They are {', '.join(sorted(val))}")
        self._check_direction()

    def _check_direction(self) -> None:
        if self.higher_is_better is None:
            raise ConfigError(f"train.monitor_mode: say \"max\" or \"min\" for {self.key!r} "
                              "(\"auto\" knows each task's primary metric and that losses and FID "
                              "go down)")

    def best(self, history: Iterable[Mapping[str, Any]], split: str
             ) -> tuple[float | None, int | None, int]:
        """Over the ``split`` rows of a run's history: the best score, the epoch it came at, and
        how many evaluations came after it without beating it (what ``train.patience`` counts;
        one that measured a NaN counts too)."""
        best, epoch, since = None, None, 0
        for row in history:
            if row.get("split") != split:
                continue
            val = {k: v for k, v in row.items() if k not in ("epoch", "split")}
            s = self.score(val)
            if s is None:
                measured = self.key in val if self.key else any(k.endswith(".loss") for k in val)
                since += best is not None and measured
                continue
            if best is None or s > best:
                best, epoch, since = s, row.get("epoch"), 0
            else:
                since += 1
        return best, epoch, since

    def value(self, score: float | None) -> float | None:
        """The metric's own value for a score (undoing the sign for lower-is-better; the mean
        validation loss for ``key`` None)."""
        if score is None:
            return None
        return score if self.higher_is_better else -score


def _example(heads: Mapping[str, TaskHead]) -> str:
    for name, head in heads.items():
        if head.primary_metric:
            return f"{name}.{head.primary_metric[0]}"
    return f"{next(iter(heads), 'task')}.loss"
