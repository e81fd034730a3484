"""Does multi-task help? Train each task alone and all tasks together with the same budget.

    python benchmarks/multitask_vs_single.py [--set key=value ...] [--out runs/mtl]

Every run uses the same config (default: the built-in experiment) and so the same number of
epochs and steps; single-task runs disable the other tasks (a head that reads or shares another
task's parts gets its own: a GAN its own generator, a cascaded classifier the pooled head).
Prints each task's primary metric and delta_m (Maninis et al. 2019): the mean over tasks of the
signed relative change of the multi-task model against the single-task model, in percent,

    delta_m = 100/T * sum_k (-1)^{l_k} (M_mt,k - M_st,k) / M_st,k

with l_k = 1 when lower is better. One primary metric per task (an unweighted mean over tasks):
seg mIoU, cls accuracy, VAE PSNR, GAN FID (lower is better).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mtcore

PRIMARY = {  # task -> (metric key, higher is better)
    "seg": ("miou", True),
    "cls": ("accuracy", True),
    "vae": ("psnr", True),
    "gan": ("fid", False),
}


def delta_m(multi: dict[str, float], single: dict[str, float]) -> float:
    """Maninis et al. (2019) delta_m in percent over the tasks present in both."""
    terms = []
    for task, (_, higher) in PRIMARY.items():
        if task in multi and task in single and single[task]:
            sign = 1.0 if higher else -1.0
            terms.append(sign * (multi[task] - single[task]) / abs(single[task]))
    return 100.0 * sum(terms) / len(terms)


def primary(metrics: dict[str, float], tasks: list[str]) -> dict[str, float]:
    return {t: metrics[f"{t}.{PRIMARY[t][0]}"] for t in tasks if f"{t}.{PRIMARY[t][0]}" in metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/mtl")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse runs whose metrics.json already exists in --out")
    args = ap.parse_args()
    base = mtcore.build(None, args.overrides, splits=())
    tasks = [t for t in base.config["tasks"] if t in PRIMARY]
    common = args.overrides + ["train.progress=false", "train.samples_every=0"]

    def run(overrides: list[str], out: Path) -> dict:
        if args.reuse and (out / "metrics.json").exists():
            return json.loads((out / "metrics.json").read_text())
        return mtcore.fit(mtcore.build(None, overrides), out)

    single: dict[str, float] = {}
    for task in tasks:
        off = [f"tasks.{t}.enabled=false" for t in tasks if t != task]
        params = base.config["tasks"][task]["head"].get("params", {})
        if params.get("share_decoder"):
            # alone, a generator cannot borrow another task's decoder: it gets its own
            off.append(f"tasks.{task}.head.params.share_decoder=\"\"")
        if params.get("seg_task"):
            # alone, a layout GAN has no segmenter to judge its images: its discriminator only
            off.append(f"tasks.{task}.head.params.seg_task=\"\"")
        if params.get("from_task"):
            # alone, a classifier cannot read another task's output: it gets the pooled head
            off += [f"tasks.{task}.head.params.from_task=\"\"",
                    f"tasks.{task}.head.params.pool=\"avgmax\""]
        result = run(common + off, Path(args.out) / f"single_{task}")
        single.update(primary(result["metrics"], [task]))
    result = run(common, Path(args.out) / "multi")
    multi = primary(result["metrics"], tasks)
    rows = ["| task | metric | single-task | multi-task |", "| --- | --- | --- | --- |"]
    for t in tasks:
        name, higher = PRIMARY[t]
        rows.append(f"| {t} | {name} ({'higher' if higher else 'lower'} is better) | "
                    f"{single.get(t, float('nan')):.4f} | {multi.get(t, float('nan')):.4f} |")
    dm = delta_m(multi, single)
    rows.append(f"\ndelta_m = {dm:+.2f}% (mean over {len(tasks)} tasks, one metric each)")
    print("\n".join(rows))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(
        {"single": single, "multi": multi, "delta_m_percent": dm, "overrides": args.overrides},
        indent=2))


if __name__ == "__main__":
    main()
