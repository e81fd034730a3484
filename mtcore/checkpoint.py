"""Checkpoints written atomically and read safely (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import dataclasses
import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcore.data import DatasetInfo
from mtcore.errors import CheckpointError

FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` via a temp file in the same folder and ``os.replace``: a crash
    mid-write leaves the previous checkpoint intact, never a half-written one."""
    return _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` as :func:`save_atomic` writes checkpoints: a reader (another
    process of a data-parallel run reading ``config.toml``, a user's tail) never sees half of
    it."""
    return _write_atomic(path, "w", lambda f: f.write(text))


def _write_atomic(path: str | Path, mode: str, write: Callable[[Any], Any]) -> Path:
    """``write(file)`` into a new temp file next to ``path``, synced, then renamed over it; on
    any failure the temp file goes and ``path`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _new_file(path: Path) -> tuple[int, Path]:
    """A new hidden temp file next to ``path``, opened for writing. Created with mode 0666, so
    the kernel applies the umask (a checkpoint reads as any file would; mkstemp's 0600 would
    need the umask read back, which no thread-safe call does)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another writer's name: draw again
            continue


# what a run's checkpoint holds for eval, sample and resume (a transfer source needs only
# "model", and "config" for structure transfer); a damaged or hand-made one is named
RUN_KEYS = ("config", "model", "epoch", "global_step", "history", "rng", "balancer", "optimizer",
            "scheduler")


def load(path: str | Path, map_location: str | torch.device = "cpu",
         require: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; clear errors for missing or foreign files
    and for one without the keys ``require`` lists."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; give a file, e.g. "
                              f"{str(path / 'checkpoints' / 'best.pt')!r}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); is it an mtcore checkpoint?"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "mtcore" or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an mtcore checkpoint")
    if ckpt.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {ckpt['version']}; "
                              f"this mtcore reads up to {FORMAT_VERSION}: upgrade mtcore")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}: a damaged, "
                              "hand-made or pre-trained-weights file; use a last.pt or best.pt "
                              "that an mtcore run wrote")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": list(_to_lists(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s generators; the states may have been loaded onto the training
    device (``map_location``), and generators take CPU byte tensors."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str,
                       prefix: str = "", strict: bool = True) -> list[str]:
    """Load ``state`` (optionally only keys under ``prefix``) into ``model``; on a mismatch raise
    an error naming the missing/unexpected keys and shape differences. Returns the loaded keys."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"checkpoint {path!r} has no weights under {prefix!r}")
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"checkpoint {path!r} does not fit the model: shape mismatch: "
                              + "; ".join(bad[:5]))
    # the keys are compared as loading sees them: a module may fill in a key that older
    # checkpoints lack (its _load_from_state_dict), which a comparison beforehand would miss;
    # on a refusal the model may hold part of the weights (the callers give up on it)
    result = model.load_state_dict(dict(state), strict=False)
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"checkpoint {path!r} does not fit the model: " + " | ".join(parts))
    return sorted(set(state) & set(own))


def info_state(info: DatasetInfo) -> dict[str, Any] | None:
    """The dataset's facts as plain values for a checkpoint (``weights_only`` loads only those),
    or None for a plugin's ``DatasetInfo`` subclass, whose extra fields only its dataset knows
    (loading then builds the dataset, as before checkpoints kept them)."""
    if type(info) is not DatasetInfo:
        return None

    def plain(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(plain(x) for x in v)
        return v.item() if isinstance(v, np.generic) else v

    return {f.name: plain(getattr(info, f.name)) for f in dataclasses.fields(DatasetInfo)}


def saved_info(ckpt: dict[str, Any]) -> DatasetInfo | None:
    """The dataset's facts a checkpoint keeps (None in one written without them)."""
    raw = ckpt.get("info")
    if not isinstance(raw, dict):
        return None
    known = {f.name for f in dataclasses.fields(DatasetInfo)}
    try:
        return DatasetInfo(**{k: tuple(v) if isinstance(v, list | tuple) else v
                              for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise CheckpointError(f"checkpoint's dataset info is malformed ({exc})") from None

