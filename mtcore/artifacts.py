"""Pictures a run writes: sample grids (generated, reconstructed, predicted masks) and curves."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from mtcore.trainer import Trainer

LABEL_W = 96


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] (C = 1 or 3) -> [N, H, W, 3] uint8."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def grid_image(rows: Mapping[str, torch.Tensor], scale: int = 2, pad: int = 2) -> Image.Image:
    """One titled row per entry; images scaled up ``scale`` times (nearest) for visibility."""
    rows = {k: v for k, v in rows.items() if v is not None and len(v)}
    if not rows:
        raise ValueError("grid_image: nothing to draw")
    h, w = next(iter(rows.values())).shape[-2:]
    h, w = h * scale, w * scale
    ncol = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (LABEL_W + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (title, imgs) in enumerate(rows.items()):
        y = pad + r * (h + pad)
        lines = textwrap.wrap(title, 16)[:3] or [""]  # word-wrapped, not cut mid-word
        draw.multiline_text((4, y + h // 2 - 6 * len(lines)), "\n".join(lines), fill=(0, 0, 0))
        for c, arr in enumerate(to_uint8(imgs)):
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (LABEL_W + pad + c * (w + pad), y))
    return canvas


def save_grid(rows: Mapping[str, torch.Tensor], path: str | Path, **kw: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(rows, **kw).save(path)
    return path


@torch.no_grad()
def write_samples(trainer: Trainer, path: Path) -> Path:
    """Inputs and what every head made of them (masks, reconstructions), then generated samples:
    a class-conditional head's one row per label ("gan: circle"), asked for that label."""
    n = trainer.cfg["train"]["num_samples"]
    ds = trainer.val_set if trainer.val_set is not None else trainer.train_set
    batch = {k: torch.stack([ds[i][k] for i in range(min(n, len(ds)))]).to(trainer.device)
             for k in ds[0]}
    model = trainer.model
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trainer.cfg["seed"] + 2)
        outputs = model(batch)
        rows: dict[str, torch.Tensor] = {"input": batch["image"]}
        for name, head in model.heads.items():
            for title, imgs in head.visuals(outputs[name], batch).items():
                rows[f"{name} {title}"] = imgs
        gen = torch.Generator(device="cpu").manual_seed(trainer.cfg["seed"])
        info = trainer.exp.info
        for name, head in model.generative_heads().items():
            if head.conditional and info.num_labels:  # one row per class, titled by its name
                for k, label_name in enumerate(label_names(info)):
                    imgs = head.sample(n, labels=torch.full((n,), k, dtype=torch.long),
                                       generator=gen)
                    if imgs is not None:
                        rows[f"{name}: {label_name}"] = imgs
                continue
            labels = torch.arange(n) % info.num_labels if info.num_labels else None
            imgs = head.sample(n, labels=labels, generator=gen)
            if imgs is not None:
                rows[f"{name} samples"] = imgs
    return save_grid(rows, path)


def label_names(info: Any) -> list[str]:
    """The dataset's label names (its indices where it names none), each made unique."""
    names = list(getattr(info, "label_names", ()) or ())[: info.num_labels]
    names += [str(i) for i in range(len(names), info.num_labels)]
    return [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]


Series = tuple[str, list[Any], list[Any], str]  # label, epochs, values, line style


def curve_panels(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Series]]]:
    """The panels of ``curves.png`` from a run's history rows (``metrics.jsonl``): the losses
    (train solid, validation dashed), the task weights when the balancer changes them from 1
    (each epoch's mean), then one panel per validation metric, the untrained generator's
    metrics (split "init") at epoch 0. A metric's real-vs-real baseline (``gan.fid_real`` beside
    ``gan.fid``) is a dotted level line in the metric's own panel."""
    train = [h for h in history if h.get("split") == "train"]
    val = [h for h in history if h.get("split") not in ("train", "init")]
    evaluated = [h for h in history if h.get("split") != "train"]  # the init row too

    def series(rows, k, label, style="-") -> Series:
        pts = [(h["epoch"], h[k]) for h in rows if isinstance(h.get(k), int | float)]
        return (label, [e for e, _ in pts], [v for _, v in pts], style)

    loss_keys = sorted({k for h in train for k in h if k.endswith(".loss")})
    panels = [("losses (solid: train, dashed: val)",
               [s for k in loss_keys for s in (series(train, k, k), series(val, k, f"val {k}", "--"))])]
    weight_keys = sorted({k for h in train for k in h if k.endswith(".weight")})
    if any(h[k] != 1.0 for h in train for k in weight_keys if isinstance(h.get(k), int | float)):
        panels.append(("task weights (train, epoch mean)",
                       [series(train, k, k.removesuffix(".weight")) for k in weight_keys]))
    metric_keys = sorted({k for h in evaluated for k, v in h.items()
                          if not k.endswith(".loss") and k not in ("epoch", "split")
                          and isinstance(v, int | float)})
    epochs = [h["epoch"] for h in evaluated if isinstance(h.get("epoch"), int | float)]
    for k in metric_keys:
        base = k.removesuffix("_real")
        if base != k and base in metric_keys:
            continue  # drawn in its metric's panel
        lines = [series(evaluated, k, k, "o-")]
        real = f"{k}_real"
        if real in metric_keys and epochs:
            value = next(h[real] for h in reversed(evaluated)
                         if isinstance(h.get(real), int | float))
            lines.append(("real vs real", [min(epochs), max(epochs)], [value, value], ":"))
        panels.append((k, lines))
    return panels


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Draw :func:`curve_panels` into one figure at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = curve_panels(history)
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for i, (title, lines) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for label, xs, ys, style in lines:
            ax.plot(xs, ys, style, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if i == 0:
            ax.set_yscale("symlog", linthresh=1e-2)
        if len(lines) > 1:
            ax.legend(fontsize=6)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
