"""Class consistency of a checkpoint's conditional generator judged by its own classifier.

    python benchmarks/own_class_consistency.py runs/default/checkpoints/last.pt [-n 600]

Samples ``n`` images asked for labels ``0, 1, ..., K-1, 0, ...`` from the generative task
(``--task``, default the GAN) and prints the fraction the checkpoint's classification task
(``--cls``, default ``cls``) labels as asked, beside its accuracy on the validation images.
The run's ``gan.class_consistency`` is judged by the evaluator network instead, which neither
the generator nor this classifier trained with; the issue asks for both.
"""

from __future__ import annotations

import argparse

import torch

import mtcore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("-n", type=int, default=600)
    p.add_argument("--task", default="gan")
    p.add_argument("--cls", default="cls")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    trainer = mtcore.load(args.checkpoint, splits=("val",))
    model = trainer.model.eval()
    labels = torch.arange(args.n) % trainer.exp.info.num_labels
    images = model.heads[args.task].sample(args.n, labels=labels,
                                           generator=torch.Generator().manual_seed(args.seed))
    pred = torch.cat([model.predict(images[i:i + 250], [args.cls])[args.cls]["logits"].argmax(1)
                      for i in range(0, args.n, 250)]).cpu()
    val = trainer.exp.datasets["val"]
    real = torch.stack([val[i]["image"] for i in range(len(val))]).to(trainer.device)
    truth = torch.stack([val[i]["label"] for i in range(len(val))])
    real_pred = torch.cat([model.predict(real[i:i + 250], [args.cls])[args.cls]["logits"]
                           .argmax(1) for i in range(0, len(real), 250)]).cpu()
    print(f"{args.task} samples labelled as asked by {args.cls}: "
          f"{float((pred == labels).double().mean()):.3f} (n={args.n}); "
          f"{args.cls} accuracy on val: {float((real_pred == truth).double().mean()):.3f}")


if __name__ == "__main__":
    main()
