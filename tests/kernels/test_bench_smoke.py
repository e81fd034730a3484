"""``mtcore bench`` in quick mode: the table has its columns and sane numbers; byte and memory counts."""

from __future__ import annotations

import pytest
import torch

from mtcore.kernels import bench


def _markdown_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]
    return header, rows


def test_quick_bench_prints_every_column_with_positive_numbers(capsys):
    assert bench.main(ops=["seg_ce", "bias_lrelu"], quick=True, markdown=True,
                      impls=("eager", "cpp")) == 0
    header, rows = _markdown_rows(capsys.readouterr().out)
    assert header == list(bench.COLUMNS)
    keys = {(r["op"], r["impl"], r["pass"]) for r in rows}
    assert keys == {(op, impl, p) for op in ("seg_ce", "bias_lrelu") for impl in ("eager", "cpp")
                    for p in bench.PASSES}
    for r in rows:
        q25, med, q75, low = (float(r[k]) for k in ("q25_ms", "median_ms", "q75_ms", "min_ms"))
        assert 0 < low <= q25 <= med <= q75, r
        assert float(r["vs_eager"]) > 0 and float(r["bw"]) > 0
        if r["impl"] == "eager":
            assert float(r["vs_eager"]) == 1.0
        if r["pass"] == "fwd+bwd":
            # every implementation must at least allocate the input gradients it returns
            assert float(r["peak_MiB"]) > 0, r
        else:
            assert r["peak_MiB"] == "-"


def test_unknown_op_is_an_error_naming_the_op(capsys):
    assert bench.main(ops=["nope"], quick=True) == 2
    assert "nope" in capsys.readouterr().err


def test_floor_bytes_count_inputs_outputs_and_gradients():
    inputs = bench.CASES["seg_ce"].make(True, torch.device("cpu"))  # logits 4x5x8x8, target 4x8x8
    out = torch.zeros(())
    logits, target = 4 * 5 * 8 * 8 * 4, 4 * 8 * 8 * 8
    assert bench.floor_bytes(inputs, out) == {
        "fwd": logits + target + 4, "bwd": 4 + logits, "fwd+bwd": logits + target + 8 + logits}


def test_cpu_peak_memory_sees_a_known_allocation():
    size = 3 * 2**20  # an op that allocates a 12 MiB temporary, then returns a scalar
    case = bench.BenchCase("alloc", "none", "", "", lambda q, d: {}, lambda fn, t: fn(t))
    x = torch.ones(size, requires_grad=True)

    def fn(_):
        return (x * 2.0).sum()

    runner = bench._Runner(case, fn, {"x": x}, None, torch.device("cpu"))
    peak, held = bench.peak_memory(runner)
    # the forward's x*2 (12 MiB, freed after forward as sum needs no saved input) and the
    # gradient of x (12 MiB) are both allocated; at most both at once plus small scalars
    assert 4 * size <= peak <= 2 * 4 * size + 4096
    assert held < 4 * size  # nothing large is saved for backward


def _load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_bound_stand_ins_match_the_real_ops_outputs():
    """The `free` column only bounds the step if its stand-ins return what the real ops return
    (shapes, a scalar loss, a gradient path to every input the op differentiates)."""
    free = _load_script("train_step")._free_ops()
    from mtcore import kernels

    x, b = torch.randn(4, 8, 5, 5, requires_grad=True), torch.randn(8)
    assert free["bias_act"](x, b, act="lrelu").shape == kernels.bias_act(x, b, act="lrelu").shape
    h = torch.randn(8, 6, 4, 4)
    assert free["minibatch_stddev"](h, group_size=4).shape == kernels.minibatch_stddev(h, 4).shape
    logits, target = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randint(0, 3, (2, 4, 4))
    assert free["seg_cross_entropy"](logits, target).dim() == 0
    recon, mu, lv = (torch.randn(2, 3, 4, 4, requires_grad=True),
                     torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True))
    terms = free["vae_loss"](recon, torch.rand(2, 3, 4, 4), mu, lv, 1.0, "bernoulli")
    assert type(terms) is type(kernels.vae_loss(recon, torch.rand(2, 3, 4, 4), mu, lv))
    terms.total.backward()
    assert all(t.grad is not None for t in (recon, mu, lv))
    assert free["adversarial_loss"](torch.randn(6), "hinge", "g").dim() == 0


