"""Inference on new images (``mtcore predict``): load them as the datasets do, run the heads'
:class:`~mtcore.heads.Prediction` s, and write masks, labels and images a person can open."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from mtcore.artifacts import to_uint8
from mtcore.data import DatasetInfo, image_pixels, open_image
from mtcore.errors import ContractError, DataError
from mtcore.heads import Prediction, TaskHead
from mtcore.model import MultiTaskModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# The first colours of class maps (background black, then well-separated hues); more classes get
# colours from the bits of their index (as the PASCAL VOC colour map spreads them).
_FIRST_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                  (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
                  (250, 190, 190), (0, 128, 128))

Predictions = dict[str, dict[str, Prediction]]  # task -> name -> prediction over all images


def class_colours(n: int) -> torch.Tensor:
    """uint8 [n, 3]: the colour of each class index in masks (and in the run's sample grids)."""
    out = torch.zeros(n, 3, dtype=torch.uint8)
    for i in range(n):
        if i < len(_FIRST_COLOURS):
            out[i] = torch.tensor(_FIRST_COLOURS[i], dtype=torch.uint8)
            continue
        c, v, shift = [0, 0, 0], i, 7
        while v:  # bit k of the index goes to bit (7 - k // 3) of channel k % 3
            for ch in range(3):
                c[ch] |= ((v >> ch) & 1) << shift
            v >>= 3
            shift -= 1
        out[i] = torch.tensor(c, dtype=torch.uint8)
    return out


def image_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The inputs as files: files as given, folders as their images (sorted, not recursive);
    one path may be given alone."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    if not inputs:
        raise DataError("no input images given")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{item}: a folder with no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return files


def check_distinct_names(files: Sequence[Path]) -> None:
    """Outputs are named after their input's stem: two inputs must not share one."""
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise DataError(f"two inputs share the name {f.stem!r} ({stems[f.stem]}, {f}); their "
                            "outputs would overwrite each other: predict them into separate folders")
        stems[f.stem] = f


def check_readable(files: Sequence[Path]) -> None:
    """Every file opens as an image (its header: cheap), so that a bad file stops a run before
    it has written anything."""
    for path in files:
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"unreadable image {path}: {err}") from err


def check_out_dir(out_dir: str | Path, files: Sequence[Path]) -> Path:
    """``out_dir`` can take the outputs: not a file, and no input folder (its outputs would be
    read back as inputs the next time)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a folder for the predictions")
    folders = {f.parent.resolve() for f in files}
    if out.resolve() in folders:
        raise DataError(f"--out {out}: is a folder of input images; its outputs would be read as "
                        "inputs next time: write them to another folder")
    return out


def load_images(files: Sequence[Path], info: DatasetInfo) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images as the model saw its data: [N, C, H, W] in [0, 1], each read upright and prepared
    as the datasets prepare theirs (:func:`mtcore.data.open_image`, :func:`~mtcore.data.image_pixels`);
    with each upright image's own (width, height)."""
    if info.channels not in (1, 3):
        raise DataError(f"predicting from image files needs a 1- or 3-channel model; this one "
                        f"takes {info.channels} channels: pass a tensor to mtcore.predict")
    arrays, sizes = [], []
    for path in files:
        image = open_image(path)  # upright, as its EXIF orientation says
        sizes.append(image.size)
        arrays.append(image_pixels(image, info.channels, info.image_size))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    return images, sizes


