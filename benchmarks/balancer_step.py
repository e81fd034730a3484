"""What each loss balancer costs per training step, in one process on the same batch.

    python benchmarks/balancer_step.py [--balancers equal,pcgrad,...] [--repeats 10]
                                       [--warmup 2] [--set key=value ...]

One trainer per balancer is built from the same config (default: the built-in experiment, its
kernels ``auto``) and seed; ``--warmup`` untimed rounds, then the timed ones, interleave the
trainers (rotating which goes first) on one fixed batch, so machine load hits all alike.
Prints each balancer's median step time with its quartiles and the ratio to the first listed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from balancer_sweep import DEFAULT
from train_step import interleaved

import mtcore
from mtcore.trainer import Trainer, to_device

BASE = ["train.progress=false", "data.dataset.params.num_samples=256"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--balancers", default=DEFAULT,
                    help=f"comma-separated registry names; the first is the baseline ({DEFAULT})")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per balancer (>= 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per balancer first")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.balancers.split(",") if n.strip()]
    if not names:
        ap.error("--balancers: give at least one name")
    if args.repeats < 2:
        ap.error("--repeats must be >= 2 (quartiles need two)")
    trainers = {}
    for name in names:
        exp = mtcore.build(None, [*BASE, *args.overrides, f'balancer={{name="{name}", params={{}}}}'],
                           splits=("train",))
        trainers[name] = Trainer(exp, None, progress=False, log=lambda _: None)
        trainers[name]._apply_stage(0)
    first = trainers[names[0]]
    batch = to_device(next(iter(first._loader(first.train_set, train=True))), first.device)

    def step(name: str) -> float:
        t0 = time.perf_counter()
        trainers[name].train_step(batch)
        return time.perf_counter() - t0

    times = interleaved(names, step, args.warmup, args.repeats)
    base = statistics.median(times[names[0]])
    print(f"{args.repeats} interleaved steps per balancer, batch {len(batch['image'])}, "
          f"kernels {first.cfg['kernels']}")
    print("| balancer | step (median) | q25-q75 | vs " + names[0] + " |")
    print("| --- | ---: | ---: | ---: |")
    for name in names:
        q = statistics.quantiles(times[name], n=4)
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.1f} ms | {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} ms | "
              f"{med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
