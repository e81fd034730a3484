"""Tests of CAGrad, Nash-MTL and GradNorm: the small solvers against brute force, scipy and
closed forms worked out by hand; the published properties (CAGrad's update maximises the worst
task's improvement in its ball, Nash-MTL is invariant to scaling a loss, GradNorm's fixed point
equalises the weighted gradient norms); and the autograd plumbing on the toy model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from toy_multitask import TASKS, Toy, flat_grad, grads_of, toy_gradients

import mtcore
from mtcore.trainer import Trainer
from mtcore_balancers.cagrad import CAGrad, cagrad_direction, cagrad_weights, project_to_simplex
from mtcore_balancers.gradnorm import GradNorm, gradnorm_weight_gradient
from mtcore_balancers.nash_mtl import NashMTL, nash_mtl_weights


def d64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def random_grads(k: int, p: int, seed: int, conflict: bool = True) -> torch.Tensor:
    g = torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if conflict:
        g[-1] = -0.8 * g[0] + 0.3 * g[-1]  # a task that fights the first one
    return g


def cagrad_objective(w: np.ndarray, gram: np.ndarray, c: float) -> float:
    b = np.full(len(w), 1.0 / len(w))
    return float(w @ gram @ b + c * math.sqrt(b @ gram @ b) * math.sqrt(max(w @ gram @ w, 0.0)))


# -- simplex projection -------------------------------------------------------------------------
def test_project_to_simplex_by_hand_and_kkt():
    np.testing.assert_allclose(project_to_simplex(np.array([0.5, 0.5])), [0.5, 0.5])
    np.testing.assert_allclose(project_to_simplex(np.array([2.0, 0.0])), [1.0, 0.0])
    np.testing.assert_allclose(project_to_simplex(np.array([0.0, 0.0, 0.0])), [1 / 3] * 3)
    # (0.9, 0.6, -1): shift by theta = 0.25 -> (0.65, 0.35, 0)
    np.testing.assert_allclose(project_to_simplex(np.array([0.9, 0.6, -1.0])), [0.65, 0.35, 0.0])
    rng = np.random.default_rng(0)
    for _ in range(20):  # optimality: w = max(v - theta, 0) for one theta, on the simplex
        v = rng.normal(size=5) * 2
        w = project_to_simplex(v)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
        theta = (v - w)[w > 0]
        np.testing.assert_allclose(theta, theta[0])
        assert (v[w == 0] <= theta[0] + 1e-12).all()


# -- CAGrad ------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [0.0, 0.4, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cagrad_weights_two_tasks_match_grid_search(c, seed):
    g = random_grads(2, 7, seed)
    gram = (g @ g.T).numpy()
    w = cagrad_weights(gram, c)
    grid = np.linspace(0.0, 1.0, 20001)
    best = min(cagrad_objective(np.array([x, 1 - x]), gram, c) for x in grid)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert cagrad_objective(w, gram, c) <= best + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_cagrad_weights_match_scipy_slsqp(seed):
    """The paper's code solves the dual with scipy's SLSQP; ours must be at least as good."""
    minimize = pytest.importorskip("scipy.optimize").minimize
    k = 3 + seed % 3
    g = random_grads(k, 11, seed)
    gram = (g @ g.T).numpy()
    c = 0.4
    w = cagrad_weights(gram, c)
    x0 = np.full(k, 1.0 / k)
    res = minimize(lambda x: cagrad_objective(x, gram, c), x0, method="SLSQP",
                   bounds=[(0, 1)] * k, constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                   options={"ftol": 1e-14, "maxiter": 1000})
    assert cagrad_objective(w, gram, c) <= res.fun + 1e-8
    assert abs(w.sum() - 1) < 1e-12 and w.min() >= 0


def test_cagrad_direction_by_hand():
    g = d64([[1.0, 0.0], [0.0, 1.0]])
    # symmetric: w = (1/2, 1/2), g_w = g_0 = (1/2, 1/2), d = g_0 + c g_0 = (1 + c) g_0
    torch.testing.assert_close(cagrad_direction(g, 0.5, rescale=0), d64([0.75, 0.75]))
    torch.testing.assert_close(cagrad_direction(g, 0.5, rescale=1), d64([0.75, 0.75]) / 1.25)
    torch.testing.assert_close(cagrad_direction(g, 0.5, rescale=2), d64([0.5, 0.5]))
    # c = 0 is gradient descent on the mean loss
    g3 = random_grads(3, 5, 4)
    torch.testing.assert_close(cagrad_direction(g3, 0.0, rescale=0), g3.mean(dim=0))
    with pytest.raises(ValueError, match="rescale must be one of"):
        cagrad_direction(g3, 0.4, rescale=3)
    with pytest.raises(ValueError, match=r"grads must be \[K, P\]"):
        cagrad_direction(g3[0], 0.4)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_direction_maximises_the_worst_improvement_in_its_ball(seed):
    """The primal problem (the paper's eq. 3): max_d min_i <g_i, d> s.t. ||d - g_0|| <= c ||g_0||.
    Our d comes from the dual; check it against many feasible points of the primal."""
    c = 0.5
    g = random_grads(3, 4, seed)
    d = cagrad_direction(g, c, rescale=0)
    g0 = g.mean(dim=0)
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) <= radius * (1 + 1e-6)
    worst = float((g @ d).min())
    gen = torch.Generator().manual_seed(100 + seed)
    u = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True) * radius * torch.rand(20000, 1, generator=gen,
                                                              dtype=torch.float64) ** 0.25
    candidates = g0 + u
    assert worst >= float((candidates @ g.T).min(dim=1).values.max()) - 1e-9
    assert worst >= float((g @ g0).min()) - 1e-12  # never worse than the mean gradient


def test_cagrad_balancer_backward_on_the_toy_model():
    model = Toy()
    losses, shared, g, head_grads = toy_gradients(model)
    res = CAGrad(TASKS, c=0.4).backward(losses, shared)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, 3 * cagrad_direction(g, 0.4, rescale=1))  # K x, as a sum
    for k in TASKS:  # heads: the plain sum
        for p, e in zip(model.heads[k].parameters(), head_grads[k], strict=True):
            torch.testing.assert_close(p.grad, e)
    coef = torch.tensor([res.weights[k] for k in TASKS], dtype=torch.float64)
    torch.testing.assert_close(coef @ g, got)  # the reported weights are the coefficients
    assert res.total == pytest.approx(float(sum(losses.values()).detach()))


def test_cagrad_leaves_out_a_task_that_does_not_reach_the_shared_parameters():
    model = Toy(tasks=("a", "b"))
    losses = model.losses()
    losses["b"] = torch.tensor(0.3, dtype=torch.float64)
    shared = model.shared_params()
    ga = flat_grad(losses["a"], shared)
    res = CAGrad(("a", "b"), c=0.4).backward(losses, shared)
    # one task: g_0 = g_w = g_a, d = (1 + c) g_a, divided by 1 + c^2
    expected = (1.4 / 1.16) * ga
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)
    assert res.weights == {"a": pytest.approx(1.4 / 1.16), "b": 0.0}


def test_cagrad_errors():
    with pytest.raises(ValueError, match="c must be a finite number >= 0"):
        CAGrad(TASKS, c=-1)
    with pytest.raises(ValueError, match="rescale must be one of"):
        CAGrad(TASKS, rescale=5)
    with pytest.raises(ValueError, match=r"gram must be \[K, K\]"):
        cagrad_weights(np.ones((2, 3)), 0.4)


# -- Nash-MTL ----------------------------------------------------------------------------------
def test_nash_mtl_weights_by_hand():
    # orthogonal gradients: A diagonal, alpha_i = 1 / sqrt(A_ii) after the Frobenius scaling
    gram = np.diag([4.0, 1.0, 0.25])
    fro = math.sqrt(16 + 1 + 0.0625)
    np.testing.assert_allclose(nash_mtl_weights(gram), 1 / np.sqrt(np.diag(gram) / fro),
                               rtol=1e-8)
    # two identical gradients: A = [[1, 1], [1, 1]] / 2, alpha_1 = alpha_2 = 1
    np.testing.assert_allclose(nash_mtl_weights(np.full((2, 2), 3.0)), [1.0, 1.0], rtol=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_nash_mtl_weights_solve_the_bargaining_equation_and_match_scipy(seed):
    k = 2 + seed % 4
    g = random_grads(k, 9, seed, conflict=seed % 2 == 0)
    gram = (g @ g.T).numpy()
    alpha = nash_mtl_weights(gram)
    a = gram / np.linalg.norm(gram)
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha * (a @ alpha), 1.0, atol=1e-6)  # G^T G alpha = 1 / alpha
    # the same minimiser by an independent solver
    minimize = pytest.importorskip("scipy.optimize").minimize
    res = minimize(lambda x: 0.5 * x @ a @ x - np.log(x).sum(), np.ones(k), method="L-BFGS-B",
                   jac=lambda x: a @ x - 1 / x, bounds=[(1e-9, None)] * k,
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    np.testing.assert_allclose(alpha, res.x, rtol=1e-4)


def test_nash_mtl_update_is_invariant_to_scaling_a_loss():
    """Scaling L_i (so g_i) by s scales the exact alpha_i by 1/s: the bargaining update
    sum_i alpha_i g_i does not change. Our alpha solve the Frobenius-normalised system, so the
    exact alpha is ours divided by sqrt(||G^T G||_F)."""

    def exact_update(g):
        gram = (g @ g.T).numpy()
        return torch.from_numpy(nash_mtl_weights(gram) / math.sqrt(np.linalg.norm(gram))) @ g

    g = random_grads(3, 6, 7)
    scaled = g * d64([[10.0], [1.0], [0.1]])
    torch.testing.assert_close(exact_update(scaled), exact_update(g), rtol=1e-5, atol=1e-9)
    # and every task improves by 1 / alpha_i: alpha_i <g_i, d> = 1 (normalised system)
    gram = (g @ g.T).numpy()
    alpha = nash_mtl_weights(gram)
    d = torch.from_numpy(alpha) @ g
    np.testing.assert_allclose(alpha * (g @ d).numpy() / np.linalg.norm(gram), 1.0, atol=1e-6)


def test_nash_mtl_weights_stay_finite_at_a_pareto_stationary_point():
    g = d64([[1.0, 2.0], [-1.0, -2.0]])  # g_1 + g_2 = 0: no bargaining solution without the ridge
    alpha = nash_mtl_weights((g @ g.T).numpy())
    assert np.isfinite(alpha).all() and (alpha > 1e4).all() and (alpha < 1e7).all()
    with pytest.raises(ValueError, match=r"gram must be \[K, K\]"):
        nash_mtl_weights(np.ones(3))


def test_nash_mtl_balancer_backward_and_update_every():
    model = Toy()
    losses, shared, g, head_grads = toy_gradients(model)
    bal = NashMTL(TASKS, update_every=2)
    res = bal.backward(losses, shared)
    alpha = torch.from_numpy(nash_mtl_weights((g @ g.T).numpy()))
    assert [res.weights[k] for k in TASKS] == pytest.approx(alpha.tolist())
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), alpha @ g)
    for i, k in enumerate(TASKS):  # the weighted loss: each head gets alpha_k times its gradient
        for p, e in zip(model.heads[k].parameters(), head_grads[k], strict=True):
            torch.testing.assert_close(p.grad, float(alpha[i]) * e)
    assert res.total == pytest.approx(
        float(sum(alpha[i] * losses[k].detach() for i, k in enumerate(TASKS))))
    bal.after_step(losses, model.losses)  # the optimizer step: counted
    # the second step reuses the weights (no new solve), the third solves again
    model.zero_grad()
    with torch.no_grad():
        model.shared.weight.add_(0.5)
    res2 = bal.backward(model.losses(), shared)
    assert res2.weights == pytest.approx(res.weights, rel=1e-6)  # kept as float32
    bal.after_step(losses, model.losses)
    state = bal.state_dict()
    fresh = NashMTL(TASKS, update_every=2)
    fresh.load_state_dict(state)
    assert int(fresh.steps) == 2 and torch.equal(fresh.alpha, bal.alpha)
    res3 = fresh.backward(model.losses(), shared)
    assert res3.weights != res.weights


def test_nash_mtl_gives_a_task_off_the_shared_parameters_weight_one():
    model = Toy(tasks=("a", "b"))
    losses = model.losses()
    losses["b"] = torch.tensor(0.3, dtype=torch.float64, requires_grad=False)
    res = NashMTL(("a", "b")).backward(losses, model.shared_params())
    # a alone: A = [[1]], alpha = 1 (after the ridge, to 1e-9)
    assert res.weights == {"a": pytest.approx(1.0, rel=1e-6), "b": 1.0}
    with pytest.raises(ValueError, match="update_every must be an int >= 1"):
        NashMTL(TASKS, update_every=0)


# -- GradNorm ----------------------------------------------------------------------------------
def test_gradnorm_weight_gradient_by_hand():
    w, n = d64([1.0, 1.0]), d64([3.0, 1.0])
    # equal training rates: G = (3, 1), target = mean = 2 -> sign (+, -) times n
    torch.testing.assert_close(gradnorm_weight_gradient(w, n, d64([1.0, 1.0]), 1.5), d64([3.0, -1.0]))
    # ratios (4, 1), alpha 1: r = (1.6, 0.4), targets (3.2, 0.8): G - target = (-0.2, 0.2)
    torch.testing.assert_close(gradnorm_weight_gradient(w, n, d64([4.0, 1.0]), 1.0), d64([-3.0, 1.0]))
    # at the target the subgradient is 0
    torch.testing.assert_close(gradnorm_weight_gradient(d64([1.0, 3.0]), n, d64([1.0, 1.0]), 1.5),
                               d64([0.0, 0.0]))


def test_gradnorm_converges_to_equal_weighted_gradient_norms():
    """Fixed norms (10, 1), equal training rates: the fixed point has w_1 * 10 = w_2 * 1 and
    w_1 + w_2 = 2, i.e. w = (2/11, 20/11)."""
    bal = GradNorm(("a", "b"), alpha=1.5)
    grads = d64([[10.0, 0.0], [0.0, 1.0]])
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
    for _ in range(4000):
        bal.gradient_weights(grads, losses)
        with torch.no_grad():
            bal.loss_weights -= 1e-3 * bal.loss_weights.grad
        bal.loss_weights.grad = None
        bal.after_step(losses, lambda: losses)
        assert float(bal.loss_weights.detach().sum()) == pytest.approx(2.0)
    torch.testing.assert_close(bal.loss_weights.detach().double(), d64([2 / 11, 20 / 11]),
                               atol=0.01, rtol=0)


def test_gradnorm_backward_on_the_toy_model():
    model = Toy()
    losses, shared, g, head_grads = toy_gradients(model)
    bal = GradNorm(TASKS, alpha=1.5)
    res = bal.backward(losses, shared)
    # first step: w = 1, L(0) = L, all r = 1 -> target = mean_k ||g_k||
    n = g.norm(dim=1)
    torch.testing.assert_close(bal.loss_weights.grad.double(), torch.sign(n - n.mean()) * n,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), g.sum(dim=0))
    for k in TASKS:
        for p, e in zip(model.heads[k].parameters(), head_grads[k], strict=True):
            torch.testing.assert_close(p.grad, e)
    assert res.weights == {k: 1.0 for k in TASKS}
    torch.testing.assert_close(bal.initial_losses,
                               torch.stack([losses[k].detach() for k in TASKS]).float())
    # the next step keeps L(0) and uses the current weights (after a step and renormalisation)
    with torch.no_grad():
        bal.loss_weights.copy_(torch.tensor([2.0, 0.5, 0.2]))
    bal.after_step(losses, model.losses)
    w = torch.tensor([2.0, 0.5, 0.2]) * 3 / 2.7
    torch.testing.assert_close(bal.loss_weights.detach(), w)
    model.zero_grad()
    bal.loss_weights.grad = None
    with torch.no_grad():
        model.shared.bias.add_(0.3)
    losses2 = model.losses()
    g2 = torch.stack([flat_grad(losses2[k], shared) for k in TASKS])
    res2 = bal.backward(losses2, shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]),
                               w.double() @ g2, rtol=1e-6, atol=1e-9)
    ratios = torch.stack([losses2[k].detach() / losses[k].detach() for k in TASKS])
    expected = gradnorm_weight_gradient(w.double(), g2.norm(dim=1), ratios, 1.5)
    torch.testing.assert_close(bal.loss_weights.grad.double(), expected, rtol=1e-6, atol=0)
    assert [res2.weights[k] for k in TASKS] == pytest.approx(w.tolist())
    state = bal.state_dict()
    fresh = GradNorm(TASKS)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.initial_losses, bal.initial_losses)


def test_gradnorm_inactive_task_keeps_weight_one_and_errors():
    model = Toy(tasks=("a", "b", "c"))
    losses = model.losses()
    losses["c"] = torch.tensor(0.3, dtype=torch.float64)  # reaches no shared parameter
    bal = GradNorm(("a", "b", "c"))
    bal.backward(losses, model.shared_params())
    assert float(bal.loss_weights.grad[2]) == 0.0
    with torch.no_grad():
        bal.loss_weights.copy_(torch.tensor([3.0, 1.0, 0.7]))
    bal.after_step(losses, model.losses)
    torch.testing.assert_close(bal.loss_weights.detach(), torch.tensor([1.5, 0.5, 1.0]))
    # a non-positive first loss of a task that takes part cannot give a training rate
    model2 = Toy(tasks=("a", "b"))
    bad = model2.losses()
    bad["b"] = bad["b"] - bad["b"].detach() - 1.0
    with pytest.raises(ValueError, match=r"need positive first-step losses; got b = -1"):
        GradNorm(("a", "b")).backward(bad, model2.shared_params())
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        GradNorm(TASKS, alpha=-1)
    with pytest.raises(ValueError, match=r"min_weight must lie in \(0, 1\]"):
        GradNorm(TASKS, min_weight=2.0)


# -- shared plumbing of the three -----------------------------------------------------------------
def make(name):
    return {"cagrad": CAGrad, "nash_mtl": NashMTL, "gradnorm": GradNorm}[name](TASKS)


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl", "gradnorm"])
def test_a_loss_scale_scales_every_gradient_and_nothing_else(name):
    """The AMP grad scaler multiplies every loss by S before backward and divides the gradients
    by S afterwards: the weights must not change and every gradient must be S times larger."""
    runs = []
    for scale in (None, lambda t: 1024.0 * t):
        model = Toy()
        bal = make(name)
        res = bal.backward(model.losses(), model.shared_params(), scale)
        grads = [p.grad.clone() for p in model.parameters()]
        extra = [p.grad.clone() for p in bal.parameters() if p.grad is not None]
        runs.append((res, grads, extra))
    (res, grads, extra), (res_s, grads_s, extra_s) = runs
    assert res_s.weights == pytest.approx(res.weights) and res_s.total == pytest.approx(res.total)
    for a, b in zip(grads, grads_s, strict=True):
        torch.testing.assert_close(b, 1024.0 * a)
    for a, b in zip(extra, extra_s, strict=True):  # GradNorm's weight gradient: unscaled later too
        torch.testing.assert_close(b, 1024.0 * a)


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl", "gradnorm"])
def test_a_frozen_backbone_gives_each_head_its_plain_gradient(name):
    model = Toy()
    for p in model.shared_params():
        p.requires_grad_(False)
    losses = model.losses()
    head_grads = {k: grads_of(losses[k], model.heads[k].parameters()) for k in TASKS}
    bal = make(name)
    res = bal.backward(losses, model.shared_params())
    assert res.weights == {k: 1.0 for k in TASKS}  # nothing learnt or solved yet: all 1
    assert all(p.grad is None for p in model.shared_params())
    for k in TASKS:
        for p, e in zip(model.heads[k].parameters(), head_grads[k], strict=True):
            torch.testing.assert_close(p.grad, e)
    if name == "gradnorm":
        assert bal.loss_weights.grad is None and torch.isnan(bal.initial_losses).all()


def test_nash_mtl_solves_on_its_first_unfrozen_step_whatever_the_count():
    bal = NashMTL(TASKS, update_every=4)
    frozen = Toy()
    for p in frozen.shared_params():
        p.requires_grad_(False)
    for _ in range(3):  # a frozen-backbone stage: steps count, nothing is solved
        bal.backward(frozen.losses(), frozen.shared_params())
        bal.after_step({}, frozen.losses)
    assert int(bal.steps) == 3 and not bool(bal.solved)
    model = Toy()
    _, shared, g, _ = toy_gradients(model)
    res = bal.backward(model.losses(), shared)  # step 3 is not a multiple of 4, yet it solves
    alpha = nash_mtl_weights((g @ g.T).numpy())
    assert [res.weights[k] for k in TASKS] == pytest.approx(alpha.tolist())


def test_gradnorm_skips_a_non_finite_gradient():
    bal = GradNorm(("a", "b"))
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    bal.gradient_weights(d64([[1.0, 0.0], [0.0, math.nan]]), losses)
    assert bal.loss_weights.grad is None
    bal.after_step(losses, lambda: losses)
    torch.testing.assert_close(bal.loss_weights.detach(), torch.ones(2))


# -- in the trainer ------------------------------------------------------------------------------
TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=48", "data.batch_size=16",
    "data.eval_batch_size=48", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8",
    "train.gen_metric_samples=32", "train.num_samples=4", "train.progress=false",
    "optim.epochs=1", "kernels=\"reference\"",
]


@pytest.mark.parametrize("name", ["cagrad", "nash_mtl", "gradnorm"])
def test_new_balancers_train_the_default_tasks(name):
    exp = mtcore.build(None, [*TINY, f'balancer.name="{name}"'])
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    trainer._apply_stage(0)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    backbone = [p.detach().clone() for p in trainer.model.backbone.parameters()]
    for _ in range(2):
        logs = trainer.train_step(batch)
    assert all(math.isfinite(v) for v in logs.values())
    assert {f"{k}.weight" for k in ("seg", "cls", "vae", "gan")} <= set(logs)
    assert any(not torch.equal(a, b) for a, b in zip(
        backbone, trainer.model.backbone.parameters(), strict=True))  # the backbone trains
    if name == "gradnorm":  # seg and vae reach the backbone; cls (detached cascade) and gan not
        w = trainer.balancer.loss_weights.detach()
        assert float(w[0] + w[2]) == pytest.approx(2.0)
        assert float(w[1]) == float(w[3]) == 1.0 and float(w[0]) != 1.0


# -- devices without float64 (Apple MPS) ----------------------------------------------------------
def test_solve_dtype_is_float64_except_on_mps():
    from mtcore.plugin import solve_dtype

    assert solve_dtype("cpu") is torch.float64
    assert solve_dtype(torch.device("cuda", 1)) is torch.float64
    assert solve_dtype(torch.device("mps")) is torch.float32


class _Float64OnlyOnTheCpu(torch.utils._python_dispatch.TorchDispatchMode):
    """Stands in for a device without float64 (Apple MPS) on the CPU: the ``roots`` and every
    tensor computed from them count as on the device; an op that makes a float64 tensor from
    them is recorded unless it is a copy to the CPU (``.to("cpu", ...)``; the test makes
    ``.cpu()``, which dispatches nothing on the CPU, such a copy)."""

    def __init__(self, roots) -> None:
        super().__init__()
        self.keep = list(roots)  # alive, so their ids stay theirs
        self.on_device = {id(t) for t in self.keep}
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        if any(id(t) in self.on_device for t in inputs):
            to_cpu = (func is torch.ops.aten._to_copy.default
                      and kwargs.get("device") == torch.device("cpu"))
            if not to_cpu:
                for t in torch.utils._pytree.tree_leaves(out):
                    if torch.is_tensor(t):
                        if t.dtype == torch.float64:
                            self.seen.append(str(func))
                        self.on_device.add(id(t))
                        self.keep.append(t)
        return out


BALANCERS = ("equal", "fixed", "uncertainty", "dwa", "rlw", "famo", "pcgrad", "mgda", "cagrad",
             "nash_mtl", "gradnorm")


def _balancer(name):
    from mtcore_balancers.dwa import DWA, RLW
    from mtcore_balancers.famo import FAMO
    from mtcore_balancers.gradient import MGDA, PCGrad
    from mtcore_balancers.weighting import EqualWeighting, FixedWeighting, UncertaintyWeighting

    return {"equal": lambda: EqualWeighting(TASKS),
            "fixed": lambda: FixedWeighting(TASKS, {"a": 1.0, "b": 0.5, "c": 2.0}),
            "uncertainty": lambda: UncertaintyWeighting(TASKS), "dwa": lambda: DWA(TASKS),
            "rlw": lambda: RLW(TASKS), "famo": lambda: FAMO(TASKS), "pcgrad": lambda: PCGrad(TASKS),
            "mgda": lambda: MGDA(TASKS, normalization="loss"), "cagrad": lambda: CAGrad(TASKS),
            "nash_mtl": lambda: NashMTL(TASKS, update_every=2),  # step 2 reuses step 1's weights
            "gradnorm": lambda: GradNorm(TASKS)}[name]()


@pytest.mark.parametrize("name", BALANCERS)
def test_on_a_device_without_float64_nothing_of_the_device_becomes_float64(name, monkeypatch):
    """With ``solve_dtype`` saying float32 (as on MPS) no tensor of the model, the balancer or
    computed from them becomes float64 but by a copy to the CPU, over three steps with their
    after-step updates; and the steps are the float64 ones to float32 precision."""
    from mtcore_balancers import cagrad, gradient, gradnorm, nash_mtl

    def float32_toy():
        model = Toy()
        model.float()
        model.x = model.x.float()
        model.y = {k: v.float() for k, v in model.y.items()}
        return model, _balancer(name)

    def steps(model, bal):
        out = []
        opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            res = bal.backward(model.losses(), model.shared_params())
            out.append((res.weights, [p.grad.clone() for p in model.parameters()]))
            opt.step()
            with torch.no_grad():
                bal.after_step(model.losses(), model.losses)
        return out

    want = steps(*float32_toy())
    for module in (cagrad, gradient, gradnorm, nash_mtl):
        monkeypatch.setattr(module, "solve_dtype", lambda device: torch.float32)
    # .cpu() on a CPU tensor returns it as is: here it copies, as it does from a device
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: self.to("cpu", copy=True))
    model, bal = float32_toy()
    roots = [*model.parameters(), *bal.parameters(), *bal.buffers(), model.x, *model.y.values()]
    with _Float64OnlyOnTheCpu(roots) as mode:
        got = steps(model, bal)
    assert mode.seen == []
    for (w32, g32), (w64, g64) in zip(got, want, strict=True):
        assert w32 == pytest.approx(w64, rel=1e-4)
        for a, b in zip(g32, g64, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