def check_images(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """A tensor input must be what the model was trained on, float [N, C, H, W] in [0, 1] with
    N >= 1; returned as float32 (the model's dtype)."""
    want = (info.channels, *info.image_size)
    if (not torch.is_tensor(images) or not images.is_floating_point() or images.dim() != 4
            or tuple(images.shape[1:]) != want or images.shape[0] == 0):
        got = (f"{images.dtype} of shape {tuple(images.shape)}" if torch.is_tensor(images)
               else type(images).__name__)
        raise DataError(f"images must be float [N, {want[0]}, {want[1]}, {want[2]}] in [0, 1] (the "
                        f"model's input), got {got}; image files are resized for you")
    return images.float()


def predicting_heads(model: MultiTaskModel, tasks: Collection[str] | None = None) -> dict[str, TaskHead]:
    """The heads that predict something from an image (``tasks``: only those, checked)."""
    able = {k: h for k, h in model.heads.items() if type(h).predictions is not TaskHead.predictions}
    if isinstance(tasks, str):
        tasks = [tasks]
    if tasks is not None and not tasks:
        raise DataError("no tasks given; leave them out for every task that predicts from an image "
                        f"({', '.join(able) or 'none'})")
    if tasks is None:
        if not able:
            raise DataError("the model has no task that predicts from an image (its heads "
                            f"{', '.join(model.heads)} only generate)")
        return able
    bad = [t for t in tasks if t not in able]
    if bad:
        raise DataError(f"task(s) {', '.join(map(repr, bad))}: the model's tasks that predict "
                        f"from an image are {', '.join(able) or '(none)'}")
    return {t: able[t] for t in tasks}


def check_batch_size(batch_size: int) -> None:
    """Images go through the model at least one at a time."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")


@contextlib.contextmanager
def seeded(device: torch.device) -> Iterator[None]:
    """One random stream for a whole prediction call, from seed 0: a head that draws noise in
    eval predicts the same for the same images each call, however they are batched; the
    caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        yield


@torch.no_grad()
def _predict(model: MultiTaskModel, images: torch.Tensor, device: torch.device,
             heads: Mapping[str, TaskHead], batch_size: int) -> Predictions:
    """The heads' predictions for ``images`` in batches (the caller seeds and sets eval)."""
    parts: dict[str, dict[str, list[Prediction]]] = {t: {} for t in heads}
    for i in range(0, images.shape[0], batch_size):
        outputs = model.predict(images[i:i + batch_size].to(device), heads)
        n = min(batch_size, images.shape[0] - i)
        for task, head in heads.items():
            for name, pred in head.predictions(outputs[task]).items():
                _check_batch(pred, task, name, n)
                parts[task].setdefault(name, []).append(pred)
    return {task: {name: _concat(chunks) for name, chunks in by_name.items()}
            for task, by_name in parts.items()}


def run_predictions(model: MultiTaskModel, images: torch.Tensor, device: torch.device, *,
                    tasks: Collection[str] | None = None, batch_size: int = 64) -> Predictions:
    """Every predicting head's :class:`Prediction` s for ``images``, batched, on the CPU."""
    check_batch_size(batch_size)
    heads = predicting_heads(model, tasks)
    model.eval()
    with seeded(device):
        return _predict(model, images, device, heads, batch_size)


def predict_images(model: MultiTaskModel, info: DatasetInfo, device: torch.device,
                   files: Sequence[Path], *, tasks: Collection[str] | None = None,
                   batch_size: int = 64) -> Predictions:
    """:func:`run_predictions` for image files, read ``batch_size`` at a time (only the
    predictions are kept for all of them); every file is checked before the first batch."""
    check_batch_size(batch_size)
    heads = predicting_heads(model, tasks)
    check_readable(files)
    model.eval()
    with seeded(device):
        parts = [_predict(model, load_images(files[i:i + batch_size], info)[0], device, heads,
                          batch_size) for i in range(0, len(files), batch_size)]
    return {task: {name: _concat([p[task][name] for p in parts]) for name in by_name}
            for task, by_name in parts[0].items()}


def _check_batch(pred: object, task: str, name: str, n: int) -> None:
    """A head's prediction holds one entry per image of the batch."""
    where = f"task {task!r}: predictions()[{name!r}]"
    if not isinstance(pred, Prediction):
        raise ContractError(f"{where} must be an mtcore.plugin.Prediction, got "
                            f"{type(pred).__name__}")
    if pred.value.shape[0] != n or (pred.scores is not None and pred.scores.shape[0] != n):
        raise ContractError(f"{where} has {pred.value.shape[0]} entries for a batch of {n} images")


def _concat(chunks: list[Prediction]) -> Prediction:
    first = chunks[0]
    scores = None if first.scores is None else torch.cat([c.scores.detach().cpu() for c in chunks])
    return Prediction(first.kind, torch.cat([c.value.detach().cpu() for c in chunks]), first.names,
                      scores)


def predict_files(model: MultiTaskModel, info: DatasetInfo, device: torch.device,
                  files: Sequence[Path], out_dir: str | Path, *,
                  tasks: Collection[str] | None = None, batch_size: int = 64,
                  progress: bool = False) -> tuple[Predictions, dict[str, int]]:
    """Predict ``files`` ``batch_size`` at a time (memory stays one batch's, however many) and
    write into ``out_dir``: ``<stem>.<task>.<name>.png`` per image for masks (indexed PNGs at the
    image's own size, nearest-neighbour, pixel value = class index) and images;
    ``predictions.csv`` (a row per image: its file, then each label's class name, index and
    probability, and each value); ``classes.json`` (the class names of each mask and label, by index). Returns
    the first batch's predictions (what was predicted, for a summary) and how many files of each
    kind it wrote."""
    # what would fail later fails before anything is written
    check_batch_size(batch_size)
    check_distinct_names(files)
    out = check_out_dir(out_dir, files)
    heads = predicting_heads(model, tasks)
    check_readable(files)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    written = {"masks": 0, "images": 0}
    first: Predictions = {}
    starts = range(0, len(files), batch_size)
    partial = out / "predictions.csv.partial"  # renamed when complete: no half table left
    with open(partial, "w", newline="") as fh, seeded(device):
        rows = csv.writer(fh)
        for start in tqdm(starts, desc="predict", unit="batch",
                          disable=not progress or len(starts) < 2):
            chunk = files[start:start + batch_size]
            images, sizes = load_images(chunk, info)
            preds = _predict(model, images, device, heads, batch_size)
            columns = [(f"{task}.{name}", p) for task, by in preds.items()
                       for name, p in by.items() if p.kind in ("label", "value")]
            if not first:
                first = preds
                rows.writerow(["file"] + [c for key, p in columns for c in (
                    (key, f"{key}.index", f"{key}.score") if p.kind == "label" else (key,))])
            _write_files(preds, chunk, sizes, out, written)
            for i, f in enumerate(chunk):
                row: list[object] = [str(f)]
                for _, pred in columns:
                    if pred.kind == "value":
                        row.append(f"{float(pred.value[i]):.6g}")
                        continue
                    k = int(pred.value[i])
                    name = pred.names[k] if k < len(pred.names) else str(k)
                    score = "" if pred.scores is None else f"{float(pred.scores[i, k]):.4f}"
                    row += [name, k, score]
                rows.writerow(row)
    os.replace(partial, out / "predictions.csv")
    classes = {f"{task}.{name}": list(p.names) for task, by in first.items()
               for name, p in by.items() if p.names}
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    return first, written


def _write_files(preds: Predictions, files: Sequence[Path], sizes: Sequence[tuple[int, int]],
                 out: Path, written: dict[str, int]) -> None:
    """The PNGs of one batch: masks at each image's own size, images at the model's."""
    for task, by_name in preds.items():
        for name, pred in by_name.items():
            for i, f in enumerate(files):
                path = out / f"{f.stem}.{task}.{name}.png"
                if pred.kind == "mask":
                    _mask_image(pred.value[i], len(pred.names)).resize(
                        sizes[i], Image.Resampling.NEAREST).save(path)
                    written["masks"] += 1
                elif pred.kind == "image":
                    Image.fromarray(to_uint8(pred.value[i:i + 1])[0]).save(path)
                    written["images"] += 1


def _mask_image(mask: torch.Tensor, num_classes: int) -> Image.Image:
    """Class indices [H, W] as an indexed PNG (palette = :func:`class_colours`), or a 16-bit
    grayscale one beyond 256 classes."""
    values = mask.numpy()
    if max(num_classes, int(values.max(initial=0)) + 1) > 256:
        return Image.fromarray(values.astype(np.uint16))
    img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.astype(np.uint8).tobytes())
    img.putpalette(_png_palette())
    return img


@functools.cache
def _png_palette() -> list[int]:
    return class_colours(256).flatten().tolist()