def test_train_step_and_step_ops_scripts_run(capsys):
    tiny = ["data.dataset.params.size=16", "data.dataset.params.num_samples=32",
            "data.batch_size=16", "model.backbone.params.width=8",
            "tasks.vae.head.params.width=8", "tasks.gan.head.params.width=8",
            "tasks.gan.head.params.d_width=8"]
    args = ["--repeats", "2", "--warmup", "0", "--bound", "--profile",
            "--vs", "model.channels_last=false"]
    for o in tiny:
        args += ["--set", o]
    assert _load_script("train_step").main(args) == 0
    out = capsys.readouterr().out
    assert "speed-up cpp vs reference" in out and "bound: reference vs free" in out
    assert "vs (model.channels_last=false) / cpp:" in out
    # the profile lists the step's ops by their own time, convolutions and the fused ops among them
    prof = out.split("profile of 8 cpp steps")[1].splitlines()[1:]
    ops, flops = prof[:15], prof[15:]
    assert any("convolution" in r for r in ops)
    shares = [float(r.split("ms")[1].split("%")[0]) for r in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0 + 1e-6
    # then the convolutions' throughput, and a matrix product's for scale
    rates = {r.split(":")[0].strip(): float(r.split()[-2]) for r in flops if r.endswith("GFLOP/s")}
    assert set(rates) == {"convolution forward", "convolution backward",
                          "for scale, a 1024^3 fp32 matrix product here"}
    assert all(v > 0 for v in rates.values())
    step_ops = _load_script("step_ops")
    for layout in ("channels_last", "contiguous"):
        assert step_ops.main(["--calls", "2", "--layout", layout]) == 0
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if line.endswith(tuple("0123456789"))]
        assert f"{layout} model outputs" in out
        assert len(rows) == 21 and all(float(r.split()[-1]) > 0 for r in rows)
    # the layouts hold the same numbers, so both time the same maths
    loss_cl, (x_cl, *_) = step_ops.cases(True)["bias_act lrelu 32x16x32x32"]("reference")
    loss_c, (x_c, *_) = step_ops.cases(False)["bias_act lrelu 32x16x32x32"]("reference")
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and x_c.is_contiguous()
    assert torch.equal(x_cl, x_c) and torch.allclose(loss_cl, loss_c, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                    reason="the count reads oneDNN's convolution ops (torch built without mkldnn)")
def test_conv_flop_count_matches_a_hand_count():
    """train_step.py --profile's GFLOP/s: FLOPs from the traced shapes, against 2 * MACs counted
    by hand for a strided, padded conv (forward; backward with and without the input gradient)."""
    from torch.profiler import ProfilerActivity, profile

    conv = torch.nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False)
    x = torch.randn(4, 6, 9, 7)
    macs = 4 * 5 * 4 * 10 * 6 * 3 * 3  # N * H_out * W_out * C_out * C_in * k * k; 9 -> 5, 7 -> 4
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        conv(x).sum().backward()  # weight gradient only
        conv(x.requires_grad_()).sum().backward()  # weight and input gradients
    flops = _load_script("train_step")._conv_flops(prof.events())
    assert flops["convolution forward"][0] == 2 * 2 * macs
    assert flops["convolution backward"][0] == 2 * macs * (1 + 2)


@pytest.mark.parametrize("args,match", [
    (["--repeats", "1"], "--repeats must be >= 2"),
    (["--set", 'kernels="reference"'], "the script chooses the kernels itself"),
    (["--vs", "kernels=cpp"], "the script chooses the kernels itself"),
])
def test_train_step_script_rejects_what_it_cannot_do(args, match, capsys):
    """--repeats 1 crashed after timing everything (quartiles of one value); a kernels override
    was silently replaced by the script's own."""
    with pytest.raises(SystemExit) as exc:
        _load_script("train_step").main(args)
    assert exc.value.code == 2 and match in capsys.readouterr().err
