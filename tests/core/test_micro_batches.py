"""``train.micro_batch_size``: a batch run through forward and backward in pieces gives the
gradients of the whole batch (for a model without batch statistics), in both the main step and
the discriminator's, and the step's logs are the batch's."""

from __future__ import annotations

import pytest
import torch

import mtcore
from mtcore.trainer import Trainer, micro_batches

# the tests wrap optimizer.step to read the gradients, which torch's schedulers notice
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

# no batch statistics anywhere: the backbone without norm layers, pooled classification heads,
# a GAN whose D has no minibatch-stddev groups (a group of 1) and whose G uses pixel norm
TASKS = {
    "cls": {"head": {"name": "classification", "params": {"pool": "avgmax"}},
            "loss": {"name": "cls_cross_entropy", "params": {"label_smoothing": 0.1}}},
    "cls2": {"head": {"name": "classification", "params": {"pool": "avgmax", "hidden": 16}},
             "loss": {"name": "cls_cross_entropy", "params": {}}},
    "gan": {"head": {"name": "gan", "params": {"width": 8, "d_width": 8, "latent_dim": 16,
                                                "mbstd_group": 1, "r1_gamma": 1.0, "r1_every": 1,
                                                "conditional": True}},
            "loss": {"name": "adversarial", "params": {}}},
}
SETTINGS = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=64", "data.batch_size=32",
    'model.backbone.params.norm="none"', "model.backbone.params.width=8",
    "train.progress=false", 'kernels="reference"',
]


def _grads_at_each_step(micro_batch_size: int, balancer: str = "uncertainty"):
    """The gradients every optimizer of the step sees, and the step's logs."""
    torch.manual_seed(0)
    exp = mtcore.build({"tasks": TASKS}, [*SETTINGS, f'balancer.name="{balancer}"',
                                          f"train.micro_batch_size={micro_batch_size}"])
    trainer = Trainer(exp, None, progress=False)
    seen: dict[str, dict[str, torch.Tensor]] = {}
    opts = {"main": trainer.optimizer, **{g: o for (_, g), (o, _, _) in trainer.aux.items()}}
    for name, opt in opts.items():
        def step(orig=opt.step, name=name, opt=opt):
            seen[name] = {f"{i}.{j}": p.grad.clone() for i, g in enumerate(opt.param_groups)
                          for j, p in enumerate(g["params"]) if p.grad is not None}
            orig()
        opt.step = step
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    trainer.model.train()
    torch.manual_seed(1)
    logs = trainer.train_step(batch)
    return seen, logs


