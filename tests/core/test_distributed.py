"""Data-parallel training under ``torchrun`` (gloo, two CPU processes): the processes stay
identical, their step is the single-process step on the whole batch, only the main process
writes the run folder, and a resumed run continues each process's random stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mtcore
from mtcore.distributed import RankSlice, World
from mtcore.errors import ConfigError
from mtcore.trainer import Trainer

# no batch statistics (BatchNorm sees only a process's share) and no random draws in the step:
# two processes must give the single-process step on the whole batch
TASKS = {
    "cls": {"head": {"name": "classification", "params": {"pool": "avgmax"}},
            "loss": {"name": "cls_cross_entropy", "params": {"label_smoothing": 0.1}}},
    "cls2": {"head": {"name": "classification", "params": {"pool": "avgmax", "hidden": 16}},
             "loss": {"name": "cls_cross_entropy", "params": {}}},
}
EXACT = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=64", "data.batch_size=16",
    'model.backbone.params.norm="none"', "model.backbone.params.width=8", "optim.epochs=2",
    'optim.optimizer="sgd"', "optim.lr=0.05", 'balancer.name="uncertainty"',
    "train.progress=false", 'kernels="reference"', 'train.gen_metrics="none"',
    "train.samples_every=0",
]
TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=48", "data.batch_size=16",
    "data.eval_batch_size=48", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8",
    "train.gen_metric_samples=32", "train.num_samples=4", 'kernels="reference"',
]

WORKER = textwrap.dedent("""
    import json, sys, torch, mtcore
    from mtcore.trainer import Trainer
    tasks, sets, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    for balancer in json.loads(sys.argv[4]):
        exp = mtcore.build({"tasks": tasks}, [*sets, f'balancer.name="{balancer}"'])
        trainer = Trainer(exp, None, progress=False)
        trainer.fit()
        torch.save({"model": trainer.model.state_dict(),
                    "balancer": trainer.balancer.state_dict(), "history": trainer.history},
                   f"{out}/{balancer}.rank{trainer.world.rank}.pt")
""")
# a loss weighting with learnable weights, and gradient methods with state (GradNorm's initial
# losses and weights, Nash-MTL's solution): each process must see the whole batch's losses and
# task gradients for the processes to stay alike and match a single process
BALANCERS = ["uncertainty", "gradnorm", "nash_mtl", "mgda"]

RESUMER = textwrap.dedent("""
    import json, sys, mtcore
    from mtcore.trainer import Trainer
    sets, out, how = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    trainer = Trainer(mtcore.build(None, sets), out, progress=False)
    trainer.fit(stop_after=1) if how == "stop" else trainer.fit(resume=True)
""")


def _torchrun(args: list[str], tmp: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600, **kw)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_take_the_single_process_steps(tmp_path):
    (tmp_path / "w.py").write_text(WORKER)
    _ok(_torchrun([str(tmp_path / "w.py"), json.dumps(TASKS), json.dumps(EXACT), str(tmp_path),
                   json.dumps(BALANCERS)], tmp_path))
    for balancer in BALANCERS:
        ranks = [torch.load(tmp_path / f"{balancer}.rank{r}.pt", weights_only=True)
                 for r in (0, 1)]
        for part in ("model", "balancer"):  # the processes hold one model and one balancer
            for k, v in ranks[0][part].items():
                if torch.is_tensor(v):
                    assert torch.equal(v, ranks[1][part][k]), (balancer, k)
        exp = mtcore.build({"tasks": TASKS}, [*EXACT, f'balancer.name="{balancer}"'])
        single = Trainer(exp, None, progress=False, log=lambda _: None)
        single.fit()
        for part, want_all in (("model", single.model.state_dict()),
                               ("balancer", single.balancer.state_dict())):
            for k, want in want_all.items():
                if torch.is_tensor(want) and want.is_floating_point():
                    torch.testing.assert_close(ranks[0][part][k], want, rtol=1e-5, atol=1e-6,
                                               msg=f"{balancer}: {part} {k}")
        # the logged training losses are the whole batches' means, evaluation the main one's
        for got, want in zip(ranks[0]["history"], single.history, strict=True):
            assert got.keys() == want.keys()
            for key, value in want.items():
                if isinstance(value, float):
                    assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (balancer, key)
        assert ranks[1]["history"] == ranks[0]["history"]


def test_the_main_process_writes_the_run_and_a_resume_continues_every_stream(tmp_path):
    """The default tasks (GAN, VAE noise) through the CLI: one run folder, written once; a run
    stopped after one epoch and resumed ends where an uninterrupted one does."""
    sets = [a for s in [*TINY, "optim.epochs=2"] for a in ("--set", s)]
    # as the README says: torchrun --standalone --nproc-per-node N -m mtcore train ...
    full = _ok(_torchrun(["-m", "mtcore", "train", "--quiet", "--out", "full", *sets], tmp_path))
    assert full.stdout.count("mtcore train: shapes 16x16") == 1  # the main process speaks
    assert "2 processes x device cpu" in full.stdout
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in rows] == [(0, "init"), (1, "train"), (1, "val"),
                                                        (2, "train"), (2, "val")]
    state = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rank_rngs"]) == 2
    assert not torch.equal(state["rank_rngs"][0]["torch"], state["rank_rngs"][1]["torch"])
    (tmp_path / "r.py").write_text(RESUMER)  # stopped after epoch 1 of 2, then resumed
    for how in ("stop", "resume"):
        _ok(_torchrun([str(tmp_path / "r.py"), json.dumps([*TINY, "optim.epochs=2"]),
                       str(tmp_path / "part"), how], tmp_path))
    resumed = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    for k, v in state["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_each_process_gets_its_share_of_the_same_batches():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same order in each
    shares = [list(RankSlice(10, World(rank=r, size=2), gen())) for r in (0, 1)]
    order = torch.randperm(10, generator=gen()).tolist()
    assert shares == [order[0::2], order[1::2]]
    # batch k of rank 0 and rank 1 (2 each) together: items 4k..4k+3 of the single order
    for k in range(2):
        assert sorted(shares[0][2 * k:2 * k + 2] + shares[1][2 * k:2 * k + 2]) == sorted(
            order[4 * k:4 * k + 4])


def test_a_batch_that_does_not_split_is_a_config_error(monkeypatch):
    import mtcore.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.dist_, "world_from_env", lambda: World(rank=0, size=3))
    with pytest.raises(ConfigError, match=r"data.batch_size = 16 does not split evenly over 3 "
                                          r"processes; use a multiple of 3"):
        Trainer(mtcore.build(None, TINY), None, progress=False)


def test_a_world_size_without_torchrun_is_a_clear_error(monkeypatch):
    from mtcore.distributed import world_from_env

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 in the environment, but the process "
                                          r"group did not start .*unset WORLD_SIZE"):
        world_from_env()
