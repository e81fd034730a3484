"""DWA and RLW: the weights by hand, their schedule over epochs / steps, the saved state, and
DWA fed by the trainer's epoch means."""

from __future__ import annotations

import math

import pytest
import torch
from toy_multitask import TASKS, Toy, grads_of

import mtcore
from mtcore.trainer import Trainer
from mtcore_balancers.dwa import DWA, RLW, dwa_weights


def test_dwa_weights_by_hand():
    # r = (0.5, 1), T = 2: w = 2 softmax(0.25, 0.5)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    assert dwa_weights([1.0, 1.0], [2.0, 1.0], 2.0) == pytest.approx(
        [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])
    assert dwa_weights([3.0, 0.3, 1.0], [3.0, 0.3, 1.0], 2.0) == pytest.approx([1.0, 1.0, 1.0])
    # a non-positive loss counts as ratio 1
    assert dwa_weights([-1.0, 2.0], [1.0, 1.0], 1.0) == pytest.approx(
        [2 * math.e / (math.e + math.e**2), 2 * math.e**2 / (math.e + math.e**2)])


def test_dwa_weighs_one_for_two_epochs_then_by_the_loss_ratios():
    bal = DWA(TASKS, temperature=2.0)
    model = Toy()
    epochs = [{"a": 4.0, "b": 2.0, "c": 1.0}, {"a": 2.0, "b": 2.0, "c": 0.5},
              {"a": 1.0, "b": 1.8, "c": 0.5}]
    expected = [[1.0] * 3, [1.0] * 3,
                dwa_weights([2.0, 2.0, 0.5], [4.0, 2.0, 1.0], 2.0),
                dwa_weights([1.0, 1.8, 0.5], [2.0, 2.0, 0.5], 2.0)]
    for epoch in range(4):
        losses = model.losses()
        want = expected[epoch]
        heads = {k: grads_of(losses[k], model.heads[k].parameters()) for k in TASKS}
        model.zero_grad()
        res = bal.backward(losses, model.shared_params())
        assert [res.weights[k] for k in TASKS] == pytest.approx(want)
        for i, k in enumerate(TASKS):
            for p, g in zip(model.heads[k].parameters(), heads[k], strict=True):
                torch.testing.assert_close(p.grad, want[i] * g)
        if epoch < 3:
            bal.after_epoch(epochs[epoch])
    # over the last two epochs c's loss did not fall, b's fell by 10%, a's halved
    assert expected[3][2] > expected[3][1] > expected[3][0]
    fresh = DWA(TASKS)
    fresh.load_state_dict(bal.state_dict())
    torch.testing.assert_close(fresh.current, bal.current)
    torch.testing.assert_close(fresh.history, bal.history)


def test_dwa_errors_and_warning():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        DWA(TASKS, temperature=0)
    bal = DWA(("a", "b"))
    with pytest.raises(KeyError, match=r"no epoch loss for task\(s\) \['b'\]"):
        bal.after_epoch({"a": 1.0})
    bal.after_epoch({"a": 1.0, "b": -1.0})
    with pytest.warns(UserWarning, match=r"the loss of task\(s\) \['b'\] is not positive"):
        bal.after_epoch({"a": 0.5, "b": -2.0})
    assert bal.current.tolist() == pytest.approx(dwa_weights([0.5, 1.0], [1.0, 1.0], 2.0))


def test_rlw_draws_softmax_normal_weights_and_resumes_the_stream():
    bal = RLW(TASKS, seed=3)
    gen = torch.Generator().manual_seed(3)
    model = Toy()
    for _ in range(3):  # a step: backward (once per micro-batch: one draw for all), after_step
        want = torch.softmax(torch.randn(3, generator=gen, dtype=torch.float64), dim=0)
        for _piece in range(2):
            losses = model.losses()
            res = bal.backward(losses, model.shared_params())
            assert [res.weights[k] for k in TASKS] == pytest.approx(want.tolist())
        assert sum(res.weights.values()) == pytest.approx(1.0)
        bal.after_step(losses, lambda losses=losses: losses)
    state = bal.state_dict()
    nxt = bal.backward(model.losses(), model.shared_params()).weights
    other = RLW(TASKS, seed=99)
    other.load_state_dict(state)
    assert other.backward(model.losses(), model.shared_params()).weights == pytest.approx(nxt)
    with pytest.raises(TypeError, match="seed must be an int"):
        RLW(TASKS, seed=1.5)


def test_the_trainer_feeds_dwa_each_epochs_mean_losses():
    tiny = ["data.dataset.params.size=16", "data.dataset.params.num_samples=32",
            "data.batch_size=16", "model.backbone.params.width=8", "tasks.gan.enabled=false",
            "tasks.vae.enabled=false", "train.progress=false", 'train.gen_metrics="none"',
            'kernels="reference"', "optim.epochs=3", 'balancer.name="dwa"']
    trainer = Trainer(mtcore.build(None, tiny), None, progress=False, log=lambda _: None)
    logs = [trainer.train_epoch(e) for e in range(3)]

    def ratio_weights(last, before):
        return dwa_weights([logs[last][f"{k}.loss"] for k in ("seg", "cls")],
                           [logs[before][f"{k}.loss"] for k in ("seg", "cls")], 2.0)

    assert [logs[e]["seg.weight"] for e in (0, 1)] == pytest.approx([1.0, 1.0])
    assert [logs[2]["seg.weight"], logs[2]["cls.weight"]] == pytest.approx(ratio_weights(1, 0))
    assert trainer.balancer.current.tolist() == pytest.approx(ratio_weights(2, 1))
    assert trainer.balancer.current.tolist() != pytest.approx([1.0, 1.0])


def test_dwa_resumes_where_it_stopped_and_skips_unbalanced_stages(tmp_path):
    from mtcore.cli.main import main

    tiny = ["data.dataset.params.size=16", "data.dataset.params.num_samples=32",
            "data.batch_size=16", "model.backbone.params.width=8", "tasks.gan.enabled=false",
            "tasks.vae.enabled=false", "train.progress=false", 'train.gen_metrics="none"',
            "train.samples_every=0", 'kernels="reference"', "optim.epochs=4",
            'balancer.name="dwa"']
    whole = Trainer(mtcore.build(None, tiny), tmp_path / "whole", progress=False,
                    log=lambda _: None)
    whole.fit()
    Trainer(mtcore.build(None, tiny), tmp_path / "split", progress=False,
            log=lambda _: None).fit(stop_after=2)
    args = ["train", "--out", str(tmp_path / "split"), "--resume", "--quiet"]
    assert main(args) == 0
    resumed = mtcore.load(tmp_path / "split" / "checkpoints" / "last.pt")
    torch.testing.assert_close(resumed.balancer.history, whole.balancer.history)
    torch.testing.assert_close(resumed.balancer.current, whole.balancer.current)
    assert whole.balancer.current.tolist() != pytest.approx([1.0, 1.0])
    # an unbalanced stage does not feed it: two such epochs, then one balanced: one epoch seen
    stages = '[{epochs=2, balance=false}, {epochs=2}]'
    staged = Trainer(mtcore.build(None, [*tiny, f'transfer={{name="staged", params={{stages={stages}}}}}']),
                     None, progress=False, log=lambda _: None)
    for e in range(3):
        staged.train_epoch(e)
    history = staged.balancer.history
    assert torch.isnan(history[0]).all() and not torch.isnan(history[1]).any()
