"""The multi-task training loop: alternating auxiliary (discriminator) and main steps, balanced
joint loss, evaluation every epoch, atomic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mtcore import checkpoint as ckpt_io
from mtcore import distributed as dist_
from mtcore.augment import augment_batch
from mtcore.balancer import BalanceResult
from mtcore.config import dumps
from mtcore.errors import CheckpointError, ConfigError, ContractError
from mtcore.experiment import Experiment
from mtcore.heads import TaskHead
from mtcore.loggers import RunLogger
from mtcore.monitor import Monitor
from mtcore.optim import clip, make_optimizer, make_schedule
from mtcore.registry import suggest
from mtcore.transfer import Stage

T = TypeVar("T")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


@contextlib.contextmanager
def frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily stop gradients to ``params`` (e.g. the discriminator during a G step)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


@contextlib.contextmanager
def preserved_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers (BatchNorm running statistics, ...) on exit, so an extra
    forward pass in train mode leaves no trace in them."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


class Trainer:
    """Trains an :class:`Experiment`; writes artefacts to ``out_dir`` when given."""

    def __init__(self, exp: Experiment, out_dir: str | Path | None = None, *,
                 progress: bool | None = None, log: Callable[[str], None] = print) -> None:
        self.exp = exp
        self.cfg = exp.config
        # under torchrun, one of several processes: the main one evaluates, logs and writes
        self.world = dist_.world_from_env()
        self.device = exp.device
        if self.world.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)  # one GPU per process
            torch.cuda.set_device(self.device)
        self.run_dir = Path(out_dir) if out_dir is not None else None  # what a resume reads
        self.out = self.run_dir if self.world.main else None  # what this process writes
        tcfg = self.cfg["train"]
        self.progress = (tcfg["progress"] if progress is None else progress) and self.world.main
        self.log = log if self.world.main else _silent
        self.model = exp.model.to(self.device)
        if self.cfg["model"].get("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.balancer = exp.balancer.to(self.device)
        self.heads: dict[str, TaskHead] = dict(self.model.heads.items())
        self.amp = tcfg["amp"]
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp: 'fp16' needs a CUDA device; use 'bf16' on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        if (tcfg.get("deterministic", True) and self.device.type == "cpu"
                and not torch.are_deterministic_algorithms_enabled()):  # a user's setting stays
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also NaN-fills every fresh tensor (a debugging aid against reads of
            # uninitialised memory, which no op here does): ~2% of a default CPU step, for nothing.
            torch.utils.deterministic.fill_uninitialized_memory = False
        self.train_set = exp.datasets.get("train")
        self.val_split = self.cfg["data"]["val_split"]
        self.val_set = exp.datasets.get(self.val_split)
        self._check_world()
        self.steps_per_epoch = self._steps_per_epoch()
        self._build_optimizers()
        self.epoch = 0
        self.global_step = 0
        self.stage = Stage("train")  # what trains; _apply_stage sets each epoch's
        self.in_stage = self.updated = list(self.heads)
        self.monitor = Monitor.from_config(tcfg, self.heads)  # picks best.pt; train.patience
        self.best: float | None = None  # the monitor's best score so far (higher is better)
        self.best_pt_epoch: int | None = None  # the epoch checkpoints/best.pt holds
        self.history: list[dict[str, Any]] = []
        self.loggers: list[tuple[str, RunLogger]] = []  # (config label, logger) while fit() runs

    # -- setup --------------------------------------------------------------------------------
    def _check_world(self) -> None:
        """Several processes share each batch evenly, so it must split evenly among them."""
        if not self.world.active:
            return
        batch, n = self.cfg["data"]["batch_size"], self.world.size
        if batch % n:
            raise ConfigError(f"data.batch_size = {batch} does not split evenly over {n} "
                              f"processes; use a multiple of {n}")
        if self.train_set is not None and len(self.train_set) < batch:
            raise ConfigError(f"the training split has {len(self.train_set)} images, fewer than "
                              f"data.batch_size = {batch}: too few to share over {n} processes")

    def _steps_per_epoch(self) -> int:
        if self.train_set is None:
            return 1
        size, batch = len(self.train_set), self.cfg["data"]["batch_size"]
        n = size // batch if size > batch else 1  # as the loader gives them (drop_last)
        cap = self.cfg["train"]["max_steps_per_epoch"]
        return min(n, cap) if cap else n

    def _build_optimizers(self) -> None:
        ocfg = self.cfg["optim"]
        groups_cfg = ocfg.get("groups", {})
        aux_ids = self.model.auxiliary_parameter_ids()
        seen: set[int] = set()

        def take(params) -> list[torch.nn.Parameter]:
            out = []
            for p in params:
                if id(p) not in seen and id(p) not in aux_ids:
                    seen.add(id(p))
                    out.append(p)
            return out

        groups = [{"name": "backbone", "params": take(self.model.backbone.parameters()),
                   "options": groups_cfg.get("backbone", {})}]
        for name, head in self.heads.items():
            options = {**groups_cfg.get("heads", {}), **self.cfg["tasks"][name].get("optim", {})}
            groups.append({"name": f"head.{name}", "params": take(head.main_parameters()),
                           "options": options})
        bal = take(self.balancer.parameters())
        if bal:
            groups.append({"name": "balancer", "params": bal,
                           "options": groups_cfg.get("balancer", {})})
        groups = [g for g in groups if g["params"]]
        self.optimizer = make_optimizer(groups, ocfg)
        self.clip_norms = {g["name"]: g["options"].get("grad_clip", ocfg.get("grad_clip", 0.0))
                           for g in groups}
        stage_scale = lambda step: self.exp.transfer.stage(step // self.steps_per_epoch).lr_scale  # noqa: E731
        self.scheduler = make_schedule(self.optimizer, ocfg, self.steps_per_epoch, stage_scale,
                                       [g["options"].get("schedule") for g in groups])
        self.aux: dict[tuple[str, str], tuple[torch.optim.Optimizer, Any, list]] = {}
        for name, head in self.heads.items():
            for gname, params in head.auxiliary_parameters().items():
                opts = groups_cfg.get(gname, {})
                opt = make_optimizer([{"name": f"{name}.{gname}", "params": params,
                                       "options": opts}], ocfg)
                sched = make_schedule(opt, ocfg, self.steps_per_epoch,
                                      kinds=[opts.get("schedule")])
                self.aux[(name, gname)] = (opt, sched, params)
        # "discriminator" stays valid without a GAN task: the default config sets it
        known = {"backbone", "heads", "balancer", "discriminator"} | {g for _, g in self.aux}
        for gname in groups_cfg:
            if gname not in known:
                raise ConfigError(
                    f"optim.groups.{gname}: no parameter group of that name.{suggest(gname, sorted(known))}"
                    f" Groups: {', '.join(sorted(known))} (auxiliary ones are named by their "
                    "heads' auxiliary_parameters())")

    def _autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _loader(self, dataset, train: bool, epoch: int = 0) -> DataLoader:
        dcfg = self.cfg["data"]
        gen = torch.Generator().manual_seed(self.cfg["seed"] * 100_003 + epoch)
        if train and self.world.active:  # this process's share of each batch of the same order
            return DataLoader(dataset, batch_size=dcfg["batch_size"] // self.world.size,
                              sampler=dist_.RankSlice(len(dataset), self.world, gen),
                              drop_last=True, generator=gen, num_workers=dcfg["num_workers"],
                              pin_memory=self.device.type == "cuda")
        return DataLoader(dataset, batch_size=dcfg["batch_size"] if train else dcfg["eval_batch_size"],
                          shuffle=train, drop_last=train and len(dataset) > dcfg["batch_size"],
                          generator=gen, num_workers=dcfg["num_workers"],
                          pin_memory=self.device.type == "cuda")

    def _apply_stage(self, epoch: int) -> str:
        """Train mode everywhere, then freeze (and put in eval mode) what the stage says: its
        module prefixes and the heads of the tasks it does not train."""
        stage = self.exp.transfer.stage(epoch)
        self.model.train()
        for g in self.optimizer.param_groups:  # what the optimizers train (not an EMA copy)
            for p in g["params"]:
                p.requires_grad_(True)
        for _, _, params in self.aux.values():  # a discriminator frozen by an earlier stage too
            for p in params:
                p.requires_grad_(True)
        for prefix in stage.freeze:
            try:
                module = self.model.get_submodule(prefix)
            except AttributeError:  # any strategy's stage (a restored run skips its setup check)
                raise ConfigError(f"transfer: stage {stage.name!r} freezes {prefix!r}, which is "
                                  "not a module of the model (e.g. 'backbone', 'heads.seg')") from None
            module.requires_grad_(False)
            module.eval()
        problem = stage.task_problem(list(self.heads))
        if problem:  # checked here too: a restored run skips the strategy's setup
            raise ConfigError(f"transfer: {problem}")
        self.in_stage = [k for k in self.heads if stage.tasks is None or k in stage.tasks]
        for name, head in self.heads.items():
            if name not in self.in_stage:
                head.requires_grad_(False)
                head.eval()
        # the heads whose own parameters train (a head frozen by a prefix, or one whose decoder
        # belongs to a frozen task, has no main step: no EMA update, no warm-up counter)
        self.updated = [k for k in self.in_stage
                        if any(p.requires_grad for p in self.heads[k].main_parameters())]
        idle = [k for k in stage.tasks or () if k not in self.updated]
        if idle:
            raise ConfigError(f"transfer: stage {stage.name!r} trains the task(s) {idle}, but none "
                              "of their parameters train in it (frozen by its freeze list, or "
                              "shared with a task it leaves out)")
        self.stage = stage
        return stage.name

    # -- steps --------------------------------------------------------------------------------
    def _losses(self, batch) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        with self._autocast():
            outputs = self.model(batch)
            losses = {k: _scalar_loss(k, self.heads[k], self.heads[k].compute_loss(outputs[k], batch))
                      for k in self.heads}
        return outputs, losses

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One multi-task step: each head's auxiliary (D) steps, then the balanced main step.

        With ``train.micro_batch_size`` the batch goes through forward and backward in pieces,
        each loss weighted by its piece's share of the batch, and every optimizer steps once on
        the summed gradients: the memory of a piece, the update of the whole batch."""
        logs: dict[str, float] = {}
        pieces = micro_batches(batch, self.cfg["train"].get("micro_batch_size", 0))
        for (name, gname), (opt, sched, params) in self.aux.items():
            head = self.heads[name]
            if name not in self.in_stage or not any(p.requires_grad for p in params):
                # a transfer stage froze this head or trains other tasks:
                with warnings.catch_warnings():  # no D step, but its schedule keeps pace
                    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                    sched.step()
                continue
            for _ in range(head.auxiliary_steps):
                opt.zero_grad(set_to_none=True)
                parts = []
                for piece, share in pieces:
                    with self._autocast():
                        aux = head.auxiliary_loss(piece, self.global_step)
                    if not isinstance(aux, Mapping) or "loss" not in aux:
                        raise ContractError(
                            f"task {name!r}: {type(head).__name__}.auxiliary_loss must return a "
                            f"dict with the key 'loss' (the rest is logged), got "
                            f"{type(aux).__name__}"
                            + (f" with keys {sorted(aux)}" if isinstance(aux, Mapping) else ""))
                    loss = _scalar_loss(name, head, aux["loss"], "auxiliary_loss")
                    scale = self._scale(share)
                    (scale(loss) if scale else loss).backward()
                    parts.append((share, {k: _scalar_loss(name, head, v, "auxiliary_loss").detach()
                                          for k, v in aux.items() if k != "loss"}))
                dist_.average_gradients(params, self.world)
                if self.scaler:
                    self.scaler.unscale_(opt)
                clip(params, self.cfg["optim"].get("groups", {}).get(gname, {}).get(
                    "grad_clip", self.cfg["optim"]["grad_clip"]))
                (self.scaler.step(opt) if self.scaler else opt.step())
                if self.scaler:
                    self.scaler.update()
                opt.zero_grad(set_to_none=True)  # D keeps no gradients into the G step
                for k, v in _share_weighted(parts).items():  # "<task>.loss" is the main step's
                    logs[f"{name}.{k}"] = float(v)  # this process's share (averaged per epoch)
            sched.step()
        aux_params = [p for (_, _, ps) in self.aux.values() for p in ps]
        stage = self.stage
        with frozen(aux_params):
            self.optimizer.zero_grad(set_to_none=True)
            steps, results = [], []
            for piece, share in pieces:
                rng = self._rng_state()  # the piece's random draws, replayed by recompute()
                _, losses = self._losses(piece)
                for k in losses if stage.balance else self.in_stage:  # what the step uses
                    v = losses[k]
                    if not torch.isfinite(v):
                        raise FloatingPointError(
                            f"loss of task {k!r} is {float(v)} at step {self.global_step}; "
                            "lower optim.lr, enable optim.grad_clip, or check the data")
                results.append((share, self._main_backward(losses, self._scale(share))))
                steps.append((piece, share, rng, losses if len(pieces) == 1 else
                              {k: v.detach() for k, v in losses.items()}))
            dist_.average_gradients([p for g in self.optimizer.param_groups for p in g["params"]],
                                    self.world)
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            for g in self.optimizer.param_groups:
                clip(g["params"], self.clip_norms.get(g["name"], 0.0))
            (self.scaler.step(self.optimizer) if self.scaler else self.optimizer.step())
            if self.scaler:
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)  # G keeps no gradients into the D step
            self.scheduler.step()

        def recompute() -> dict[str, torch.Tensor]:
            # same pieces, same (train-mode) normalisation and the same random draws (VAE noise,
            # GAN latents) as the step, so the losses differ only by the update; no running-stat
            # update, and the training's random stream continues as if this never ran
            with torch.no_grad(), preserved_buffers(self.model):
                parts = []
                for piece, share, rng, _ in steps:
                    with self._replayed_rng(rng):
                        parts.append((share, self._losses(piece)[1]))
            return self._batch_mean(_share_weighted(parts))

        # the whole batch's losses (all processes'), so a balancer's state stays the same in each
        losses = self._batch_mean(_share_weighted([(share, ls) for _, share, _, ls in steps]))
        # before the heads' bookkeeping, so a recompute sees the step's own loss schedule (the
        # VAE's KL warm-up counter moves in after_main_step)
        if stage.balance:
            self.balancer.after_step(losses, recompute)
        for name in self.updated:  # a head whose parameters did not train had no main step
            self.heads[name].after_main_step()
        self.global_step += 1
        for k, v in losses.items():
            logs[f"{k}.loss"] = float(v.detach())
            logs[f"{k}.weight"] = sum(share * float(r.weights.get(k, float("nan")))
                                      for share, r in results)
        logs["total"] = sum(share * r.total for share, r in results)
        return logs

    def _batch_mean(self, losses: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Losses of this process's share of the batch -> the whole batch's (one process: as
        they are)."""
        return dist_.mean_over_processes(losses) if self.world.active else losses

    def _scale(self, share: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a piece's losses are multiplied by before ``.backward()``: the AMP loss scale
        and the piece's share of the batch (None: nothing)."""
        if share == 1.0:
            return self.scaler.scale if self.scaler else None
        if self.scaler:
            return lambda t: self.scaler.scale(t) * share
        return lambda t: t * share

    def _main_backward(self, losses: Mapping[str, torch.Tensor],
                       scale: Callable[[torch.Tensor], torch.Tensor] | None) -> BalanceResult:
        """The main step's backward of one piece: through the balancer, or in a stage that
        trains its tasks on their own losses, the plain sum. Gradients accumulate."""
        if self.stage.balance:
            result = self.balancer.backward(losses, self.model.shared_parameters(), scale)
        else:  # each task of the stage on its own loss: the plain sum, no balancer
            total = sum(losses[k] for k in self.in_stage)
            if total.requires_grad:
                (scale(total) if scale else total).backward()
            result = BalanceResult(total=float(total.detach()),
                                   weights={k: float(k in self.in_stage) for k in self.heads})
        if not isinstance(result, BalanceResult):
            raise ContractError(
                f"balancer {type(self.balancer).__name__}.backward must return a "
                f"BalanceResult (weights, total), got {type(result).__name__}")
        return result

    def _seed_ranks(self) -> None:
        """Give each process of a data-parallel run its own random stream (noise, latents,
        augmentation: its share of the batch must not repeat another's), from the seed and the
        step; the model was built from the seed alike in all."""
        mixed = (self.cfg["seed"] * 1_000_003 + self.global_step) * 65_537 + self.world.rank + 1
        torch.manual_seed(mixed % (2**63 - 1))  # any seed: manual_seed takes 64 bits

    def _on_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on the main process only (evaluation), its result on every process."""
        if not self.world.active:
            return compute()
        return dist_.from_main(compute() if self.world.main else None, self.world)

    def _rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _rng_state(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The CPU generator's state and the training device's (CUDA) generator's, if any."""
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._rng_devices()]

    @contextlib.contextmanager
    def _replayed_rng(self, state: tuple[torch.Tensor, list[torch.Tensor]]) -> Iterator[None]:
        """Run the block from the random state ``state``; restore the current one afterwards."""
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.set_rng_state(state[0])
            for d, s in zip(self._rng_devices(), state[1], strict=True):
                torch.cuda.set_rng_state(s, d)
            yield

    # -- epochs -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        stage = self._apply_stage(epoch)
        lr = self.optimizer.param_groups[0]["lr"]  # the epoch's first step's (its last sets the next)
        loader = self._loader(self.train_set, train=True, epoch=epoch)
        sums: dict[str, float] = defaultdict(float)
        n = 0
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg['optim']['epochs']}",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        for i, batch in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            batch = to_device(batch, self.device)
            if self.exp.augment:
                batch = augment_batch(self.exp.augment, batch)
            logs = self.train_step(batch)
            n += 1
            for k, v in logs.items():
                sums[k] += v
            bar.update(1)
            bar.set_postfix({k.split(".")[0]: f"{sums[k] / n:.3f}" for k in sums
                             if k.endswith(".loss")}, refresh=False)
        bar.close()
        if self.world.active:  # every process's share: the epoch's means over the whole batches
            names = sorted(sums)
            means = dist_.process_mean(torch.tensor([sums[k] / max(n, 1) for k in names],
                                                    dtype=torch.float64))
            out = dict(zip(names, means.tolist(), strict=True))
            dist_.broadcast_buffers(self.model, self.world)  # one set of BatchNorm statistics
        else:
            out = {k: v / max(n, 1) for k, v in sums.items()}
        if self.stage.balance and n:  # an unbalanced stage leaves the balancer alone
            self.balancer.after_epoch({k: out[f"{k}.loss"] for k in self.heads})
        out["stage"] = stage
        out["lr"] = lr
        return out

    @torch.no_grad()
    def evaluate(self, split: str | None = None, dataset=None,
                 max_batches: int | None = None) -> dict[str, float]:
        """Every head's metrics and mean loss on a split (its first ``max_batches`` batches)."""
        dataset = dataset if dataset is not None else (
            self.val_set if split in (None, self.val_split) else self.exp.datasets[split])
        self.model.eval()
        metrics = {k: h.new_metric() for k, h in self.heads.items()}
        loss_sums: dict[str, float] = defaultdict(float)
        n = 0
        # Evaluation draws noise (VAE samples, GAN z); keep the training RNG stream untouched.
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(self.cfg["seed"] + 1)
            for batch in itertools.islice(self._loader(dataset, train=False), max_batches):
                batch = to_device(batch, self.device)
                outputs, losses = self._losses(batch)
                bs = batch["image"].shape[0]
                n += bs
                for k in self.heads:
                    metrics[k].update(outputs[k], batch)
                    loss_sums[k] += float(losses[k]) * bs
        out: dict[str, float] = {}
        for k in self.heads:
            out[f"{k}.loss"] = loss_sums[k] / max(n, 1)
            for m, v in metrics[k].compute().items():
                out[f"{k}.{m}"] = v
        return out

    def generation_metrics(self, split: str | None = None, final: bool = True) -> dict[str, float]:
        """FID/precision/recall etc. of every generative head, in the evaluator's feature space;
        ``final=False``: the cheap per-epoch set (passed to heads whose method takes ``final``)."""
        split = split or self.val_split
        self.model.eval()
        out: dict[str, float] = {}
        with torch.random.fork_rng(devices=self._rng_devices()):
            for name, head in self.heads.items():
                takes_final = "final" in inspect.signature(head.generation_metrics).parameters
                vals = head.generation_metrics(self.exp.datasets, split,
                                               self.cfg["train"]["gen_metric_samples"],
                                               seed=self.cfg["seed"],
                                               **({"final": final} if takes_final else {}))
                out.update({f"{name}.{k}": v for k, v in vals.items()})
        return out

    # -- the run ------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train for ``optim.epochs`` epochs (continuing from ``last.pt`` when ``resume``).

        ``stop_after=k`` stops once epoch k is done, exactly as an interrupted run would (the
        schedule still spans ``optim.epochs``), so ``--resume`` can continue it. The config's
        ``loggers`` receive every record while it runs.
        """
        if self.train_set is None or self.val_set is None:
            missing = "train" if self.train_set is None else self.val_split
            raise ConfigError(f"fit() needs the {missing!r} dataset in the experiment (built "
                              f"with splits={tuple(self.exp.datasets)}; data.val_split = "
                              f"{self.val_split!r})")
        epochs = self.cfg["optim"]["epochs"]
        tcfg = self.cfg["train"]
        loggers = self._build_loggers()  # a bad logger config fails before anything is touched
        if not self.world.main:  # checked in every process, but only the main one logs
            loggers = []
        if self.out is not None:
            clash = next((p for p in (self.out, *self.out.parents)
                          if p.exists() and not p.is_dir()), None)
            if clash is not None:
                raise ConfigError(f"run folder {self.out}: {clash} is a file; give a folder")
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()  # before config.toml is written: a refused resume leaves the run as is
            if self.epoch > epochs:
                raise ConfigError(f"optim.epochs = {epochs}, but the run has trained "
                                  f"{self.epoch} epochs already; give at least {self.epoch}")
            if self.epoch == epochs:
                self.log(f"the run is at epoch {epochs} of optim.epochs = {epochs}: nothing to "
                         "train (raise optim.epochs to go on)")
        monitored = bool(tcfg.get("monitor"))
        if monitored:  # a misspelt metric fails now, not after an epoch (one batch says the names)
            probe = {**self._last_validation(), **self.evaluate(max_batches=1)}
            gen_later = tcfg["gen_metrics"] == "every" and bool(self.model.generative_heads())
            self._check_monitor(probe, final=not gen_later)
        self.loggers = []
        try:
            # loggers start before the run folder changes: one that cannot leaves it as it was
            for label, logger in loggers:
                try:
                    logger.start(self.out, self.cfg, self.epoch)
                except (ValueError, OSError) as exc:
                    raise ConfigError(f"loggers.{label}: could not start: {exc}") from exc
                self.loggers.append((label, logger))
            if not resume and self.world.active and self.epoch == 0:
                self._seed_ranks()
            if not resume and self.out is not None:
                if (self.out / "checkpoints" / "last.pt").exists():
                    self.log(f"{self.out} holds an earlier run: starting over (--resume "
                             "continues it)")
                # a fresh run: none of an earlier run's records or sample grids stay behind
                for stale in [self.out / "metrics.jsonl",
                              *(self.out / "samples").glob("epoch_*.png")]:
                    stale.unlink(missing_ok=True)
            if self.out is not None:
                ckpt_io.write_text_atomic(dumps(self.cfg), self.out / "config.toml")
            return self._run(epochs, stop_after, monitored, probe if monitored else {})
        finally:
            for label, logger in self.loggers:  # however the run ends, each one
                try:
                    logger.close()
                except Exception as exc:  # the run's own outcome (or error) stays what it was
                    warnings.warn(f"loggers.{label}: close failed: {type(exc).__name__}: {exc}",
                                  RuntimeWarning, stacklevel=2)
            self.loggers = []

    def _run(self, epochs: int, stop_after: int | None, monitored: bool,
             probe: Mapping[str, Any]) -> dict[str, Any]:
        """The epochs of :meth:`fit`, once the run folder and loggers are set up."""
        from mtcore import artifacts

        tcfg = self.cfg["train"]
        if self.epoch == 0 and tcfg["gen_metrics"] != "none" and self.model.generative_heads():
            init = self._on_main(self.generation_metrics)
            if monitored and tcfg["gen_metrics"] == "every":  # now the names are all known
                self._check_monitor({**probe, **init}, final=True)
            self._record({"epoch": 0, "split": "init", **init})
            self.log("untrained generator: " + _fmt(init))
        patience = tcfg.get("patience", 0)
        stopped = patience > 0 and self._patience_spent(patience, epochs, resumed=True)
        t0 = time.perf_counter()
        while not stopped and self.epoch < min(epochs, stop_after or epochs):
            e = self.epoch
            tr = self.train_epoch(e)
            self._record({"epoch": e + 1, "split": "train", **tr})
            val: dict[str, Any] = {}
            last = e + 1 == epochs
            if (e + 1) % tcfg["eval_every"] == 0 or last:
                val = self._on_main(self.evaluate)
                if tcfg["gen_metrics"] == "every":
                    val.update(self._on_main(lambda f=last: self.generation_metrics(final=f)))
                row = {"epoch": e + 1, "split": self.val_split, **val}
                # the last epoch of a run that patience stops gets the end-of-run work too
                stopped = not last and patience > 0 and self._patience_spent(
                    patience, epochs, [*self.history, row], epoch=e + 1)
                last = last or stopped
                if last and (tcfg["gen_metrics"] == "final"
                             or (tcfg["gen_metrics"] == "every" and stopped)):
                    val.update(self._on_main(self.generation_metrics))
                self._record({"epoch": e + 1, "split": self.val_split, **val})
            self.epoch = e + 1
            rngs = dist_.gather(ckpt_io.rng_state(), self.world) if self.world.active else None
            if self.out is not None:
                every = tcfg["samples_every"]
                if every and ((e + 1) % every == 0 or last):
                    grid = artifacts.write_samples(
                        self, self.out / "samples" / f"epoch_{e + 1:03d}.png")
                    self._log_image("samples", grid, e + 1)
                self._checkpoint(val, rngs)
            self.log(f"epoch {e + 1}/{epochs} [{tr['stage']}] {time.perf_counter() - t0:.0f}s "
                     f"train: {_fmt({k: v for k, v in tr.items() if k.endswith('.loss')})} | "
                     f"{self.val_split}: {_fmt(_headline(val, self.heads))}")
            if val and monitored:  # every metric is there now: a monitor missing them all along
                self._check_monitor(val, final=True)
            if stopped:
                self._patience_spent(patience, epochs, log=True)
        final = self.history[-1] if self.history else {}
        final = {k: v for k, v in final.items() if k not in ("epoch", "split")}
        init = next((h for h in self.history if h["split"] == "init"), None)
        best, best_epoch, _ = self.monitor.best(self.history, self.val_split)
        result = {"epochs": self.epoch, "split": self.val_split, "metrics": final,
                  "best": {"metric": self.monitor.name, "value": self.monitor.value(best),
                           "epoch": best_epoch,
                           # the same unless train.monitor changed on a resume and the new
                           # metric has not beaten its best since
                           "best_pt_epoch": self.best_pt_epoch},
                  "stopped_early": stopped, "train_seconds": round(time.perf_counter() - t0, 1)}
        if init:
            result["untrained"] = {k: v for k, v in init.items() if k not in ("epoch", "split")}
        if self.out is not None:
            ckpt_io.write_text_atomic(json.dumps(result, indent=2), self.out / "metrics.json")
            artifacts.plot_curves(self.history, self.out / "curves.png")
        return result

    def _record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.out is not None:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        for _, logger in self.loggers:
            logger.log(row)

    def _log_image(self, name: str, path: Path, epoch: int) -> None:
        if self.loggers:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            for _, logger in self.loggers:
                logger.log_image(name, pixels, epoch)

    def _build_loggers(self) -> list[tuple[str, RunLogger]]:
        """The config's ``loggers``, built through the registry (each checked as it is)."""
        out = []
        for label, comp in self.cfg.get("loggers", {}).items():
            logger = self.exp.registry.build("logger", comp["name"], comp.get("params", {}),
                                             key=f"loggers.{label}")
            if not isinstance(logger, RunLogger):
                raise ContractError(f"loggers.{label}: logger {comp['name']!r} must build an "
                                    f"mtcore.plugin.RunLogger, got {type(logger).__name__}")
            out.append((label, logger))
        return out

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, rank_rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """What a checkpoint holds; ``rank_rngs``: every process's random state, by rank
        (data-parallel runs: each process draws its own noise)."""
        return {
            "format": "mtcore", "version": ckpt_io.FORMAT_VERSION,
            "config": self.cfg, "info": ckpt_io.info_state(self.exp.info),
            "epoch": self.epoch, "global_step": self.global_step,
            "model": self.model.state_dict(), "balancer": self.balancer.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "aux": {f"{n}/{g}": {"optimizer": o.state_dict(), "scheduler": s.state_dict()}
                    for (n, g), (o, s, _) in self.aux.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt_io.rng_state(), "best": self.best, "history": self.history,
            "best_pt_epoch": self.best_pt_epoch,
            **({"rank_rngs": rank_rngs} if rank_rngs else {}),
        }

    def _checkpoint(self, val: dict[str, Any], rank_rngs: list[dict[str, Any]] | None = None
                    ) -> None:
        """``last.pt`` every epoch; ``best.pt`` when the score improved (both atomic)."""
        score = self.monitor.score(val)
        improved = score is not None and (self.best is None or score > self.best)
        if improved:
            self.best, self.best_pt_epoch = score, self.epoch
        state = self.state(rank_rngs)
        if improved:  # first: an interrupt in between leaves last.pt behind, which resumes
            ckpt_io.save_atomic(state, self.out / "checkpoints" / "best.pt")
        ckpt_io.save_atomic(state, self.out / "checkpoints" / "last.pt")

    def _patience_spent(self, patience: int, epochs: int, history=None, *, epoch: int | None = None,
                        resumed: bool = False, log: bool = False) -> bool:
        """Whether the last ``patience`` evaluations of ``history`` (default: the run's) all
        failed to beat the best, with epochs left to train after ``epoch``; logs why when
        ``log`` or ``resumed`` (a resumed run that trains no further)."""
        history = self.history if history is None else history
        epoch = self.epoch if epoch is None else epoch
        best, best_epoch, since = self.monitor.best(history, self.val_split)
        if best is None or since < patience or epoch >= epochs:
            return False
        if log or resumed:
            self.log(f"early stopping: {self.monitor.name} has not improved in {since} "
                     f"evaluation(s) (train.patience={patience}); best "
                     f"{self.monitor.value(best):.4g} at epoch {best_epoch}, in "
                     f"checkpoints/best.pt; "
                     + (f"not training on from epoch {epoch}/{epochs} (raise train.patience to "
                        "go on)" if resumed else f"stopping at epoch {epoch}/{epochs}"))
        return True

    def _last_validation(self) -> dict[str, Any]:
        """The metrics of the history's last validation row (a resumed run's), or none."""
        rows = [r for r in self.history if r.get("split") == self.val_split]
        return {k: v for k, v in rows[-1].items() if k not in ("epoch", "split")} if rows else {}

    def _check_monitor(self, val: Mapping[str, Any], final: bool) -> None:
        """``train.monitor`` names one of the validation metrics ``val``; ``final``: every
        metric there is to see is in ``val`` (else a generative task's may come later)."""
        key = self.monitor.key
        if key is None:
            return
        task = key.split(".")[0]
        generative = task in self.model.generative_heads()
        if key not in val and generative and not final:
            return  # its generation metrics come with the first full evaluation
        hint = ""
        if generative and self.cfg["train"]["gen_metrics"] != "every":
            hint = (f" (task {task!r} measures FID, precision, recall and the like at every "
                    "evaluation only with train.gen_metrics = \"every\")")
        self.monitor.check(val, hint=hint)

    def _resume(self) -> None:
        path = self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None
        if path is None or not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path}; run without --resume first")
        state = ckpt_io.load(path, map_location=self.device, require=ckpt_io.RUN_KEYS)
        if state["epoch"] and state["global_step"] != state["epoch"] * self.steps_per_epoch:
            # the schedule and the stages are laid out in steps: the count per epoch must stay
            raise CheckpointError(
                f"{path}: the run took {state['global_step'] // state['epoch']} steps per epoch "
                f"and this config gives {self.steps_per_epoch} (data.batch_size, the dataset's "
                "size or train.max_steps_per_epoch changed); resume with the run's own settings")
        self.load_state(state, str(path))
        self._resume_rngs(state.get("rank_rngs") or [], path)

    def _resume_rngs(self, rngs: list[dict[str, Any]], path: Path) -> None:
        """Each process of a data-parallel run continues its own random stream (load_state
        restored the main one's)."""
        if len(rngs) == self.world.size:
            ckpt_io.set_rng_state(rngs[self.world.rank])
            return
        if not (self.world.active or rngs):
            return  # one process, as before
        if self.world.active:
            self._seed_ranks()
        if self.world.main:
            warnings.warn(f"{path}: written by {len(rngs) or 1} process(es), resumed by "
                          f"{self.world.size}: the random draws (noise, latents, augmentation) "
                          "do not continue as they would have"
                          + (" (each process's start afresh from the seed and step)"
                             if self.world.active else " (the main process's stream goes on)"),
                          RuntimeWarning, stacklevel=2)

    def load_state(self, state: dict[str, Any], path: str) -> None:
        """Restore a checkpoint written by :meth:`save` (resume, ``mtcore eval``/``sample``).

        The model, tasks, optimizer kind, balancer and transfer must match (and, on resume, the
        steps per epoch: :meth:`_resume`); a changed dataset or seed warns; ``model.channels_last``
        and the epoch count may change; other optimizer settings (``optim``, ``tasks.*.optim``)
        may too, with a warning, and take effect from the resume point: the hyperparameters the optimizers were
        just built with replace the checkpoint's, the moments and step counts stay.
        """
        saved = state["config"]
        every = (_diff(saved.get("tasks"), self.cfg.get("tasks"), "tasks")
                 + _diff(saved.get("model"), self.cfg.get("model"), "model"))
        refused = [k for k in every if not _is_optim_key(k) and k not in _LAYOUT_ONLY]
        optim = [k for k in _diff(saved.get("optim"), self.cfg.get("optim"), "optim")
                 if k != "optim.epochs"]  # more (or fewer) epochs is what resuming is for
        optim += [k for k in every if _is_optim_key(k)]
        refused += [k for k in optim if k == "optim.optimizer"]  # its state would not fit
        # the balancer's state and the transfer's stages must be the checkpoint's
        refused += [k for top in ("balancer", "transfer")
                    for k in _diff(saved.get(top), self.cfg.get(top), top)
                    if k.startswith(_FIXED_ON_RESUME)]
        if refused:
            raise CheckpointError(f"{path}: was written for a different config ({_listed(refused)} "
                                  "changed); resume with the run's own config.toml")
        if optim:
            warnings.warn(f"{path}: resuming with changed optimizer settings ({_listed(optim)}); "
                          "they apply from the resume point", RuntimeWarning, stacklevel=2)
        was, now = ({"augment": [], **(c.get("data") or {})}  # none before the key existed
                    for c in (saved, self.cfg))
        data = [k for k in _diff(was, now, "data")
                if k.startswith(("data.dataset", "data.augment"))] + _diff(
                    saved.get("seed"), self.cfg.get("seed"), "seed")
        if data:
            warnings.warn(f"{path}: resuming with a changed {_listed(data)}: the run goes on with "
                          "other data, augmentation or shuffle than it started with",
                          RuntimeWarning, stacklevel=2)
        ckpt_io.load_model_weights(self.model, state["model"], path)
        self.balancer.load_state_dict(state["balancer"])
        _load_keeping_hyperparameters(self.optimizer, self.scheduler, state["optimizer"],
                                      state["scheduler"])
        for (n, g), (o, s, _) in self.aux.items():
            _load_keeping_hyperparameters(o, s, state["aux"][f"{n}/{g}"]["optimizer"],
                                          state["aux"][f"{n}/{g}"]["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = list(state["history"])
        # the best so far by this run's monitor (its own history: a changed train.monitor too)
        self.best = self.monitor.best(self.history, self.val_split)[0]
        self.best_pt_epoch = state.get("best_pt_epoch", _saved_best_epoch(saved, self))
        if _monitored(saved) != _monitored(self.cfg):
            warnings.warn(f"{path}: train.monitor changed ({_monitored(saved)} -> "
                          f"{_monitored(self.cfg)}); checkpoints/best.pt holds the old choice "
                          "until the new metric beats its best so far", RuntimeWarning,
                          stacklevel=2)
        ckpt_io.set_rng_state(state["rng"])
        if self.out is not None:  # metrics.jsonl continues from the checkpoint's history
            with open(self.out / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)


# Config keys that change how tensors are laid out, not what the model is: a checkpoint resumes
# across them (the weights load into either memory format).
_LAYOUT_ONLY = ("model.channels_last",)
# Config keys a checkpoint resumes only unchanged (prefixes of dotted keys).
_FIXED_ON_RESUME = ("balancer", "transfer")
# Hyperparameters of a parameter group that a resumed run takes from its own (new) config.
_HYPER = ("initial_lr", "weight_decay", "betas", "momentum", "eps")


def _saved_best_epoch(saved: Mapping[str, Any], trainer: Trainer) -> int | None:
    """The epoch best.pt holds, for a checkpoint from before it was kept: the best epoch by
    the checkpoint's own monitor (None if that cannot be told)."""
    try:
        monitor = Monitor.from_config(saved.get("train", {}), trainer.heads)
        return monitor.best(trainer.history, trainer.val_split)[1]
    except (ConfigError, KeyError, ValueError):
        return None


def _silent(_: str) -> None:
    """The log of a process that is not the main one."""


def micro_batches(batch: Mapping[str, Any], size: int) -> list[tuple[dict[str, Any], float]]:
    """``batch`` cut along its first dimension into the fewest pieces of at most ``size``
    samples, as equal as possible (BatchNorm sees like-sized pieces, never a lone sample left
    over), each with its share of the batch; ``size`` 0 or at least the batch's: the batch
    whole. A value that is not a tensor of the batch's length goes to every piece as it is."""
    n = _batch_length(batch)
    if size <= 0 or n <= size:
        return [(dict(batch), 1.0)]
    count = -(-n // size)
    bounds = [i * (n // count) + min(i, n % count) for i in range(count + 1)]
    return [({k: v[a:b] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
              for k, v in batch.items()}, (b - a) / n) for a, b in itertools.pairwise(bounds)]


def _batch_length(batch: Mapping[str, Any]) -> int:
    """How many samples ``batch`` holds: its image count (or its first tensor's length)."""
    first = batch.get("image")
    if not torch.is_tensor(first):
        first = next((v for v in batch.values() if torch.is_tensor(v) and v.dim()), None)
    return int(first.shape[0]) if torch.is_tensor(first) and first.dim() else 0


def _share_weighted(parts: list[tuple[float, Mapping[str, torch.Tensor]]]
                    ) -> Mapping[str, torch.Tensor]:
    """The batch's values from its pieces' (``share``-weighted means; one piece: its own)."""
    if len(parts) == 1:
        return parts[0][1]
    return {k: sum(share * values[k] for share, values in parts) for k in parts[0][1]}


def _scalar_loss(task: str, head: TaskHead, loss: Any, what: str = "compute_loss") -> torch.Tensor:
    """``loss`` as a float32 scalar, or a ContractError naming the task, the head and the shape
    (a per-sample loss vector used to fail inside the NaN check as an ambiguous bool)."""
    if not torch.is_tensor(loss) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if torch.is_tensor(loss) else type(loss).__name__
        raise ContractError(
            f"task {task!r}: {type(head).__name__}.{what} must return a scalar tensor (reduce it, "
            f"e.g. .mean()), got {got}")
    return loss.reshape(()).float()  # a one-element [1] loss is a scalar too


def _monitored(cfg: Mapping[str, Any]) -> str:
    train = cfg.get("train", {})
    return f"{train.get('monitor') or '(the default)'} ({train.get('monitor_mode', 'auto')})"


def _is_optim_key(key: str) -> bool:
    """A task's own optimizer settings (``tasks.NAME.optim.*``)."""
    parts = key.split(".")
    return len(parts) > 2 and parts[0] == "tasks" and parts[2] == "optim"


def _listed(keys: list[str], most: int = 6) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _load_keeping_hyperparameters(opt: torch.optim.Optimizer, sched: Any,
                                  opt_state: dict[str, Any], sched_state: dict[str, Any]) -> None:
    """Load an optimizer and its LambdaLR, then put back the hyperparameters they were built with
    (a resumed run's config), rescheduling the learning rate at the restored step."""
    fresh = [{k: g[k] for k in _HYPER if k in g} for g in opt.param_groups]
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    for group, hyper in zip(opt.param_groups, fresh, strict=True):
        group.update(hyper)
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * factor(sched.last_epoch)


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    """Dotted keys under ``prefix`` whose values differ between two config tables."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [k for key in sorted(set(a) | set(b), key=str)
                for k in _diff(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [prefix]


def _headline(val: Mapping[str, Any], heads: Mapping[str, TaskHead]) -> dict[str, Any]:
    """The metrics the epoch line shows: each task's primary metric, PSNR and FID of generative
    heads; the validation losses when there are none of those (plugin tasks with no metric)."""
    primary = {f"{n}.{h.primary_metric[0]}" for n, h in heads.items() if h.primary_metric}
    shown = {k: v for k, v in val.items()
             if k in primary or k.split(".")[-1] in ("miou", "accuracy", "psnr", "fid")}
    return shown or {k: v for k, v in val.items() if k.endswith(".loss")}


def _fmt(d: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
