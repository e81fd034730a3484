"""Time one full default training step with the C++ kernels against the PyTorch reference.

    python benchmarks/train_step.py [--repeats 15] [--warmup 3] [--set key=value ...]

Both trainers are built from the same config and seed and train on the same fixed batch in one
process; repeats interleave them (rotating which goes first), so machine load hits both
alike. The step is ``Trainer.train_step``: the GAN discriminator step (with R1) and the balanced
main step of all four tasks. Prints each median and quartiles and the speed-up reference / cpp
(the issue's target is >= 1.15x).

``--profile`` then traces 8 more steps of the cpp trainer with ``torch.profiler`` and prints the
ops by their own time per step: where a step goes (convolutions, BatchNorm, the fused ops, ...),
and the convolutions' FLOPs (from the traced shapes) per second, against the CPU's peak.

``--vs key=value`` (repeatable) adds a trainer "vs": the cpp kernels with those overrides on top
(``--vs model.channels_last=false``: what the NHWC default gains), timed in the same rotation.

``--bound`` adds a third trainer, "free", whose fused ops are stand-ins that cost next to nothing
(bias + activation returns its input, each loss is a plain mean, minibatch-stddev appends a
copied channel): reference / free is the most any kernel for these ops could gain in this step
(Amdahl's law), the figure that says whether the 1.15x target is reachable with them at all. The
model-layer ops (batch_norm_act, pixel_norm_act, upsample_conv2d) run their reference there, as
in the reference trainer: the bound is that of the issue's loss and discriminator ops alone.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import mtcore
from mtcore import kernels
from mtcore.kernels.reference.losses import VAELossTerms
from mtcore.trainer import Trainer, to_device

BASE = ["train.progress=false", "data.dataset.params.num_samples=256"]
KINDS = ("cpp", "reference")
FUSED_OPS = ("bias_act", "minibatch_stddev", "seg_cross_entropy", "vae_loss", "adversarial_loss")


def _free_ops() -> dict[str, object]:
    """Near-zero-cost stand-ins with the fused ops' signatures, outputs and gradient paths."""
    def vae_loss(recon, target, mu, logvar, *args, **kwargs):
        rec, kl = recon.float().mean(), (mu.float().mean() + logvar.float().mean())
        return VAELossTerms(rec, kl, rec + kl)

    return {
        "bias_act": lambda x, b, *args, **kwargs: x,
        "minibatch_stddev": lambda x, *args, **kwargs: torch.cat([x, x[:, :1]], 1),
        "seg_cross_entropy": lambda logits, *args, **kwargs: logits.float().mean(),
        "vae_loss": vae_loss,
        "adversarial_loss": lambda logits, *args, **kwargs: logits.float().mean(),
    }


def interleaved(kinds: Sequence[str], step: Callable[[str], float], warmup: int,
                repeats: int) -> dict[str, list[float]]:
    """``warmup + repeats`` rounds of ``step(kind)`` (which returns the seconds it timed) over
    all ``kinds``, rotating which goes first so machine load hits all alike; the last
    ``repeats`` rounds' times, by kind."""
    kinds = list(kinds)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(warmup + repeats):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:  # each kind in each slot
            elapsed = step(kind)
            if i >= warmup:
                times[kind].append(elapsed)
    return times


class _Patched:
    """Swap ``mtcore.kernels``' fused ops for ``ops`` inside the block (the components look them
    up there on every call)."""

    def __init__(self, ops: dict[str, object] | None) -> None:
        self.ops, self.saved = ops, {}

    def __enter__(self) -> None:
        for name, fn in (self.ops or {}).items():
            self.saved[name] = getattr(kernels, name)
            setattr(kernels, name, fn)

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(kernels, name, fn)
        self.saved = {}


def _quartiles(ts: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0] * 1e3, statistics.median(ts) * 1e3, q[2] * 1e3


