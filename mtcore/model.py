"""The multi-task model: one shared backbone and named task heads."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from mtcore.backbone import Backbone
from mtcore.errors import ContractError, IncompatibleComponentsError
from mtcore.heads import Batch, Outputs, TaskHead


class MultiTaskModel(nn.Module):
    """``forward(batch)`` runs the backbone once and every head on its features; a head that
    ``reads`` other tasks runs after them and gets their outputs (a task cascade)."""

    def __init__(self, backbone: Backbone, heads: Mapping[str, TaskHead]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        for name, head in self.heads.items():
            head.task_name = name
        for head in self.heads.values():
            head.link(dict(self.heads.items()))
            head.link_backbone(self.backbone)
        self._order = _run_order({name: tuple(h.reads) for name, h in self.heads.items()})
        self._checked = False

    def forward(self, batch: Batch, tasks: Collection[str] | None = None) -> dict[str, Outputs]:
        """Every head's outputs by task (config order); ``tasks``: only those, and the tasks
        they read."""
        order = self._order if tasks is None else self._needed(tasks)
        features = self.backbone(batch["image"])
        check = not self._checked and not torch.compiler.is_compiling()
        if check:
            self._check_features(features)
        out: dict[str, Outputs] = {}
        for name in order:
            head = self.heads[name]
            if head.reads:
                out[name] = head(features, batch, {k: out[k] for k in head.reads})
            else:
                out[name] = head(features, batch)
            if check and not isinstance(out[name], Mapping):
                raise ContractError(
                    f"head {type(head).__name__} (task {name!r}) must return a dict of output "
                    f"tensors from forward, got {type(out[name]).__name__}")
        if check:  # the contract holds: checked once (eagerly), out of the hot path
            self._checked = True
        return {name: out[name] for name in self.heads if name in out}  # config order

    def _needed(self, tasks: Collection[str]) -> list[str]:
        """``tasks`` and the tasks they read, in run order."""
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; the model's "
                             f"tasks: {', '.join(self.heads)}")
        need, todo = set(), list(tasks)
        while todo:
            name = todo.pop()
            if name not in need:
                need.add(name)
                todo.extend(self.heads[name].reads)
        return [name for name in self._order if name in need]

    def _check_features(self, features: object) -> None:
        """The backbone returns exactly the feature maps it declares, with their channels."""
        name = type(self.backbone).__name__
        declared = {f.name: f.channels for f in self.backbone.feature_info}
        if not isinstance(features, Mapping) or set(features) != set(declared):
            got = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise ContractError(
                f"backbone {name} returned {got} from forward, but its feature_info declares "
                f"{sorted(declared)}: return a dict with exactly those feature maps")
        for key, channels in declared.items():
            t = features[key]
            if not torch.is_tensor(t) or t.dim() < 2 or t.shape[1] != channels:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ContractError(
                    f"backbone {name}: feature map {key!r} is {shape}, but feature_info declares "
                    f"{channels} channels ([N, {channels}, H, W])")

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task shares (the backbone's) that currently train."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def auxiliary_parameter_ids(self) -> set[int]:
        return {id(p) for h in self.heads.values() for ps in h.auxiliary_parameters().values()
                for p in ps}

    def generative_heads(self) -> dict[str, TaskHead]:
        """Heads that can sample images: those overriding ``TaskHead.sample``."""
        out = {}
        for name, head in self.heads.items():
            if type(head).sample is not TaskHead.sample:
                out[name] = head
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, tasks: Collection[str] | None = None
                ) -> dict[str, Outputs]:
        """Inference on images alone (no targets needed); ``tasks`` as in ``forward``."""
        return self({"image": images}, tasks)


def _run_order(reads: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Task names so that every task comes after the tasks it reads (config order otherwise)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: being visited, 2: placed

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise IncompatibleComponentsError(
                "tasks read each other's outputs in a cycle: " + " -> ".join((*path, name)))
        if name not in reads:
            raise IncompatibleComponentsError(
                f"task {path[-1]!r} reads the outputs of task {name!r}, which does not exist; "
                f"tasks: {', '.join(reads)}")
        state[name] = 1
        for dep in reads[name]:
            visit(dep, (*path, name))
        state[name] = 2
        order.append(name)

    for name in reads:
        visit(name, ())
    return order
