"""Which loss balancer? Train the same experiment once per balancer, with the same budget.

    python benchmarks/balancer_sweep.py [--balancers equal,pcgrad,...] [--set key=value ...]
                                        [--out runs/balancers] [--reuse]

Every run uses the same config (default: the built-in experiment), seed and data; only
``balancer`` changes, to each name with its default parameters (so balancers with required
parameters, such as ``fixed``, cannot be swept). Prints each task's primary metric, delta_m
(Maninis et al. 2019) against the first balancer listed, and the seconds per epoch (training
and the per-epoch evaluation). ``--reuse`` takes a finished run's metrics.json when its
config.toml is the one this sweep would train (else it is an error).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from multitask_vs_single import PRIMARY, delta_m, primary

import mtcore
from mtcore.config import dumps

DEFAULT = "equal,uncertainty,dwa,rlw,famo,pcgrad,mgda,cagrad,nash_mtl,gradnorm"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--balancers", default=DEFAULT,
                    help=f"comma-separated registry names; the first is the baseline ({DEFAULT})")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/balancers")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse runs whose metrics.json already exists in --out")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.balancers.split(",") if n.strip()]
    if not names:
        ap.error("--balancers: give at least one name")
    common = args.overrides + ["train.progress=false", "train.samples_every=0"]
    results: dict[str, dict] = {}
    for name in names:
        out = Path(args.out) / name
        overrides = [*common, f'balancer={{name="{name}", params={{}}}}']
        if args.reuse and (out / "metrics.json").exists():
            planned = dumps(mtcore.build(None, overrides, splits=()).config)
            if (out / "config.toml").read_text() != planned:
                ap.error(f"--reuse: {out} was trained with another config than this sweep's; "
                         "remove that run or drop --reuse")
            results[name] = json.loads((out / "metrics.json").read_text())
            continue
        exp = mtcore.build(None, overrides)
        t0 = time.perf_counter()
        results[name] = mtcore.fit(exp, out)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    tasks = [t for t in PRIMARY if any(f"{t}.{PRIMARY[t][0]}" in r["metrics"]
                                       for r in results.values())]
    base = primary(results[names[0]]["metrics"], tasks)
    head = " | ".join(f"{t} {PRIMARY[t][0]}" for t in tasks)
    rows = [f"| balancer | {head} | delta_m vs {names[0]} | s/epoch |",
            "| --- |" + " ---: |" * (len(tasks) + 2)]
    summary = {}
    for name in names:
        r = results[name]
        m = primary(r["metrics"], tasks)
        per_epoch = r["train_seconds"] / max(r["epochs"], 1)
        dm = delta_m(m, base)
        summary[name] = {"metrics": m, "delta_m_percent": dm, "train_seconds_per_epoch": per_epoch}
        cells = " | ".join(f"{m.get(t, float('nan')):.4f}" for t in tasks)
        rows.append(f"| {name} | {cells} | {dm:+.2f}% | {per_epoch:.0f} |")
    print("\n".join(rows))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(
        {"balancers": summary, "baseline": names[0], "overrides": args.overrides}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
