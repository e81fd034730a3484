"""Builds an experiment from a config: config -> registries -> datasets, model, balancer, transfer.

This is the only place that turns names into objects; the trainer receives built objects.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from mtcore.augment import Augmentation
from mtcore.balancer import LossBalancer
from mtcore.config import resolve_config
from mtcore.data import DatasetInfo
from mtcore.errors import ConfigError, ContractError, IncompatibleComponentsError, MtcoreError
from mtcore.model import MultiTaskModel
from mtcore.registry import Registry
from mtcore.transfer import TransferStrategy


@dataclass
class Experiment:
    """Everything a run needs, built and wired, plus the resolved config it came from."""

    config: dict[str, Any]
    info: DatasetInfo
    model: MultiTaskModel
    balancer: LossBalancer
    transfer: TransferStrategy
    device: torch.device
    datasets: dict[str, Dataset] = field(default_factory=dict)
    registry: Registry | None = None
    augment: list[tuple[str, Augmentation]] = field(default_factory=list)  # (config key, it)


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but this torch has no CUDA device "
                          "(use device = \"auto\" or \"cpu\")")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' requested but MPS is not available")
    return torch.device(name)


def select_kernels(name: str) -> None:
    """Apply the ``kernels`` config key (the fused-kernel backend). ``"auto"``, the default, is
    no choice: it leaves ``$MTCORE_KERNELS`` in force (checked here, so a bad value fails the
    build with the variable's name rather than the first kernel call)."""
    from mtcore import kernels

    kernels.set_backend(None if name == "auto" else name)
    try:
        kernels.get_backend()
    except ValueError as exc:  # a bad $MTCORE_KERNELS: one line, as for the config key
        raise ConfigError(str(exc)) from None


def _component(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    return cfg["name"], dict(cfg.get("params", {}))


def build_transfer(registry: Registry, cfg: Mapping[str, Any]) -> TransferStrategy:
    name, params = _component(cfg["transfer"])
    return registry.build("transfer", name, params, key="transfer")


def configured(transfer: TransferStrategy, cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as the transfer strategy makes it (structure transfer: the checkpoint's
    backbone): what a run uses, and what ``mtcore config`` prints."""
    with _transfer_errors(cfg["transfer"]["name"]):
        return transfer.configure(cfg)


def build_dataset(registry: Registry, cfg: Mapping[str, Any], split: str) -> Dataset:
    name, params = _component(cfg["data"]["dataset"])
    ds = registry.build("dataset", name, params, split, key="data.dataset")
    if not isinstance(getattr(ds, "info", None), DatasetInfo):
        raise IncompatibleComponentsError(
            f"dataset {name!r} returned {type(ds).__name__} without an `info: DatasetInfo`")
    return ds


def build_augmentations(registry: Registry, cfg: Mapping[str, Any], info: DatasetInfo
                        ) -> list[tuple[str, Augmentation]]:
    """``data.augment``'s augmentations in order, each with its config key."""
    out = []
    for i, item in enumerate(cfg["data"].get("augment", [])):
        key = f"data.augment[{i}]"
        name, params = _component(item)
        aug = registry.build("augment", name, params, key=key)
        if not isinstance(aug, Augmentation):
            raise ContractError(f"{key} ({name!r}): the factory must return an "
                                f"mtcore.plugin.Augmentation, got {type(aug).__name__}")
        aug.ignore_index = info.ignore_index
        out.append((key, aug))
    return out


def build_model(registry: Registry, cfg: Mapping[str, Any], info: DatasetInfo) -> MultiTaskModel:
    """Backbone, then each task's loss and head (checked against each other and the backbone)."""
    name, params = _component(cfg["model"]["backbone"])
    backbone = registry.build("backbone", name, params, info.channels, key="model.backbone")
    heads = {}
    for task, tcfg in cfg["tasks"].items():
        hname, hparams = _component(tcfg["head"])
        hspec = registry.spec("head", hname, key=f"tasks.{task}.head")
        loss = None
        if "loss" in tcfg:
            lname, lparams = _component(tcfg["loss"])
            lspec = registry.spec("loss", lname, key=f"tasks.{task}.loss")
            if lspec.task_type and hspec.task_type and lspec.task_type != hspec.task_type:
                fits = [n for n in registry.names("loss")
                        if registry.spec("loss", n).task_type == hspec.task_type]
                raise IncompatibleComponentsError(
                    f"tasks.{task}.loss: loss {lname!r} is for {lspec.task_type!r} heads but head "
                    f"{hname!r} is a {hspec.task_type!r} head; losses that fit: {', '.join(fits)}")
            loss = registry.build("loss", lname, lparams, key=f"tasks.{task}.loss")
        try:
            heads[task] = registry.build("head", hname, hparams, key=f"tasks.{task}.head",
                                         features=backbone.feature_info, info=info, loss=loss)
        except IncompatibleComponentsError as exc:
            raise IncompatibleComponentsError(f"tasks.{task}.head ({hname!r}): {exc}") from None
    return MultiTaskModel(backbone, heads)


def build_experiment(config: Mapping[str, Any] | None = None, overrides: list[str] = (), *,
                     registry: Registry | None = None, splits: tuple[str, ...] | None = None,
                     resolved: bool = False, restoring: bool = False,
                     info: DatasetInfo | None = None) -> Experiment:
    """Build everything from a config dict (merged over the defaults unless ``resolved``).

    ``restoring``: the config is a run's saved one and its weights will come from that run's
    checkpoint (eval, sample, resume), so the transfer strategy's ``configure`` (already applied
    to the saved config) and ``setup`` (loading the source weights) are skipped: a transferred run
    stays usable when its source checkpoint has moved or gone. ``info``: the dataset's facts (a
    checkpoint keeps them), so that with no ``splits`` no dataset is built at all: a model
    predicts and samples where its training data is not.
    """
    cfg = dict(config) if resolved and config is not None else resolve_config(config, list(overrides))
    registry = registry or Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        select_kernels(cfg["kernels"])
    transfer = build_transfer(registry, cfg)
    tname = cfg["transfer"]["name"]
    if not restoring:
        cfg = configured(transfer, cfg)
    torch.manual_seed(cfg["seed"])
    splits = splits if splits is not None else ("train", cfg["data"]["val_split"])
    datasets = {s: build_dataset(registry, cfg, s) for s in splits}
    if datasets:
        info = next(iter(datasets.values())).info
    elif info is None:
        info = build_dataset(registry, cfg, cfg["data"]["val_split"]).info
    model = build_model(registry, cfg, info)
    augment = build_augmentations(registry, cfg, info)
    bname, bparams = _component(cfg["balancer"])
    balancer = registry.build("balancer", bname, bparams, list(cfg["tasks"]), key="balancer")
    if not restoring:
        with _transfer_errors(tname):
            transfer.setup(model)
    device = pick_device(cfg["device"])
    return Experiment(config=cfg, info=info, model=model, balancer=balancer, transfer=transfer,
                      device=device, datasets=datasets, registry=registry, augment=augment)


@contextlib.contextmanager
def _transfer_errors(name: str) -> Iterator[None]:
    """A strategy rejecting the config or the model in ``configure``/``setup``: one line naming
    the ``transfer`` key, as a parameter error at build time is."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if isinstance(exc, MtcoreError):
            raise
        raise ConfigError(f"transfer ({name!r}): {exc}") from exc
