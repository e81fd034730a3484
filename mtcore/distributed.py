"""Data-parallel training over several processes, started by ``torchrun`` (one process per GPU,
or several on a CPU machine): every process holds the whole model and trains on its share of
each batch, and their gradients are averaged before each optimizer step, so the processes stay
identical. The collectives here are the few the trainer needs; a single process needs none of
them, and then nothing here runs."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mtcore.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether there are other processes to keep in step with."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that evaluates, writes the run folder and logs."""
        return self.rank == 0


def world_from_env() -> World:
    """The world ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``), its process group started if it is not yet (NCCL with CUDA, else gloo);
    without those variables, one process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={size}: this torch has no torch.distributed")
    if not dist.is_initialized():
        # gloo for CPU tensors always (some results are gathered on the CPU), NCCL for CUDA
        # ones; an hour's patience: the others wait while the main process evaluates (the
        # first time also training the evaluator network FID needs)
        try:
            dist.init_process_group(
                "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                timeout=timedelta(hours=1))
        except (ValueError, RuntimeError) as exc:  # e.g. no MASTER_ADDR: not under torchrun
            raise ConfigError(
                f"WORLD_SIZE={size} in the environment, but the process group did not start "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); start "
                "the processes with torchrun, or unset WORLD_SIZE for one process") from exc
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def process_mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the processes of a data-parallel run (``t`` itself in one process):
    what a balancer's inputs (task gradients, losses) become so that every process decides
    alike, on the whole batch's values."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def mean_over_processes(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scalar tensors by name, detached, each the mean over the processes of a data-parallel run
    (as they are in one process), in one collective; dtypes kept."""
    names = list(values)
    means = process_mean(torch.stack([values[k].detach().float() for k in names]))
    return {k: v.to(values[k].dtype) for k, v in zip(names, means, strict=True)}


def shutdown() -> None:
    """End the process group, if one was started (at the end of a ``torchrun`` command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class RankSlice(Sampler[int]):
    """A rank's share of one shuffled order: items ``rank, rank + size, ...`` of a permutation
    every process draws alike, so that batch ``k`` of all ranks together is exactly batch ``k``
    of the single-process order (the loader's batch size is the rank's share)."""

    def __init__(self, length: int, world: World, generator: torch.Generator) -> None:
        self.length, self.world, self.generator = length, world, generator

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.length, generator=self.generator)
        return iter(order[self.world.rank::self.world.size].tolist())

    def __len__(self) -> int:
        return len(range(self.world.rank, self.length, self.world.size))


def average_(tensors: Sequence[torch.Tensor], world: World) -> None:
    """Replace each tensor by its mean over the processes, in one collective per dtype."""
    if not world.active:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world.size
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Average the gradients of ``params`` over the processes. A parameter that got a gradient
    on some process only (a loss that, on one share of the batch, reached none of it) counts
    zeros for the others; one that got none anywhere keeps none (the optimizer skips it, as in
    a single process)."""
    if not world.active or not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads = []
    for p, any_grad in zip(params, has.tolist(), strict=True):
        if not any_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    average_(grads, world)


def from_main(value: T | None, world: World) -> T:
    """The main process's ``value`` on every process (the others pass None)."""
    if not world.active:
        return value  # type: ignore[return-value]
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T, world: World) -> list[T]:
    """Every process's ``value``, by rank, on every process."""
    if not world.active:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """The main process's buffers (BatchNorm running statistics: each process saw only its own
    share of the batches) on every process."""
    if not world.active:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)
