"""Time one full default training step with the C++ kernels against the PyTorch reference.

    python benchmarks/train_step.py [--repeats 15] [--warmup 3] [--set key=value ...]

Both trainers are built from the same config and seed and train on the same fixed batch in one
process; repeats interleave the two (alternating which goes first), so machine load hits both
alike. The step is ``Trainer.train_step``: the GAN discriminator step (with R1) and the balanced
main step of all four tasks. Prints each median and quartiles and the speed-up reference / cpp
(the issue's target is >= 1.15x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mtcore
from mtcore import kernels
from mtcore.trainer import Trainer

BASE = ["train.progress=false", "data.dataset.params.num_samples=256"]
KINDS = ("cpp", "reference")


def _quartiles(ts: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0] * 1e3, statistics.median(ts) * 1e3, q[2] * 1e3


def main(argv: list[str] | None = None) -> int:
    """Build both trainers, time interleaved steps, print the table and the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override key=value (repeatable)")
    args = p.parse_args(argv)
    if "cpp" not in kernels.available_backends("cpu"):
        print("the C++ kernels are unavailable here; nothing to compare")
        return 1
    trainers, batch = {}, None
    for kind in KINDS:
        exp = mtcore.build(None, [*BASE, *args.overrides, f'kernels="{kind}"'])
        trainer = Trainer(exp, None, progress=False, log=lambda _: None)
        trainer._apply_stage(0)
        if batch is None:  # one fixed batch, shared by both
            batch = next(iter(trainer._loader(trainer.train_set, True)))
            batch = {k: v.to(trainer.device) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
        trainers[kind] = trainer
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(args.warmup + args.repeats):
        order = KINDS if i % 2 == 0 else KINDS[::-1]
        for kind in order:
            kernels.set_backend(kind)
            t0 = time.perf_counter()
            trainers[kind].train_step(batch)
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
    shape = {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {shape}")
    print(f"{'kernels':<10} {'median ms':>10} {'q25 ms':>9} {'q75 ms':>9} {'min ms':>9}")
    for kind in KINDS:
        q25, med, q75 = _quartiles(times[kind])
        print(f"{kind:<10} {med:>10.1f} {q25:>9.1f} {q75:>9.1f} {min(times[kind]) * 1e3:>9.1f}")
    ratio = statistics.median(times["reference"]) / statistics.median(times["cpp"])
    per_pair = sorted(r / c for r, c in zip(times["reference"], times["cpp"], strict=True))
    print(f"speed-up cpp vs reference: {ratio:.3f}x (median of step times; per-pair ratio "
          f"q25..q75 {statistics.quantiles(per_pair, n=4)[0]:.3f}..{statistics.quantiles(per_pair, n=4)[2]:.3f}); "
          f"target >= 1.15x: {'met' if ratio >= 1.15 else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