@pytest.mark.parametrize("size", [8, 12])  # four equal pieces; 11 + 11 + 10
def test_pieces_give_the_whole_batchs_gradients_and_logs(size):
    whole, whole_logs = _grads_at_each_step(0)
    pieces, logs = _grads_at_each_step(size)
    assert set(whole) == set(pieces) == {"main", "discriminator"}
    for opt in whole:
        assert whole[opt].keys() == pieces[opt].keys()
        assert len(whole[opt]) > 10
        for k, g in whole[opt].items():
            torch.testing.assert_close(pieces[opt][k], g, rtol=1e-4, atol=1e-6,
                                       msg=f"{opt} parameter {k}")
    assert logs.keys() == whole_logs.keys()
    for k, v in whole_logs.items():
        assert logs[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_random_loss_weights_are_drawn_once_a_step():
    """RLW draws one set of weights per optimizer step, which every piece uses: the step is the
    whole batch's, and its logged weights are the draw's."""
    whole, whole_logs = _grads_at_each_step(0, "rlw")
    pieces, logs = _grads_at_each_step(8, "rlw")
    for k, g in whole["main"].items():
        torch.testing.assert_close(pieces["main"][k], g, rtol=1e-4, atol=1e-6, msg=k)
    for task in TASKS:
        assert logs[f"{task}.weight"] == pytest.approx(whole_logs[f"{task}.weight"], rel=1e-12)


def test_gradnorms_initial_losses_are_the_first_batchs():
    whole, _ = _trained_balancer(0, "gradnorm")
    pieces, _ = _trained_balancer(8, "gradnorm")
    torch.testing.assert_close(pieces.initial_losses, whole.initial_losses, rtol=1e-5, atol=1e-6)


def _trained_balancer(micro_batch_size: int, balancer: str):
    torch.manual_seed(0)
    tasks = {k: TASKS[k] for k in ("cls", "cls2")}
    exp = mtcore.build({"tasks": tasks}, [*SETTINGS, f'balancer.name="{balancer}"',
                                          f"train.micro_batch_size={micro_batch_size}"])
    trainer = Trainer(exp, None, progress=False)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    trainer.model.train()
    logs = trainer.train_step(batch)
    return trainer.balancer, logs


def test_a_gradient_method_combines_each_piece():
    """MGDA finds each piece's min-norm direction: the step's gradient is the pieces' combined
    gradients weighted by their shares, which differs from the whole batch's combination."""
    tasks = {k: TASKS[k] for k in ("cls", "cls2")}
    over = [*SETTINGS, 'balancer.name="mgda"', "train.micro_batch_size=16"]
    trainer, by_hand, whole = (Trainer(mtcore.build({"tasks": tasks}, over), None, progress=False)
                               for _ in range(3))
    for t in (by_hand, whole):
        t.model.load_state_dict(trainer.model.state_dict())
    seen = {}

    def step(orig=trainer.optimizer.step):
        seen.update({id(p): p.grad.clone() for g in trainer.optimizer.param_groups
                     for p in g["params"] if p.grad is not None})
        orig()
    trainer.optimizer.step = step
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    for t in (trainer, by_hand, whole):
        t.model.train()
    trainer.train_step(batch)
    params = dict(by_hand.model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for piece, share in micro_batches(batch, 16):  # each piece's MGDA gradient on its own
        by_hand.model.zero_grad(set_to_none=True)
        by_hand.balancer.backward(by_hand._losses(piece)[1], by_hand.model.shared_parameters())
        for k, p in params.items():
            if p.grad is not None:
                total[k] += share * p.grad
    whole.balancer.backward(whole._losses(batch)[1], whole.model.shared_parameters())
    names = dict(trainer.model.named_parameters())
    batchwise = dict(whole.model.named_parameters())
    assert len(seen) == len(names)
    for k, p in names.items():
        torch.testing.assert_close(seen[id(p)], total[k], msg=k)
    shared = [k for k in names if k.startswith("backbone.")]
    assert shared and any(not torch.allclose(seen[id(names[k])], batchwise[k].grad)
                          for k in shared)


def test_micro_batches_cut_tensors_of_the_batchs_length():
    batch = {"image": torch.arange(10.0).view(10, 1), "label": torch.arange(10),
             "scale": torch.tensor(2.0), "table": torch.zeros(3), "name": "x"}
    pieces = micro_batches(batch, 4)  # the fewest pieces of at most 4, as equal as possible
    assert [share for _, share in pieces] == [0.4, 0.3, 0.3]
    assert [p["label"].tolist() for p, _ in pieces] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(p["label"]) for p, _ in micro_batches(batch, 3)] == [3, 3, 2, 2]
    assert [len(p["label"]) for p, _ in micro_batches(batch, 9)] == [5, 5]
    for p, _ in pieces:  # what is not per-sample goes to every piece as it is
        assert p["scale"] is batch["scale"] and p["table"] is batch["table"] and p["name"] == "x"
    assert micro_batches(batch, 0) == [(batch, 1.0)]
    assert micro_batches(batch, 10) == [(batch, 1.0)]


def test_the_setting_is_checked():
    with pytest.raises(mtcore.errors.ConfigError, match="train.micro_batch_size"):
        mtcore.build(None, ["train.micro_batch_size=-1"])
