"""A component that breaks its contract at run time gets a ContractError naming it and what it
returned, on the first step, instead of a KeyError, IndexError or ambiguous-bool error from
inside mtcore or a silent wrong result."""

from __future__ import annotations

import types

import pytest
import torch

import mtcore
from mtcore.errors import ContractError
from mtcore.plugin import (
    Backbone,
    BackboneSpec,
    BalancerSpec,
    FeatureInfo,
    HeadSpec,
    LossBalancer,
    TaskHead,
    hookimpl,
)
from mtcore.plugin_manager import default_manager
from mtcore.registry import Registry
from mtcore.trainer import Trainer

SMALL = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=16", "data.batch_size=8",
    "tasks.seg.enabled=false", "tasks.vae.enabled=false", "tasks.gan.enabled=false",
    'tasks.cls.head={name="classification", params={pool="avgmax"}}', "train.progress=false",
    'kernels="reference"',
]


class Tiny(Backbone):
    """Declares one map "f" with 8 channels; ``returns`` says what forward really gives."""

    def __init__(self, in_channels: int, returns: str = "right") -> None:
        super().__init__()
        self.feature_info = (FeatureInfo("f", 8, 1),)
        self.conv = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.returns = returns

    def forward(self, images):
        x = self.conv(images)
        if self.returns == "other_key":
            return {"g": x}
        if self.returns == "channels":
            return {"f": x[:, :5]}
        return {"f": x}


class Head(TaskHead):
    """A classification head whose ``mode`` breaks one part of the contract."""

    task_type = "classification"
    targets = ("label",)

    def __init__(self, features, info, loss=None, mode: str = "ok") -> None:
        super().__init__()
        self.fc = torch.nn.Linear(features[-1].channels, info.num_labels)
        self.mode = mode
        self.critic = torch.nn.Linear(3, 1)

    def auxiliary_parameters(self):
        if "aux" not in self.mode:
            return {}
        return {"critic" if self.mode == "aux_critic" else "discriminator":
                list(self.critic.parameters())}

    def auxiliary_loss(self, batch, step):  # the base class's signature
        loss = self.critic(batch["image"].mean((2, 3))).square().mean()
        return loss if self.mode == "aux_tensor" else {"loss": loss, "step": torch.tensor(step)}

    def forward(self, features, batch):
        logits = self.fc(features["f"].mean((2, 3)))
        return logits if self.mode == "tensor" else {"logits": logits}

    def compute_loss(self, outputs, batch):
        loss = torch.nn.functional.cross_entropy(outputs["logits"], batch["label"],
                                                 reduction="none")
        return loss if self.mode == "vector" else loss.mean()

    def new_metric(self):
        return Accuracy()


class Accuracy:
    def __init__(self) -> None:
        self.hits = self.n = 0

    def update(self, outputs, batch):
        self.hits += int((outputs["logits"].argmax(1) == batch["label"]).sum())
        self.n += len(batch["label"])

    def compute(self):
        return {"accuracy": self.hits / max(self.n, 1)}


class NoResult(LossBalancer):
    def backward(self, losses, shared, scale=None):
        sum(losses.values()).backward()  # forgets to return the BalanceResult


@pytest.fixture(scope="module")
def registry():
    pm = default_manager()
    mod = types.ModuleType("contracts")
    mod.mtcore_backbones = hookimpl(lambda: [BackboneSpec("tiny", Tiny, "test backbone")])
    mod.mtcore_heads = hookimpl(lambda: [HeadSpec("tiny_head", Head, "test head")])
    mod.mtcore_balancers = hookimpl(
        lambda: [BalancerSpec("no_result", NoResult, "test balancer")])
    pm.register(mod, "contracts")
    return Registry(pm)


def _step(registry, *overrides):
    exp = mtcore.build(None, [*SMALL, 'model.backbone={name="tiny", params={}}',
                              'tasks.cls.head={name="tiny_head", params={}}', *overrides],
                       registry=registry)
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    return trainer.train_step(batch)


def test_a_component_keeping_the_contract_trains(registry):
    logs = _step(registry)
    assert torch.isfinite(torch.tensor(logs["cls.loss"]))


def test_an_auxiliary_step_with_the_base_class_signature(registry):
    """TaskHead.auxiliary_loss(batch, step) is what the trainer calls (the base class said
    (features, batch, step), and a head written to it failed with a TypeError)."""
    logs = _step(registry, 'tasks.cls.head.params.mode="aux"')
    assert logs["cls.step"] == 0.0 and "cls.loss" in logs
    with pytest.raises(ContractError, match=r"task 'cls': Head.auxiliary_loss must return a dict "
                                            "with the key 'loss'"):
        _step(registry, 'tasks.cls.head.params.mode="aux_tensor"')