def main(argv: list[str] | None = None) -> int:
    """Build both trainers, time interleaved steps, print the table and the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15,
                   help="timed steps per trainer (>= 2: quartiles need two)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer first")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override key=value (repeatable)")
    p.add_argument("--bound", action="store_true",
                   help="also time the step with near-free stand-ins for the fused ops")
    p.add_argument("--profile", action="store_true",
                   help="also print the cpp step's ops by their own time (torch.profiler)")
    p.add_argument("--vs", dest="vs", action="append", default=[],
                   help="also time cpp with these overrides on top (repeatable), e.g. "
                        "model.channels_last=false")
    args = p.parse_args(argv)
    if args.repeats < 2 or args.warmup < 0:
        p.error(f"--repeats must be >= 2 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    for o in (*args.overrides, *args.vs):
        if o.split("=", 1)[0].strip() == "kernels":
            p.error(f"{o!r}: the script chooses the kernels itself (cpp, reference, free)")
    if "cpp" not in kernels.available_backends("cpu"):
        print("the C++ kernels are unavailable here; nothing to compare")
        return 1
    kinds = (*KINDS, *(("free",) if args.bound else ()), *(("vs",) if args.vs else ()))
    ops = {"free": _free_ops()}
    backends = {"free": "reference", "vs": "cpp"}
    trainers, batch = {}, None
    for kind in kinds:
        backend = backends.get(kind, kind)
        extra = args.vs if kind == "vs" else []
        exp = mtcore.build(None, [*BASE, *args.overrides, *extra, f'kernels="{backend}"'])
        trainer = Trainer(exp, None, progress=False, log=lambda _: None)
        trainer._apply_stage(0)
        if batch is None:  # one fixed batch, shared by both
            batch = to_device(next(iter(trainer._loader(trainer.train_set, True))),
                              trainer.device)
        trainers[kind] = trainer

    def step(kind: str) -> float:
        kernels.set_backend(backends.get(kind, kind))
        with _Patched(ops.get(kind)):
            t0 = time.perf_counter()
            trainers[kind].train_step(batch)
            return time.perf_counter() - t0

    times = interleaved(kinds, step, args.warmup, args.repeats)
    shape = {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {shape}")
    print(f"{'kernels':<10} {'median ms':>10} {'q25 ms':>9} {'q75 ms':>9} {'min ms':>9}")
    for kind in kinds:
        q25, med, q75 = _quartiles(times[kind])
        print(f"{kind:<10} {med:>10.1f} {q25:>9.1f} {q75:>9.1f} {min(times[kind]) * 1e3:>9.1f}")
    ratio = statistics.median(times["reference"]) / statistics.median(times["cpp"])
    per_pair = sorted(r / c for r, c in zip(times["reference"], times["cpp"], strict=True))
    print(f"speed-up cpp vs reference: {ratio:.3f}x (median of step times; per-pair ratio "
          f"q25..q75 {statistics.quantiles(per_pair, n=4)[0]:.3f}..{statistics.quantiles(per_pair, n=4)[2]:.3f}); "
          f"target >= 1.15x: {'met' if ratio >= 1.15 else 'missed'}")
    if args.vs:
        vs = statistics.median(times["vs"]) / statistics.median(times["cpp"])
        print(f"vs ({', '.join(args.vs)}) / cpp: {vs:.3f}x the step time")
    if args.bound:
        bound = statistics.median(times["reference"]) / statistics.median(times["free"])
        print(f"bound: reference vs free fused ops ({', '.join(FUSED_OPS)}): {bound:.3f}x, the "
              "most that faster kernels for these ops can gain in this step")
    if args.profile:
        _profile(trainers["cpp"], batch)
    return 0


def _profile(trainer: Trainer, batch: dict, steps: int = 8, top: int = 15) -> None:
    """Print the ops taking the most of a cpp step, by their own time (children excluded), and
    the convolutions' arithmetic throughput (GFLOP/s): how far they are from the CPU's peak."""
    from torch.profiler import ProfilerActivity, profile

    kernels.set_backend("cpp")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            trainer.train_step(batch)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print(f"profile of {steps} cpp steps (own time per step; {total / steps / 1e3:.1f} ms traced)")
    for e in rows[:top]:
        print(f"  {e.key[:60]:<60} {e.self_cpu_time_total / steps / 1e3:7.2f} ms "
              f"{100 * e.self_cpu_time_total / total:5.1f}%  x{e.count // steps}")
    for name, (flop, us) in _conv_flops(prof.events()).items():
        print(f"  {name}: {flop / steps / 1e9:.2f} GFLOP per step in {us / steps / 1e3:.1f} ms: "
              f"{flop / us / 1e3:.0f} GFLOP/s")
    print(f"  for scale, a 1024^3 fp32 matrix product here: {_matmul_gflops():.0f} GFLOP/s")


def _matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Median GFLOP/s of an n x n x n float32 matrix product: about what this CPU sustains."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _conv_flops(events) -> dict[str, tuple[float, float]]:
    """(FLOPs, own microseconds) of the traced convolutions, forward and backward, from their
    recorded shapes: 2 * N * H_out * W_out * |weight| per product, one product per gradient the
    backward's output mask asks for (weight, input; the bias gradient is a sum, not counted).
    Transposed convolutions (the U-Net's 2x2 up-convolutions) are left out, time and FLOPs;
    groups and dilation are taken as 1 (as in every model here)."""
    out = {"convolution forward": [0.0, 0.0], "convolution backward": [0.0, 0.0]}
    for e in events:
        shapes, concrete = e.input_shapes, e.concrete_inputs
        if e.name == "aten::mkldnn_convolution":  # (input, weight, bias, padding, stride, ...)
            (n, _, h, w), weight = shapes[0], shapes[1]
            stride = concrete[4] if concrete and len(concrete) > 4 and concrete[4] else (1, 1)
            padding = concrete[3] if concrete and len(concrete) > 3 and concrete[3] else (0, 0)
            ho = (h + 2 * padding[0] - weight[2]) // stride[0] + 1
            wo = (w + 2 * padding[1] - weight[3]) // stride[1] + 1
            key = "convolution forward"
            flop = 2.0 * n * ho * wo * math.prod(weight)
        elif e.name == "aten::convolution_backward":  # (grad_out, input, weight, ..., mask)
            if concrete and len(concrete) > 7 and concrete[7]:  # transposed
                continue
            (n, _, ho, wo), weight = shapes[0], shapes[2]
            mask = concrete[-1] if concrete and concrete[-1] else (True, True, True)
            key = "convolution backward"
            flop = 2.0 * n * ho * wo * math.prod(weight) * (bool(mask[0]) + bool(mask[1]))
        else:
            continue
        out[key][0] += flop
        out[key][1] += e.self_cpu_time_total
    return {k: (f, t) for k, (f, t) in out.items() if t > 0}


if __name__ == "__main__":
    raise SystemExit(main())
