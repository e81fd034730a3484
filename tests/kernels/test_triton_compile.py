"""Every Triton kernel compiles for a real GPU (sm_90 PTX, assembled by Triton's bundled ptxas),
without a GPU.

The other Triton tests run the kernels in the interpreter (TRITON_INTERPRET=1), which accepts code
the compiler rejects (a non-constexpr block size, Python branches on tensor values, dtype clashes
in ``tl.where``). This compiles each kernel for each dtype and each constexpr combination the
wrappers launch, in a subprocess without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mtcore.kernels.triton_kernels import adversarial, bn_act, fused_bias_act, mbstd, pn_act, seg_ce, vae

target = GPUTarget("cuda", 90, 32)
count, failed = 0, []


def build(kernel, sig, consts, tag, **options):
    global count
    sig = {**sig, **{k: "constexpr" for k in consts}}
    try:
        triton.compile(ASTSource(kernel, sig, consts), target=target, options=options)
        count += 1
    except Exception as e:  # report every failure, not just the first
        failed.append(f"{tag} {consts}: {type(e).__name__}: {str(e)[:400]}")


SCALARS = {"alpha_arg": "fp32", "gain_arg": "fp32", "clamp_arg": "fp32"}
for dt in ("fp32", "bf16", "fp16", "fp64"):
    acc, f64 = ("fp64", True) if dt == "fp64" else ("fp32", False)
    for act, has_b, clamp in itertools.product(range(6), (False, True), (False, True)):
        c = dict(ACT=act, HAS_B=has_b, HAS_CLAMP=clamp, F64=f64, BLOCK=1024)
        build(fused_bias_act._fwd_kernel, {"x_ptr": f"*{dt}", "b_ptr": f"*{dt}",
              "coef_ptr": f"*{dt}", "y_ptr": f"*{dt}", "numel": "i32", "C": "i32",
              "inner": "i32", **SCALARS}, c, f"bias_act fwd {dt}")
        build(fused_bias_act._grad_kernel, {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}",
              "b_ptr": f"*{dt}", "coef_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "numel": "i64",
              "C": "i32", "inner": "i32", **SCALARS}, c, f"bias_act grad {dt}")
    for w, smooth, grad, (br, bc) in itertools.product(
            (False, True), (False, True), (False, True), ((256, 16), (4, 1024), (1, 1024))):
        c = dict(HAS_WEIGHT=w, SMOOTH=smooth, COMPUTE_GRAD=grad, F64=f64, BLOCK_R=br, BLOCK_C=bc)
        build(seg_ce._seg_ce_kernel, {"logits_ptr": f"*{dt}", "target_ptr": "*i64",
              "weight_ptr": f"*{dt}", "coef_ptr": f"*{acc}", "loss_ptr": f"*{acc}",
              "grad_ptr": f"*{dt}", "M": "i32", "C": "i32", "P": "i32", "ignore_index": "i32"},
              c, f"seg_ce {dt}", num_warps=8)  # as seg_ce.py launches it
    for kind, grad in itertools.product((0, 1), (False, True)):
        build(vae._rec_kernel, {"x_ptr": f"*{dt}", "t_ptr": f"*{dt}", "coef_ptr": f"*{acc}",
              "partial_ptr": f"*{acc}", "grad_ptr": f"*{dt}", "numel": "i32"},
              dict(KIND=kind, COMPUTE_GRAD=grad, F64=f64, BLOCK=1024), f"vae rec {dt}")
    for grad in (False, True):
        build(vae._kl_kernel, {"mu_ptr": f"*{dt}", "lv_ptr": f"*{dt}", "coef_ptr": f"*{acc}",
              "partial_ptr": f"*{acc}", "gmu_ptr": f"*{dt}", "glv_ptr": f"*{dt}",
              "numel": "i32"}, dict(COMPUTE_GRAD=grad, F64=f64, BLOCK=16), f"vae kl {dt}")
    for kind, role, grad in itertools.product(range(3), range(3), (False, True)):
        build(adversarial._adv_kernel, {"x_ptr": f"*{dt}", "coef_ptr": f"*{acc}",
              "partial_ptr": f"*{acc}", "grad_ptr": f"*{dt}", "numel": "i32"},
              dict(KIND=kind, ROLE=role, COMPUTE_GRAD=grad, F64=f64, BLOCK=1024),
              f"adversarial {dt}")
    dims = {"G": "i32", "M": "i32", "F": "i32", "C": "i32", "HW": "i32"}
    c = dict(F64=f64, BLOCK=256)
    build(mbstd._stat_kernel, {"x_ptr": f"*{dt}", "partial_ptr": f"*{acc}", **dims, "K": "i32"},
          c, f"mbstd stat {dt}")
    build(mbstd._gstat_kernel, {"go_ptr": f"*{dt}", "partial_ptr": f"*{acc}", **dims}, c,
          f"mbstd gstat {dt}")
    build(mbstd._dx_kernel, {"go_ptr": f"*{dt}", "x_ptr": f"*{dt}", "coef_ptr": f"*{acc}",
          "dx_ptr": f"*{dt}", **dims, "K": "i32"}, c, f"mbstd dx {dt}")
    out = {"x_ptr": f"*{dt}", "stat_ptr": f"*{acc}", "y_ptr": f"*{dt}", "numel": "i32",
           "M": "i32", "F": "i32", "C": "i32", "HW": "i32"}
    # Triton turns an integer argument equal to 1 into a constant: F = 1 is the default
    for ones in ((), ("F",), ("F", "C"), ("F", "C", "HW")):
        build(mbstd._out_kernel, {k: v for k, v in out.items() if k not in ones},
              dict(BLOCK=1024, **{k: 1 for k in ones}), f"mbstd out {dt}")
    # batch_norm_act / pixel_norm_act: channels-last walks have inner = 1 (pixel norm: CS = 1),
    # NCHW ones PS = 1; Triton makes an integer argument equal to 1 a constant
    for fwd, block_c, one in itertools.product((False, True), (1, 16, 64), ("PS", "CS")):
        sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "out_ptr": f"*{dt}", "P": "i32",
               "C": "i32", "S": "i32", "PS": "i32", "CS": "i32", "eps": "fp32", "neg": "fp32"}
        del sig[one]
        build(pn_act._pn_kernel, sig, {"FWD": fwd, "F64": f64, "BLOCK_P": max(16, 2048 // block_c),
              "BLOCK_C": block_c, one: 1}, f"pixel_norm_act {dt}")
    for grad, block_c, nhwc in itertools.product((False, True), (1, 16, 64), (False, True)):
        sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "coef_ptr": f"*{acc}", "pa_ptr": f"*{acc}",
               "pb_ptr": f"*{acc}", "M": "i32", "C": "i32", "inner": "i32", "neg": "fp32"}
        c = {"GRAD": grad, "F64": f64, "BLOCK_J": max(16, 4096 // block_c), "BLOCK_C": block_c}
        if nhwc:
            del sig["inner"]
            c["inner"] = 1
        build(bn_act._sums_kernel, sig, c, f"batch_norm_act sums {dt}")
    for fwd, nhwc in itertools.product((False, True), (False, True)):
        sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "coef_ptr": f"*{acc}", "out_ptr": f"*{dt}",
               "numel": "i32", "C": "i32", "inner": "i32", "neg": "fp32"}
        c = {"FWD": fwd, "F64": f64, "BLOCK": 1024}
        if nhwc:
            del sig["inner"]
            c["inner"] = 1
        build(bn_act._map_kernel, sig, c, f"batch_norm_act map {dt}")
print("compiled", count)
for f in failed:
    print("FAILED", f)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(Path(os.environ["MTCORE_CACHE"]) / "triton-compile-check")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    compiled = int(proc.stdout.split("compiled")[1].split()[0])
    assert compiled == 4 * (2 * 24 + 24 + 4 + 2 + 18 + 3 + 4 + 12 + 12 + 4), proc.stdout