@pytest.mark.parametrize("returns,match", [
    ("other_key", r"backbone Tiny returned \['g'\] from forward, but its feature_info declares "
                  r"\['f'\]"),
    ("channels", r"backbone Tiny: feature map 'f' is \(8, 5, 16, 16\), but feature_info declares "
                 "8 channels"),
])
def test_a_backbone_returning_other_maps_than_it_declares(registry, returns, match):
    with pytest.raises(ContractError, match=match):
        _step(registry, f'model.backbone.params.returns="{returns}"')


def test_a_head_returning_a_tensor_instead_of_a_dict(registry):
    with pytest.raises(ContractError, match=r"head Head \(task 'cls'\) must return a dict of "
                                            "output tensors from forward, got Tensor"):
        _step(registry, 'tasks.cls.head.params.mode="tensor"')


def test_a_loss_that_is_not_a_scalar(registry):
    """It failed as "Boolean value of Tensor with more than one value is ambiguous"."""
    with pytest.raises(ContractError, match=r"task 'cls': Head.compute_loss must return a scalar "
                                            r"tensor \(reduce it, e.g. .mean\(\)\), got shape \(8,\)"):
        _step(registry, 'tasks.cls.head.params.mode="vector"')


def test_a_balancer_that_returns_no_result(registry):
    """It failed as "'NoneType' object has no attribute 'weights'"."""
    with pytest.raises(ContractError, match="balancer NoResult.backward must return a "
                                            "BalanceResult"):
        _step(registry, 'balancer={name="no_result", params={}}')


def test_the_epoch_line_shows_each_tasks_primary_metric():
    """A plugin task's primary metric is on the epoch line (it showed `val: ` and nothing for
    tasks other than the first-party ones); with no metric to show, the validation losses."""
    from mtcore.trainer import _headline

    class Scored(Head):
        primary_metric = ("mae", False)

    val = {"cov.mae": 0.25, "cov.loss": 2.0, "cov.bias": 3.0, "seg.miou": 0.5, "seg.loss": 1.0}
    assert _headline(val, {"cov": object.__new__(Scored)}) == {"cov.mae": 0.25, "seg.miou": 0.5}
    val = {"cov.bias": 3.0, "cov.loss": 2.0}
    assert _headline(val, {"cov": object.__new__(Head)}) == {"cov.loss": 2.0}


def test_a_run_with_in_process_plugins_evaluates_with_their_registry(registry, tmp_path):
    """evaluate/load/sample take the registry a run was built with (they had none, so a run of
    an in-process plugin could not be evaluated)."""
    from mtcore.errors import ComponentNotFoundError

    exp = mtcore.build(None, [*SMALL, 'model.backbone={name="tiny", params={}}', "optim.epochs=1",
                              'tasks.cls.head={name="tiny_head", params={}}',
                              "train.samples_every=0"], registry=registry)
    mtcore.fit(exp, tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    metrics = mtcore.evaluate(ckpt, "val", registry=registry)
    assert 0.0 <= metrics["cls.accuracy"] <= 1.0
    with pytest.raises(ComponentNotFoundError, match=r"model\.backbone\.name: unknown backbone"):
        mtcore.evaluate(ckpt, "val")


def test_a_plugins_own_auxiliary_group_takes_its_settings(registry):
    """optim.groups.<name> configures any head's auxiliary group (only `discriminator` was
    accepted); a name no part of the model has is a config error naming the groups."""
    from mtcore.errors import ConfigError

    def trainer(*overrides):
        exp = mtcore.build(None, [*SMALL, 'model.backbone={name="tiny", params={}}',
                                  'tasks.cls.head={name="tiny_head", params={mode="aux_critic"}}',
                                  *overrides], registry=registry)
        return Trainer(exp, None, progress=False, log=lambda _: None)

    opt = trainer("optim.groups.critic={lr=0.25}").aux[("cls", "critic")][0]
    assert opt.param_groups[0]["lr"] == 0.25
    with pytest.raises(ConfigError, match=r"optim\.groups\.critc: no parameter group of that "
                                          r"name\. Did you mean 'critic'\? Groups: backbone, "
                                          "balancer, critic"):
        trainer("optim.groups.critc={lr=0.25}")


def test_a_one_element_loss_counts_as_a_scalar(registry):
    """A loss of shape [1] (e.g. accumulated into torch.zeros(1)) trains as before."""
    class OneElement(Head):
        def compute_loss(self, outputs, batch):
            return super().compute_loss(outputs, batch).reshape(1)

    exp = mtcore.build(None, [*SMALL, 'model.backbone={name="tiny", params={}}',
                              'tasks.cls.head={name="tiny_head", params={}}'], registry=registry)
    exp.model.heads["cls"].__class__ = OneElement
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    logs = trainer.train_step(next(iter(trainer._loader(trainer.train_set, True))))
    assert torch.isfinite(torch.tensor(logs["cls.loss"]))
