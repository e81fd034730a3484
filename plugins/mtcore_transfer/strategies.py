"""First-party transfer strategies: from scratch, parameter, feature and structure transfer, and
staged schedules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mtcore.plugin import Stage, TransferStrategy, load_checkpoint, load_model_weights


class FromScratch(TransferStrategy):
    """Random initialisation; everything trains."""


class FineTune(TransferStrategy):
    """Parameter transfer: load weights from an mtcore checkpoint, then train (optionally with the
    backbone frozen for the first ``freeze_epochs`` epochs; a smaller backbone LR after is
    ``optim.groups.backbone.lr``).

    ``parts`` selects what to load: "backbone" (default) or "all" (the whole model: with
    ``strict`` (default) the source must have the same tasks and heads; ``strict=false`` loads the
    keys both have (their shapes must agree) and leaves the rest fresh).
    """

    def __init__(self, checkpoint: str, parts: str = "backbone", freeze_epochs: int = 0,
                 strict: bool = True) -> None:
        _check_path(checkpoint)
        if parts not in ("backbone", "all"):
            raise ValueError(f"transfer.params.parts: expected 'backbone' or 'all', got {parts!r}")
        if isinstance(freeze_epochs, bool) or not isinstance(freeze_epochs, int) or freeze_epochs < 0:
            raise ValueError("transfer.params.freeze_epochs: expected an integer >= 0, got "
                             f"{freeze_epochs!r}")
        if not isinstance(strict, bool):
            raise ValueError(f"transfer.params.strict: expected true or false, got {strict!r}")
        self.path, self.parts, self.freeze_epochs, self.strict = checkpoint, parts, freeze_epochs, strict

    def setup(self, model: nn.Module) -> None:
        state = load_checkpoint(self.path)["model"]
        if self.parts == "backbone":
            loaded = load_model_weights(model.backbone, state, self.path, prefix="backbone.",
                                        strict=self.strict)
        else:
            loaded = load_model_weights(model, state, self.path, strict=self.strict)
        if not loaded:  # strict=false between unrelated architectures: nothing would transfer
            raise ValueError(f"transfer.params.checkpoint: {self.path} shares no parameter (name "
                             f"and shape) with this model's {self.parts}; nothing would load")

    def stage(self, epoch: int) -> Stage:
        if epoch < self.freeze_epochs:
            return Stage("frozen-backbone", freeze=("backbone",))
        return Stage("finetune")


class FeatureTransfer(FineTune):
    """Feature transfer: pretrained backbone weights, frozen for the whole run; only heads train."""

    def __init__(self, checkpoint: str, strict: bool = True) -> None:
        super().__init__(checkpoint, parts="backbone", strict=strict)

    def stage(self, epoch: int) -> Stage:
        return Stage("frozen-features", freeze=("backbone",))


class StructureTransfer(TransferStrategy):
    """Structure transfer: reuse the backbone architecture (name and params) recorded in a
    checkpoint's config, with fresh weights."""

    def __init__(self, checkpoint: str) -> None:
        self.path = _check_path(checkpoint)

    def configure(self, config: dict[str, Any]) -> dict[str, Any]:
        src = load_checkpoint(self.path, require=("config",))["config"]["model"]["backbone"]
        return {**config, "model": {**config["model"], "backbone": dict(src)}}


class Staged(TransferStrategy):
    """A schedule of stages, by default: pretrain the heads on a frozen backbone, each on its own
    loss (no balancer); then train them jointly (the balancer's combination), the backbone still
    frozen; then unfreeze end to end with a smaller LR. ``stages`` is a list of tables
    ``{name, epochs, freeze = [module prefixes], lr_scale, tasks = [task names], balance}``
    (``tasks``: only these tasks train, the other heads frozen; ``balance = false``: the plain sum
    of the losses, the default when ``tasks`` is given); the last stage lasts to the end.
    Optionally starts from a checkpoint's backbone (``checkpoint``)."""

    DEFAULT = (
        {"name": "heads", "epochs": 2, "freeze": ["backbone"], "lr_scale": 1.0, "balance": False},
        {"name": "joint", "epochs": 2, "freeze": ["backbone"], "lr_scale": 1.0},
        {"name": "end-to-end", "epochs": 1, "freeze": [], "lr_scale": 0.3},
    )
    KEYS = ("name", "epochs", "freeze", "lr_scale", "tasks", "balance")

    def __init__(self, stages: Sequence[Mapping[str, Any]] = DEFAULT,
                 checkpoint: str | None = None) -> None:
        if isinstance(stages, Mapping | str) or not isinstance(stages, Sequence) or not stages:
            raise ValueError("transfer.params.stages: expected a non-empty list of stage tables "
                             f"[{{name, epochs, ...}}, ...], got {stages!r}")
        if checkpoint is not None:
            _check_path(checkpoint)
        self.stages: list[Stage] = []
        self.ends: list[int] = []
        end = 0
        for i, s in enumerate(stages):
            where = f"transfer.params.stages[{i}]"
            if not isinstance(s, Mapping):
                raise ValueError(f"{where}: expected a table {{name, epochs, ...}}, got {s!r}")
            unknown = set(s) - set(self.KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected "
                                 + ", ".join(self.KEYS))
            epochs = s.get("epochs", 1)
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ValueError(f"{where}.epochs: expected an integer >= 1, got {epochs!r}")
            freeze = s.get("freeze", ())
            if not isinstance(freeze, list | tuple) or not all(isinstance(f, str) and f
                                                                 for f in freeze):
                raise ValueError(f"{where}.freeze: expected a list of module prefixes (e.g. "
                                 f"[\"backbone\"]), got {freeze!r}")
            lr_scale = s.get("lr_scale", 1.0)
            if isinstance(lr_scale, bool) or not isinstance(lr_scale, int | float) or not (
                    0 <= lr_scale < float("inf")):
                raise ValueError(f"{where}.lr_scale: expected a number >= 0, got {lr_scale!r}")
            tasks = s.get("tasks")
            if tasks is not None and (isinstance(tasks, str) or not tasks
                                      or not all(isinstance(t, str) for t in tasks)):
                raise ValueError(f"{where}.tasks: expected a non-empty list of task names, "
                                 f"got {tasks!r}")
            balance = s.get("balance", tasks is None)
            if not isinstance(balance, bool):
                raise ValueError(f"{where}.balance: expected true or false, got {balance!r}")
            end += epochs
            self.ends.append(end)
            self.stages.append(Stage(str(s.get("name", f"stage{i + 1}")), tuple(freeze),
                                     float(lr_scale), tasks=tasks, balance=balance))
        self.checkpoint = checkpoint

    def setup(self, model: nn.Module) -> None:
        for st in self.stages:
            for prefix in st.freeze:
                try:
                    model.get_submodule(prefix)
                except AttributeError:
                    raise ValueError(f"transfer.params.stages: {st.name!r} freezes {prefix!r}, "
                                     "which is not a module of the model (e.g. 'backbone', "
                                     "'heads.seg')") from None
            problem = st.task_problem(list(getattr(model, "heads", {})))
            if problem:
                raise ValueError(f"transfer.params.stages: {problem}")
        if self.checkpoint:
            FineTune(self.checkpoint).setup(model)

    def stage(self, epoch: int) -> Stage:
        for st, end in zip(self.stages, self.ends, strict=True):
            if epoch < end:
                return st
        return self.stages[-1]


def _check_path(checkpoint: object) -> str:
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError("transfer.params.checkpoint: expected the path of an mtcore checkpoint "
                         f"(a string), got {checkpoint!r}")
    return checkpoint
