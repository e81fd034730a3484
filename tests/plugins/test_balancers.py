"""Tests of the loss balancers: golden values on fixed gradient matrices worked out by hand,
properties (non-conflict, permutation, scaling), and the autograd plumbing on a toy model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from toy_multitask import TASKS, Toy, flat_grad, grads_of

from mtcore.balancer import BalanceResult
from mtcore_balancers.famo import FAMO
from mtcore_balancers.gradient import (
    MGDA,
    PCGrad,
    min_norm_weights,
    pcgrad_combine,
    two_task_min_norm,
)
from mtcore_balancers.weighting import EqualWeighting, FixedWeighting, UncertaintyWeighting

T = torch.tensor


def d64(rows):
    return torch.tensor(rows, dtype=torch.float64)


# -- PCGrad: pure function ------------------------------------------------------------------------
def test_pcgrad_two_tasks_golden():
    # g1 = [1, 0], g2 = [-1, 1]: <g1, g2> = -1.
    # g1' = g1 - (-1)/|g2|^2 g2 = [1, 0] + 1/2 [-1, 1] = [0.5, 0.5]
    # g2' = g2 - (-1)/|g1|^2 g1 = [-1, 1] + [1, 0] = [0, 1];  sum = [0.5, 1.5]
    out = pcgrad_combine(d64([[1, 0], [-1, 1]]), [[0, 1], [1, 0]])
    torch.testing.assert_close(out, d64([0.5, 1.5]))


def test_pcgrad_three_tasks_golden_order_matters():
    g = d64([[1, 0], [0, 1], [-1, -1]])
    # task 0 visits g3 then g2: [1,0] + 1/2 [-1,-1] = [.5,-.5]; vs g2: dot -.5 -> + .5 [0,1] = [.5,0]
    # task 1 visits g1 (dot 0, unchanged) then g3: [0,1] + 1/2 [-1,-1] = [-.5,.5]
    # task 2 visits g1: [-1,-1] + [1,0] = [0,-1]; then g2: dot -1 -> [0,-1] + [0,1] = [0,0]
    out = pcgrad_combine(g, [[2, 1], [0, 2], [0, 1]])
    torch.testing.assert_close(out, d64([0.0, 0.5]))
    # task 0 visiting g2 first: dot 0, then g3 gives [.5,-.5]; so the sum changes by [0,-.5]
    out2 = pcgrad_combine(g, [[1, 2], [0, 2], [0, 1]])
    torch.testing.assert_close(out2, d64([0.0, 0.0]))


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    gen = torch.Generator().manual_seed(1)
    g = torch.rand(3, 7, generator=gen, dtype=torch.float64)  # all entries >= 0: no conflicts
    orders = [[1, 2], [2, 0], [0, 1]]
    torch.testing.assert_close(pcgrad_combine(g, orders), g.sum(0))


def test_pcgrad_two_task_projection_removes_conflict_and_scales():
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        g = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        if torch.dot(g[0], g[1]) >= 0:
            continue
        out = pcgrad_combine(g, [[1], [0]])
        # projected g1' is orthogonal to g2 and g2' to g1, so out = g1' + g2' has
        # <out, g2> = <g2', g2> = |g2|^2 - (<g1,g2>/|g1|^2) <g1,g2> ... checked directly:
        g1p = g[0] - torch.dot(g[0], g[1]) / g[1].dot(g[1]) * g[1]
        g2p = g[1] - torch.dot(g[1], g[0]) / g[0].dot(g[0]) * g[0]
        assert abs(float(g1p @ g[1])) < 1e-10 and abs(float(g2p @ g[0])) < 1e-10
        torch.testing.assert_close(out, g1p + g2p)
        # symmetric in the two tasks, and positively homogeneous
        torch.testing.assert_close(pcgrad_combine(g.flip(0), [[1], [0]]), out)
        torch.testing.assert_close(pcgrad_combine(3.5 * g, [[1], [0]]), 3.5 * out)


def test_pcgrad_zero_gradient_is_harmless():
    g = d64([[0, 0], [1, -1]])
    torch.testing.assert_close(pcgrad_combine(g, [[1], [0]]), d64([1, -1]))


def test_pcgrad_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        pcgrad_combine(torch.zeros(3), [[0]])


# -- MGDA: pure function --------------------------------------------------------------------------
def brute_force_min_norm(g: torch.Tensor, step: float) -> float:
    """min over a grid of the simplex of |sum_k alpha_k g_k|^2."""
    k = g.shape[0]
    n = round(1 / step)
    best = math.inf
    if k == 2:
        gam = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        pts = gam[:, None] * g[0] + (1 - gam)[:, None] * g[1]
        return float((pts**2).sum(1).min())
    for i in range(n + 1):
        a = torch.full((n + 1 - i,), i * step, dtype=torch.float64)
        b = torch.arange(n + 1 - i, dtype=torch.float64) * step
        c = 1 - a - b
        pts = a[:, None] * g[0] + b[:, None] * g[1] + c[:, None] * g[2]
        best = min(best, float((pts**2).sum(1).min()))
    return best


def test_mgda_two_task_golden():
    # g1=[1,0], g2=[-1,1]: gamma = (|g2|^2 - <g1,g2>) / |g1-g2|^2 = (2 + 1) / 5 = 0.6
    g = d64([[1, 0], [-1, 1]])
    alpha = min_norm_weights(g @ g.T)
    torch.testing.assert_close(alpha, d64([0.6, 0.4]))
    d = alpha @ g
    torch.testing.assert_close(d, d64([0.2, 0.4]))
    # optimality: both active gradients have <d, g_k> = |d|^2 = 0.2
    torch.testing.assert_close(g @ d, d64([0.2, 0.2]))


def test_mgda_two_task_closed_form_matches_grid_search():
    gen = torch.Generator().manual_seed(3)
    for _ in range(25):
        g = torch.randn(2, 4, generator=gen, dtype=torch.float64) * torch.rand(2, 1, generator=gen,
                                                                              dtype=torch.float64)
        m = g @ g.T
        gamma = two_task_min_norm(float(m[0, 0]), float(m[0, 1]), float(m[1, 1]))
        d = gamma * g[0] + (1 - gamma) * g[1]
        grid = brute_force_min_norm(g, 1e-4)
        assert float(d @ d) <= grid + 1e-12
        assert float(d @ d) >= grid - 1e-6  # the grid is within one step of the optimum


def test_mgda_dominated_gradient_and_identical_gradients():
    g = d64([[1, 0], [2, 0]])  # g1 lies between 0 and g2: the min-norm point is g1 itself
    torch.testing.assert_close(min_norm_weights(g @ g.T), d64([1, 0]))
    g = d64([[1, 2], [1, 2]])
    torch.testing.assert_close(min_norm_weights(g @ g.T), d64([0.5, 0.5]))
    torch.testing.assert_close(min_norm_weights(d64([[4.0]])), d64([1.0]))


def test_mgda_three_tasks_near_optimal_and_non_conflicting():
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        g = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        alpha = min_norm_weights(g @ g.T)
        assert float(alpha.min()) >= 0 and abs(float(alpha.sum()) - 1) < 1e-12
        d = alpha @ g
        assert float(d @ d) <= brute_force_min_norm(g, 2e-3) + 1e-9
        # KKT: <d, g_k> >= |d|^2 for every k, hence no task is hurt by a step along -d
        assert float((g @ d).min()) >= float(d @ d) - 1e-5
        assert float((g @ d).min()) >= -1e-9


def test_mgda_permutation_and_scaling():
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    alpha = min_norm_weights(g @ g.T)
    for perm in itertools.permutations(range(3)):
        p = list(perm)
        torch.testing.assert_close(min_norm_weights(g[p] @ g[p].T), alpha[p], atol=1e-4, rtol=0)
    torch.testing.assert_close(min_norm_weights(49.0 * (g @ g.T)), alpha)  # g scaled by 7


def test_min_norm_weights_rejects_bad_gram():
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        min_norm_weights(torch.zeros(2, 3))


# -- MGDA balancer -------------------------------------------------------------------------------
def test_mgda_balancer_normalizations():
    g = d64([[10, 0], [0, 1]])
    losses = {"a": T(2.0, dtype=torch.float64), "b": T(0.5, dtype=torch.float64)}
    # none: min-norm of [10,0],[0,1]: gamma = (1 - 0) / 101
    d, w = MGDA(("a", "b")).combine(g, losses)
    assert w["a"] == pytest.approx(1 / 101) and w["b"] == pytest.approx(100 / 101)
    # l2: the unit vectors -> 1/2 each; the combined gradient uses the raw gradients
    d, w = MGDA(("a", "b"), normalization="l2").combine(g, losses)
    assert w == pytest.approx({"a": 0.5, "b": 0.5})
    torch.testing.assert_close(d, d64([5.0, 0.5]))
    # loss: [5,0] and [0,2]: gamma = 4 / 29
    d, w = MGDA(("a", "b"), normalization="loss").combine(g, losses)
    assert w["a"] == pytest.approx(4 / 29)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss"])
def test_mgda_leaves_out_tasks_that_do_not_reach_the_shared_parameters(normalization):
    """With the default tasks the detached classification cascade and the GAN have zero shared
    gradients; in the solve they made the min-norm point 0, so the backbone never trained (all
    weight on one of them). Left out, the rest is the min-norm point of the others alone."""
    g = d64([[10, 0], [0, 0], [0, 1], [0, 0]])
    losses = {k: T(v, dtype=torch.float64) for k, v in zip("abcd", (2.0, 1.0, 0.5, 1.0), strict=True)}
    d, w = MGDA(tuple("abcd"), normalization=normalization).combine(g, losses)
    _, want = MGDA(("a", "c"), normalization=normalization).combine(g[[0, 2]], losses)
    assert w["b"] == w["d"] == 0.0
    assert (w["a"], w["c"]) == pytest.approx((want["a"], want["c"]))
    torch.testing.assert_close(d, w["a"] * g[0] + w["c"] * g[2])
    assert d.norm() > 0
    d, w = MGDA(("b", "d")).combine(g[[1, 3]], losses)  # nothing reaches them: nothing to do
    assert w == {"b": 0.0, "d": 0.0} and torch.equal(d, torch.zeros(2, dtype=torch.float64))
    g[1, 0] = float("nan")  # a NaN row is not "zero": it stays in and shows
    assert torch.isnan(MGDA(tuple("abcd")).combine(g, losses)[0]).any()


def test_mgda_task_permutation_permutes_weights():
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    losses = {k: T(1.0, dtype=torch.float64) for k in TASKS}
    _, w = MGDA(TASKS).combine(g, losses)
    _, wp = MGDA(("c", "a", "b")).combine(g[[2, 0, 1]], losses)
    assert wp == pytest.approx(w, abs=1e-4)


# -- the autograd plumbing of gradient combiners -------------------------------------------------
@pytest.mark.parametrize("balancer", [PCGrad(TASKS, seed=3), MGDA(TASKS, normalization="l2")],
                         ids=["pcgrad", "mgda"])
def test_gradient_combiner_backward(balancer):
    model = Toy()
    losses = model.losses()
    shared = model.shared_params()
    g = torch.stack([flat_grad(losses[k], shared) for k in TASKS])
    head_grads = {k: grads_of(losses[k], model.heads[k].parameters()) for k in TASKS}
    # the expected shared gradient: the pure combination, with the same random orders for PCGrad
    if isinstance(balancer, PCGrad):
        gen = torch.Generator().manual_seed(3)
        orders = [torch.randperm(3, generator=gen).tolist() for _ in range(3)]
        expected = pcgrad_combine(g, orders)
    else:
        normed = g / g.norm(dim=1, keepdim=True)
        expected = min_norm_weights(normed @ normed.T) @ g
    res = balancer.backward(losses, shared)
    assert isinstance(res, BalanceResult)
    assert res.total == pytest.approx(float(sum(losses.values()).detach()))
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected)
    for k in TASKS:  # each head gets exactly its own task's gradient (the plain sum)
        for p, e in zip(model.heads[k].parameters(), head_grads[k], strict=True):
            torch.testing.assert_close(p.grad, e)
    if isinstance(balancer, MGDA):
        assert sum(res.weights.values()) == pytest.approx(1.0)
    else:
        assert res.weights == {k: 1.0 for k in TASKS}


def test_gradient_combiner_accumulates_scales_and_handles_frozen():
    model = Toy()
    shared = model.shared_params()
    MGDA(TASKS).backward(model.losses(), shared)
    once = [p.grad.clone() for p in shared]
    head_once = [p.grad.clone() for p in model.heads.parameters()]
    # a scaler multiplies every loss: gradients scale by the same factor, and they accumulate
    MGDA(TASKS).backward(model.losses(), shared, scale=lambda t: 8.0 * t)
    for p, g in zip(shared, once, strict=True):
        torch.testing.assert_close(p.grad, 9.0 * g)
    for p, g in zip(model.heads.parameters(), head_once, strict=True):
        torch.testing.assert_close(p.grad, 9.0 * g)
    # frozen shared parameters: no combination, heads still get their gradient
    model2 = Toy()
    for p in model2.shared_params():
        p.requires_grad_(False)
    res = PCGrad(TASKS).backward(model2.losses(), model2.shared_params())
    assert all(p.grad is None for p in model2.shared_params())
    for p, g in zip(model2.heads.parameters(), head_once, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert res.weights == {k: 1.0 for k in TASKS}


def test_gradient_combiner_constant_loss_gives_zero_row():
    model = Toy(tasks=("a", "b"))
    losses = model.losses()
    losses["b"] = T(0.3, dtype=torch.float64)  # reaches no parameter
    shared = model.shared_params()
    expected = flat_grad(losses["a"], shared)
    res = MGDA(("a", "b"), normalization="l2").backward(losses, shared)
    # b is indifferent to the shared parameters (zero row): left out of the min-norm solve, which
    # with it would be 0 (alpha_b = 1) and train nothing; a alone gets the whole weight
    assert res.weights == {"a": pytest.approx(1.0), "b": 0.0}
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected)
    model.zero_grad()
    PCGrad(("a", "b")).backward(model.losses() | {"b": T(0.3, dtype=torch.float64)}, shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)


def test_pcgrad_seeded_and_state_dict_restores_generator():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    g[2] = -g[0] - 0.5 * g[1]  # make conflicts, so order matters
    losses = {k: T(1.0) for k in TASKS}
    a, b = PCGrad(TASKS, seed=11), PCGrad(TASKS, seed=11)
    outs_a = [a.combine(g, losses)[0] for _ in range(4)]
    outs_b = [b.combine(g, losses)[0] for _ in range(4)]
    for x, y in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(x, y)
    state = a.state_dict()
    nxt = a.combine(g, losses)[0]
    c = PCGrad(TASKS, seed=99)
    c.load_state_dict(state)
    torch.testing.assert_close(c.combine(g, losses)[0], nxt)


def test_gradient_combiner_errors():
    model = Toy()
    with pytest.raises(KeyError, match="no loss for task"):
        MGDA(TASKS).backward({"a": model.losses()["a"]}, model.shared_params())
    with pytest.raises(ValueError, match="must be a scalar"):
        PCGrad(TASKS).backward({k: torch.ones(2) for k in TASKS}, model.shared_params())
    with pytest.raises(ValueError, match=r"normalization must be one of \['none', 'l2', 'loss'\]"):
        MGDA(TASKS, normalization="L2")
    with pytest.raises(ValueError, match="max_iter"):
        MGDA(TASKS, max_iter=0)
    with pytest.raises(TypeError, match="seed"):
        PCGrad(TASKS, seed="x")
    with pytest.raises(ValueError, match="at least one task"):
        PCGrad(())


# -- loss weighting ------------------------------------------------------------------------------
def test_equal_weighting_backward_is_gradient_of_plain_sum():
    model = Toy()
    losses = model.losses()
    params = list(model.parameters())
    expected = grads_of(sum(losses.values()), params)
    res = EqualWeighting(TASKS).backward(losses, model.shared_params())
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e)
    assert res.weights == {k: 1.0 for k in TASKS}
    assert res.total == pytest.approx(float(sum(losses.values()).detach()))


def test_fixed_weighting_backward_and_errors():
    model = Toy()
    losses = model.losses()
    w = {"a": 0.5, "b": 2.0, "c": 0.0}
    params = list(model.parameters())
    expected = grads_of(0.5 * losses["a"] + 2.0 * losses["b"], params)
    res = FixedWeighting(TASKS, weights=w).backward(losses, model.shared_params())
    for p, e in zip(params, expected, strict=True):
        if e is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
        else:
            torch.testing.assert_close(p.grad, e)
    assert res.weights == w
    with pytest.raises(ValueError, match=r"no weight for task\(s\) \['c'\]"):
        FixedWeighting(TASKS, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['d'\]"):
        FixedWeighting(TASKS, weights={"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    with pytest.raises(ValueError, match=r"weights\['b'\] must be finite and >= 0, got -1"):
        FixedWeighting(TASKS, weights={"a": 1.0, "b": -1.0, "c": 1.0})
    with pytest.raises(ValueError, match="finite"):
        FixedWeighting(TASKS, weights={"a": 1.0, "b": math.nan, "c": 1.0})
    with pytest.raises(TypeError, match="must be a number"):
        FixedWeighting(TASKS, weights={"a": "1", "b": 1.0, "c": 1.0})
    with pytest.raises(TypeError, match="mapping"):
        FixedWeighting(TASKS, weights=[1.0, 1.0, 1.0])


def test_uncertainty_weighting_gradients_by_hand():
    bal = UncertaintyWeighting(("a", "b"), init_log_var=0.0)
    with torch.no_grad():
        bal.log_vars.copy_(T([0.3, -0.7]))
    la = T(2.0, requires_grad=True)
    lb = T(0.5, requires_grad=True)
    res = bal.backward({"a": la, "b": lb}, [])
    s = [0.3, -0.7]
    # L = e^{-s_a} L_a + s_a + e^{-s_b} L_b + s_b
    assert res.total == pytest.approx(math.exp(-s[0]) * 2.0 + s[0] + math.exp(-s[1]) * 0.5 + s[1])
    assert res.weights == pytest.approx({"a": math.exp(-0.3), "b": math.exp(0.7)})
    # dL/ds_k = 1 - e^{-s_k} L_k ; dL/dL_k = e^{-s_k}
    torch.testing.assert_close(
        bal.log_vars.grad, T([1 - math.exp(-0.3) * 2.0, 1 - math.exp(0.7) * 0.5])
    )
    assert float(la.grad) == pytest.approx(math.exp(-0.3))
    assert float(lb.grad) == pytest.approx(math.exp(0.7))
    # the optimum of s_k is log L_k: the gradient vanishes there
    bal2 = UncertaintyWeighting(("a",), init_log_var=math.log(2.0))
    bal2.backward({"a": T(2.0)}, [])
    assert float(bal2.log_vars.grad[0]) == pytest.approx(0.0, abs=1e-7)
    assert [n for n, _ in bal.named_parameters()] == ["log_vars"]
    with pytest.raises(ValueError, match="init_log_var"):
        UncertaintyWeighting(("a",), init_log_var=math.inf)


# -- FAMO ----------------------------------------------------------------------------------------
def test_famo_objective_gradient_is_effective_weighted_sum():
    model = Toy()
    bal = FAMO(TASKS)
    with torch.no_grad():
        bal.logits.copy_(T([0.2, -0.1, 0.4]))
    losses = model.losses()
    params = list(model.parameters())
    vals = torch.stack([losses[k].detach() for k in TASKS]).float()
    z = torch.softmax(T([0.2, -0.1, 0.4]), 0)
    eff = (z / vals) / (z / vals).sum()  # w_k = z_k / (c L_k), c = sum_j z_j / L_j
    expected = grads_of(sum(float(eff[i]) * losses[k] for i, k in enumerate(TASKS)), params)
    res = bal.backward(losses, model.shared_params())
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    assert res.weights == pytest.approx(dict(zip(TASKS, eff.tolist(), strict=True)), rel=1e-5)
    assert sum(res.weights.values()) == pytest.approx(1.0)
    # the logits are buffers: the trainer's optimizer never sees them
    assert list(bal.parameters()) == []
    assert {"logits", "exp_avg", "exp_avg_sq", "steps"} <= set(bal.state_dict())


def test_famo_weight_moves_to_the_task_that_improved_less():
    bal = FAMO(("fast", "slow"), lr=0.1)
    before = {"fast": T(1.0), "slow": T(1.0)}
    after = {"fast": T(0.5), "slow": T(0.9)}
    for _ in range(3):
        bal.after_step(before, lambda: after)
    z = bal.task_weights()
    assert z["slow"] > z["fast"]
    assert float(bal.logits[1]) > 0 > float(bal.logits[0])


def test_famo_logit_update_matches_adam_on_softmax_vjp():
    gamma, lr = 0.01, 0.05
    bal = FAMO(TASKS, lr=lr, gamma=gamma, min_losses={"b": 0.1})
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=gamma)
    gen = torch.Generator().manual_seed(7)
    mins = T([0.0, 0.1, 0.0])
    for _ in range(5):
        prev = torch.rand(3, generator=gen) + 0.5
        curr = prev * (0.5 + torch.rand(3, generator=gen))
        delta = (prev - mins + 1e-8).log() - (curr - mins + 1e-8).log()
        (d,) = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)
        opt.zero_grad()
        w.grad = d
        opt.step()
        bal.after_step(dict(zip(TASKS, prev, strict=True)),
                       lambda c=curr: dict(zip(TASKS, c, strict=True)))
        torch.testing.assert_close(bal.logits, w.detach())


def test_famo_errors_and_non_finite_losses():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['z'\]"):
        FAMO(TASKS, min_losses={"z": 0.0})
    with pytest.raises(ValueError, match="lr must be"):
        FAMO(TASKS, lr=-1.0)
    bal = FAMO(("a", "b"))
    with pytest.raises(ValueError, match=r"above its lower bound.*\('b', -0\.5\)"):
        bal.objective({"a": T(1.0), "b": T(-0.5)})
    with pytest.raises(KeyError, match="from recompute"):
        bal.after_step({"a": T(1.0), "b": T(1.0)}, lambda: {"a": T(1.0)})
    with pytest.warns(RuntimeWarning, match="not updated"):
        bal.after_step({"a": T(1.0), "b": T(1.0)}, lambda: {"a": T(math.nan), "b": T(1.0)})
    torch.testing.assert_close(bal.logits, torch.zeros(2))
    assert int(bal.steps) == 0


def test_active_rows_marks_tasks_with_any_nonzero_or_nan_gradient():
    from mtcore.plugin import active_rows

    g = torch.tensor([[0.0, 0.0], [0.0, -1e-30], [math.nan, 0.0], [0.0, 0.0]])
    assert active_rows(g).tolist() == [False, True, True, False]
