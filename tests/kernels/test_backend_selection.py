"""Backend selection (argument > set_backend > MTCORE_KERNELS > auto), the fallback warning of an
unavailable backend or a failed build, and the build cache location."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import mtcore.kernels as K
from mtcore.kernels import _backend, _build


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("MTCORE_KERNELS", raising=False)
    K.set_backend(None)
    _backend._warned.clear()
    yield
    K.set_backend(None)
    _backend._warned.clear()


X = torch.zeros(2, 3)


def test_auto_on_cpu_picks_cpp_when_built(cpp_built):
    assert K.get_backend() == "auto"
    assert _backend.resolve(X) == "cpp"
    assert {"reference", "cpp"} <= set(K.available_backends("cpu"))


def test_precedence_argument_over_set_backend_over_env(cpp_built, monkeypatch):
    monkeypatch.setenv("MTCORE_KERNELS", "reference")
    assert K.get_backend() == "reference" and _backend.resolve(X) == "reference"
    K.set_backend("cpp")
    assert K.get_backend() == "cpp" and _backend.resolve(X) == "cpp"
    assert _backend.resolve(X, "reference") == "reference"
    K.set_backend(None)
    assert _backend.resolve(X) == "reference"  # back to the environment


def test_dispatch_reaches_the_chosen_backend(cpp_built, monkeypatch):
    calls = []
    monkeypatch.setattr(K.ops.seg_cross_entropy.ref, "seg_cross_entropy",
                        lambda *a, **k: calls.append("reference") or torch.tensor(0.0))
    x, t = torch.randn(2, 3), torch.tensor([0, 2])
    K.seg_cross_entropy(x, t, backend="cpp")
    assert calls == []
    K.set_backend("reference")
    K.seg_cross_entropy(x, t)
    assert calls == ["reference"]


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        K.set_backend("fast")
    with pytest.raises(ValueError, match="backend: unknown kernel backend"):
        K.seg_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="fast")


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MTCORE_KERNELS", "gpu")
    with pytest.raises(ValueError, match="MTCORE_KERNELS"):
        K.get_backend()


def test_explicit_unavailable_backend_raises():
    with pytest.raises(RuntimeError, match="'cuda' requested but unavailable"):
        K.seg_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")


def test_configured_unavailable_backend_warns_once_and_falls_back(cpp_built):
    K.set_backend("cuda")
    with pytest.warns(RuntimeWarning, match=r"'cuda' is unavailable .* using 'cpp' instead"):
        assert _backend.resolve(X) == "cpp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve(X) == "cpp"  # no second warning


def test_failed_build_warns_once_and_uses_reference(cpp_built, monkeypatch):
    def broken(verbose):
        raise RuntimeError("Error building extension 'mtcore_C': g++ not found")

    monkeypatch.setattr(_build, "_build", broken)
    _build._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="building the C\\+\\+ kernels failed .*g\\+\\+ not "
                                                "found.*falling back to the reference"):
            assert _backend.resolve(X) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.resolve(X) == "reference"
            out = K.seg_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))
        assert out.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
        assert K.build_extensions() is None
        with pytest.raises(RuntimeError, match="'cpp' requested but unavailable.*build failed"):
            _backend.resolve(X, "cpp")
    finally:
        monkeypatch.undo()
        _build._reset_for_tests()
        assert _build.load_cpu_ops()


def test_cache_dir_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("MTCORE_CACHE", str(tmp_path))
    assert _build.cache_dir() == tmp_path / "ext"
    assert (_build.csrc_dir() / "cpu" / "seg_cross_entropy.cpp").is_file()


def test_build_extensions_returns_library(cpp_built):
    path = K.build_extensions()
    assert path is not None and path.is_file() and path.name.startswith("mtcore_C_")


def test_a_build_leaves_the_flags_alone_so_the_cache_key_is_stable(monkeypatch, tmp_path):
    """cpp_extension.load appends to the flag lists it gets; a changed key would build and load a
    second library in the same process, whose TORCH_LIBRARY registrations abort Python."""
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setenv("MTCORE_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "_LOADED", set())

    def fake_load(**kw):
        kw["extra_cflags"].append("-DADDED_BY_LOAD")
        kw["extra_ldflags"].append("-lgomp")

    monkeypatch.setattr(cpp_ext, "load", fake_load)
    before = (list(_build.CFLAGS), list(_build.LDFLAGS))
    first = _build._build(verbose=False)
    assert (list(_build.CFLAGS), list(_build.LDFLAGS)) == before
    assert _build._build(verbose=False) == first  # same key: not built or loaded again


def test_a_first_build_says_so_and_a_cached_one_is_silent(monkeypatch, tmp_path, capsys):
    """The first use compiles for a minute or more: a run that sat at 0% with no word looked hung."""
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setenv("MTCORE_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "_LOADED", set())
    monkeypatch.setattr(cpp_ext, "load", lambda **kw: (Path(kw["build_directory"]) /
                                                     f"{kw['name']}.so").write_bytes(b""))
    lib = _build._build(verbose=False)
    err = capsys.readouterr().err
    assert "mtcore: building the C++" in err and str(lib.parent) in err
    monkeypatch.setattr(_build, "_LOADED", set())
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    assert _build._build(verbose=False) == lib  # cached: loaded, not built
    assert capsys.readouterr().err == ""


def test_loading_a_second_build_is_a_clear_error_not_an_abort(monkeypatch, tmp_path):
    monkeypatch.setenv("MTCORE_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "_LOADED", {tmp_path / "mtcore_C_0000000000000000.so"})
    with pytest.raises(RuntimeError, match="another build of the kernels .* restart Python"):
        _build._build(verbose=False)


def _all_ops(x: torch.Tensor, w: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """A scalar through every fused op, differentiable w.r.t. ``x`` [4, 3, 5, 6] and ``w`` [4]."""
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 3, (4, 5, 6), generator=g)
    image = torch.rand(4, 3, 5, 6, generator=g, dtype=x.dtype)
    h = K.bias_act(x, w[:3], 1, "silu", clamp=2.0, backend=backend)
    d = K.minibatch_stddev(h, 2, 1, backend=backend)
    logits = d.mean((2, 3))
    mu, logvar = logits[:, :2], logits[:, 2:]
    vae = K.vae_loss(h, image, mu, logvar, 0.5, "bernoulli", backend=backend)
    joint = K.joint_loss(h, t, logits[:, :3], t[:, 0, 0], h, image, mu, logvar, logits[:, :1], w,
                         "uncertainty", backend=backend)
    return (K.seg_cross_entropy(h, t, label_smoothing=0.1, backend=backend) + vae.total
            + K.adversarial_loss(logits[:, 3], "hinge", "d_fake", backend=backend) + joint.total)


def test_torch_func_transforms_run_the_reference(cpp_built):
    """functorch cannot differentiate the native ops' C++ autograd: auto picks the reference under
    torch.func.grad / vmap (it raised "cannot use C++ torch::autograd::Function with functorch"),
    and stays cpp outside; the gradients equal plain autograd through the reference."""
    x, w = torch.randn(4, 3, 5, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64) * 0.1
    leaves = (x.clone().requires_grad_(), w.clone().requires_grad_())
    want = torch.autograd.grad(_all_ops(*leaves, backend="reference"), leaves)
    got = torch.func.grad(_all_ops, argnums=(0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    per_sample = torch.func.vmap(lambda v: K.adversarial_loss(v, "hinge", "d_real"))(x)
    torch.testing.assert_close(per_sample, torch.stack(
        [K.adversarial_loss(v, "hinge", "d_real", backend="reference") for v in x]))
    assert _backend.resolve(X) == "cpp"  # outside a transform


def test_native_backend_under_torch_func(cpp_built):
    """Asked for by name it is a clear error; configured, it falls back to the reference, warning
    once."""
    x = torch.randn(6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'cpp' requested but unavailable: a torch.func transform"):
        torch.func.grad(lambda v: K.adversarial_loss(v, backend="cpp"))(x)
    K.set_backend("cpp")
    with pytest.warns(RuntimeWarning, match="'cpp' is unavailable .*torch.func.* using 'reference'"):
        got = torch.func.grad(lambda v: K.adversarial_loss(v, "least_squares"))(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.func.grad(lambda v: K.adversarial_loss(v, "least_squares"))(x)
    torch.testing.assert_close(got, 2 * (x - 1) / x.numel())  # d/dx mean((x - 1)^2), role g


# PyTorch's own forward-AD decompositions call the deprecated torch.jit.script on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_runs_the_reference(cpp_built):
    """Forward-mode AD (dual tensors) cannot go through the C++ autograd Functions ("jvp is not
    implemented"): auto uses the reference inside a dual level; the JVP equals the reference's."""
    import torch.autograd.forward_ad as fwAD

    x, v = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    t = torch.tensor([[0, 1, 2, 1, 0]] * 4)
    with fwAD.dual_level():
        jvp = fwAD.unpack_dual(K.seg_cross_entropy(fwAD.make_dual(x, v), t)).tangent
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(K.seg_cross_entropy(xr, t, backend="reference"), xr)
    torch.testing.assert_close(jvp, (g * v).sum())  # <grad, v>
    assert _backend.resolve(X) == "cpp"
