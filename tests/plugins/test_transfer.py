"""Transfer strategies: parameter, feature, structure transfer and staged schedules."""

from __future__ import annotations

import pytest
import torch

import mtcore
from mtcore import checkpoint
from mtcore.errors import CheckpointError
from mtcore.trainer import Trainer

SMALL = ["data.dataset.params.size=16", "data.dataset.params.num_samples=32",
         "data.batch_size=16", "model.backbone.params.width=8", "tasks.gan.enabled=false",
         "tasks.vae.enabled=false", "train.progress=false", "train.gen_metrics=\"none\"",
         "kernels=\"reference\""]


@pytest.fixture
def source_ckpt(tmp_path):
    exp = mtcore.build(None, SMALL + ["seed=5"], splits=())
    path = tmp_path / "src.pt"
    checkpoint.save_atomic({"format": "mtcore", "version": 1, "config": exp.config,
                            "model": exp.model.state_dict()}, path)
    return path, exp.model.state_dict()


def test_finetune_loads_backbone_weights(source_ckpt):
    path, state = source_ckpt
    exp = mtcore.build(None, SMALL + ["transfer.name=\"finetune\"",
                                      f"transfer.params.checkpoint=\"{path}\""], splits=())
    for k, v in exp.model.backbone.state_dict().items():
        assert torch.equal(v, state[f"backbone.{k}"]), k
    # heads stay freshly initialised (seed 0, not the source's seed 5)
    head_key = next(k for k in state if k.startswith("heads.seg") and k.endswith("weight"))
    assert not torch.equal(exp.model.state_dict()[head_key], state[head_key])


def test_finetune_checkpoint_that_does_not_fit_names_the_keys(source_ckpt):
    path, _ = source_ckpt
    with pytest.raises(CheckpointError, match=r"does not fit the model: shape mismatch"):
        mtcore.build(None, SMALL + ["model.backbone.params.width=4", "transfer.name=\"finetune\"",
                                    f"transfer.params.checkpoint=\"{path}\""], splits=())


def test_feature_transfer_freezes_the_backbone_during_training(source_ckpt):
    path, state = source_ckpt
    exp = mtcore.build(None, SMALL + ["optim.epochs=1", "transfer.name=\"features\"",
                                      f"transfer.params.checkpoint=\"{path}\""])
    before = {k: v.clone() for k, v in exp.model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in exp.model.heads.state_dict().items()}
    Trainer(exp, None, progress=False).fit()
    after = exp.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BatchNorm statistics
    assert any(not torch.equal(head_before[k], v) for k, v in exp.model.heads.state_dict().items())


def test_structure_transfer_reuses_the_architecture_with_fresh_weights(source_ckpt, tmp_path):
    exp = mtcore.build(None, SMALL + ["seed=5", "model.backbone.params.width=12"], splits=())
    path = tmp_path / "wide.pt"
    checkpoint.save_atomic({"format": "mtcore", "version": 1, "config": exp.config,
                            "model": exp.model.state_dict()}, path)
    new = mtcore.build(None, SMALL + ["transfer.name=\"structure\"",
                                      f"transfer.params.checkpoint=\"{path}\""], splits=())
    assert new.config["model"]["backbone"]["params"]["width"] == 12
    w_new = next(iter(new.model.backbone.state_dict().values()))
    w_src = next(iter(exp.model.backbone.state_dict().values()))
    assert w_new.shape == w_src.shape and not torch.equal(w_new, w_src)


def test_staged_schedule_freezes_then_unfreezes():
    stages = ("[{name=\"heads\", epochs=1, freeze=[\"backbone\"]}, "
              "{name=\"all\", epochs=1, lr_scale=0.5}]")
    exp = mtcore.build(None, SMALL + ["optim.epochs=2", "optim.schedule=\"constant\"",
                                      "transfer.name=\"staged\"", f"transfer.params.stages={stages}"])
    trainer = Trainer(exp, None, progress=False)
    b0 = {k: v.clone() for k, v in exp.model.backbone.state_dict().items()}
    log = trainer.train_epoch(0)
    assert log["stage"] == "heads"
    assert all(torch.equal(b0[k], v) for k, v in exp.model.backbone.state_dict().items())
    lr0 = trainer.optimizer.param_groups[0]["initial_lr"]
    assert log["lr"] == pytest.approx(lr0)  # each epoch logs its own rate (it logged the next's)
    log = trainer.train_epoch(1)
    assert log["stage"] == "all" and log["lr"] == pytest.approx(lr0 * 0.5)
    assert any(not torch.equal(b0[k], v) for k, v in exp.model.backbone.state_dict().items())
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5)


def test_staged_rejects_unknown_module():
    from mtcore.errors import ConfigError

    # one line naming the transfer key (setup runs outside the registry's parameter checks)
    with pytest.raises(ConfigError, match=r"transfer \('staged'\): .*'heads.nope', which is not "
                                          r"a module"):
        mtcore.build(None, SMALL + ["transfer.name=\"staged\"",
                                    "transfer.params.stages=[{freeze=[\"heads.nope\"]}]"], splits=())


@pytest.mark.parametrize("strategy", ["finetune", "structure"])
def test_a_transferred_run_outlives_its_source_checkpoint(source_ckpt, tmp_path, strategy):
    """eval, sample and --resume of a finetuned (or structure-transferred) run read the run's own
    checkpoint; they failed with "checkpoint 'src.pt' does not exist" once the source was gone."""
    from mtcore.cli.main import main

    path, _ = source_ckpt
    out = tmp_path / "run"
    exp = mtcore.build(None, SMALL + ["optim.epochs=2", "train.samples_every=0",
                                      f'transfer={{name="{strategy}", params={{checkpoint="{path}"}}}}'])
    trainer = Trainer(exp, out, progress=False, log=lambda _: None)
    trainer.fit(stop_after=1)
    weights = {k: v.clone() for k, v in exp.model.state_dict().items()}
    path.unlink()
    restored = mtcore.load(out / "checkpoints" / "last.pt")
    for k, v in restored.model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # the run's weights, not the source's
    assert 0.0 <= mtcore.evaluate(out / "checkpoints" / "last.pt", "val")["seg.miou"] <= 1.0
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "checkpoints" / "last.pt").is_file()


def test_a_stage_can_freeze_the_gan_and_a_later_one_trains_it():
    """Freezing heads.gan crashed the discriminator step ("element 0 of tensors does not require
    grad"), and a later stage never unfroze the discriminator (its parameters are not the main
    optimizer's)."""
    stages = '[{name="g", epochs=1, freeze=["heads.gan"]}, {name="all", epochs=1}]'
    exp = mtcore.build(None, [*SMALL, "tasks.gan.enabled=true", "tasks.gan.head.params.width=8",
                              "tasks.gan.head.params.d_width=8", "optim.epochs=2",
                              f'transfer={{name="staged", params={{stages={stages}}}}}'])
    gan = exp.model.heads["gan"]
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    start = {k: v.clone() for k, v in gan.state_dict().items()}
    trainer.fit(stop_after=1)
    assert all(torch.equal(v, start[k]) for k, v in gan.state_dict().items())
    d_schedule = trainer.aux[("gan", "discriminator")][1]
    assert d_schedule.last_epoch == trainer.global_step > 0  # it kept pace while frozen
    before = {part: [p.clone() for p in part.parameters()]
              for part in (gan.discriminator, gan.generator)}
    trainer.fit()
    for part, old in before.items():
        assert any(not torch.equal(a, b) for a, b in zip(old, part.parameters(), strict=True))


def test_a_resumed_run_keeps_its_stages(tmp_path, capsys):
    """A restored run skips the strategy's setup() checks; its stages (what is frozen when, laid
    out in epochs) must be the checkpoint's, so a changed transfer is refused by name."""
    from mtcore.cli.main import main

    out = tmp_path / "run"
    exp = mtcore.build(None, SMALL + ["optim.epochs=2", "train.samples_every=0",
                                      'transfer={name="staged", params={stages=[{epochs=2}]}}'])
    Trainer(exp, out, progress=False, log=lambda _: None).fit(stop_after=1)
    bad = 'transfer.params.stages=[{name="b", epochs=2, freeze=["heads.nope"]}]'
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--set", bad]) == 2
    assert "transfer.params.stages changed" in capsys.readouterr().err


def test_staged_default_pretrains_heads_unbalanced_then_balances():
    from mtcore_transfer.strategies import Staged

    heads, joint, e2e = Staged().stages
    assert (heads.freeze, heads.balance, heads.tasks) == (("backbone",), False, None)
    assert (joint.freeze, joint.balance) == (("backbone",), True)
    assert (e2e.freeze, e2e.balance, e2e.lr_scale) == ((), True, 0.3)
    from mtcore.plugin import Stage

    assert Stage("s", tasks=["seg"], balance=False).tasks == ("seg",)
    for bad in ("seg", (), [1]):  # a string would be checked character by character
        with pytest.raises(ValueError, match="tasks must be None or a non-empty sequence"):
            Stage("s", tasks=bad, balance=False)
    with pytest.raises(ValueError, match="balance must be True or False"):
        Stage("s", balance="no")


@pytest.mark.parametrize("stage, message", [
    ('{tasks=["seg"], balance=true}', r"stage 'stage1' trains only the tasks \['seg'\], so it "
                                      r"cannot use the balancer"),
    ('{tasks="seg"}', r"stages\[0\]\.tasks: expected a non-empty list of task names"),
    ('{tasks=[]}', r"stages\[0\]\.tasks: expected a non-empty list"),
    ('{balance="no"}', r"stages\[0\]\.balance: expected true or false"),
    ('{tasks=["nope"]}', r"'stage1' trains the task\(s\) \['nope'\], which the experiment does "
                         r"not have \(tasks: seg, cls\)"),
    ('{freeze="backbone"}', r"stages\[0\]\.freeze: expected a list of module prefixes"),
    ('{epochs=1.7}', r"stages\[0\]\.epochs: expected an integer >= 1, got 1.7"),
    ('{epochs="two"}', r"stages\[0\]\.epochs: expected an integer >= 1, got 'two'"),
    ('{lr_scale=-1}', r"stages\[0\]\.lr_scale: expected a number >= 0, got -1"),
    ('1', r"stages\[0\]: expected a table \{name, epochs, \.\.\.\}, got 1"),
])
def test_staged_stage_errors_name_the_key(stage, message):
    from mtcore.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        mtcore.build(None, SMALL + ['transfer.name="staged"',
                                    f"transfer.params.stages=[{stage}]"], splits=())


def test_a_stage_that_trains_some_tasks_leaves_the_others_and_the_balancer_alone():
    stages = '[{name="seg only", epochs=1, tasks=["seg"]}, {name="all", epochs=1}]'
    exp = mtcore.build(None, [*SMALL, "tasks.vae.enabled=true", "tasks.vae.head.params.width=8",
                              "tasks.gan.enabled=true", "tasks.gan.head.params.width=8",
                              "tasks.gan.head.params.d_width=8", "optim.epochs=2",
                              'balancer.name="famo"',
                              f'transfer={{name="staged", params={{stages={stages}}}}}'])
    model = exp.model
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    famo_start = trainer.balancer.logits.clone()

    def changed(prefix):
        return {k for k, v in model.state_dict().items()
                if k.startswith(prefix) and not torch.equal(start[k], v)}

    trainer._apply_stage(0)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    step = trainer.train_step(batch)
    assert step["total"] == pytest.approx(step["seg.loss"])  # the plain loss of seg alone
    log = trainer.train_epoch(0)
    assert log["stage"] == "seg only"
    assert log["seg.weight"] == 1.0
    assert log["cls.weight"] == log["vae.weight"] == log["gan.weight"] == 0.0
    assert "gan.d_loss" not in log  # no discriminator step
    for name in ("cls", "vae", "gan"):  # frozen, eval mode: not even BatchNorm statistics move
        assert not changed(f"heads.{name}."), name
    assert int(model.heads["vae"].steps) == 0  # no main step: its KL warm-up did not advance
    assert changed("heads.seg.") and changed("backbone.")
    # FAMO's after_step (which moves its logits) was not called
    assert torch.equal(trainer.balancer.logits, famo_start)
    log = trainer.train_epoch(1)
    assert log["stage"] == "all" and "gan.d_loss" in log
    assert not torch.equal(trainer.balancer.logits, famo_start)
    for name in ("cls", "vae", "gan"):
        assert changed(f"heads.{name}."), name


def test_an_unbalanced_stage_trains_every_task_on_its_own_loss():
    """balance = false: the step's gradient is that of sum_k L_k, whatever the balancer."""
    def one_step(stages):
        exp = mtcore.build(None, [*SMALL, "optim.epochs=1", 'balancer.name="fixed"',
                                  "balancer.params.weights={seg=0.25, cls=4.0}",
                                  'optim.optimizer="sgd"', "optim.schedule=\"constant\"",
                                  "optim.grad_clip=0", "optim.weight_decay=0",
                                  f'transfer={{name="staged", params={{stages={stages}}}}}'])
        trainer = Trainer(exp, None, progress=False, log=lambda _: None)
        trainer._apply_stage(0)
        batch = next(iter(trainer._loader(trainer.train_set, True)))
        before = {k: v.clone() for k, v in exp.model.named_parameters()}
        logs = trainer.train_step(batch)
        return logs, {k: before[k] - v.detach() for k, v in exp.model.named_parameters()}

    logs, plain = one_step("[{balance=false}]")
    assert logs["seg.weight"] == logs["cls.weight"] == 1.0
    assert logs["total"] == pytest.approx(logs["seg.loss"] + logs["cls.loss"])
    logs_w, weighted = one_step("[{}]")
    assert logs_w["seg.weight"] == 0.25 and logs_w["cls.weight"] == 4.0
    # a head gets only its own task's gradient: seg's update is 1/0.25 = 4x as large unweighted,
    # cls's 1/4 as large
    for task, ratio in (("seg", 4.0), ("cls", 0.25)):
        key = next(k for k in plain if k.startswith(f"heads.{task}.") and plain[k].abs().sum() > 0)
        torch.testing.assert_close(plain[key], ratio * weighted[key], rtol=1e-4, atol=1e-7)


def test_a_stage_must_be_able_to_train_the_tasks_it_lists():
    from mtcore.errors import ConfigError

    stages = '[{name="s", tasks=["seg"], freeze=["heads.seg"]}]'
    exp = mtcore.build(None, [*SMALL, f'transfer={{name="staged", params={{stages={stages}}}}}'])
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    with pytest.raises(ConfigError, match=r"stage 's' trains the task\(s\) \['seg'\], but none of "
                                          "their parameters train in it"):
        trainer._apply_stage(0)
    # listing every task may keep the balancer
    stages = '[{name="all", tasks=["cls", "seg"], balance=true}]'
    exp = mtcore.build(None, [*SMALL, f'transfer={{name="staged", params={{stages={stages}}}}}'])
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    trainer._apply_stage(0)
    assert trainer.stage.balance and trainer.in_stage == ["seg", "cls"]


@pytest.mark.parametrize("params, message", [
    ('{checkpoint = 3}', r"checkpoint: expected the path of an mtcore checkpoint \(a string\)"),
    ('{checkpoint = "x.pt", freeze_epochs = "2"}', r"freeze_epochs: expected an integer >= 0"),
    ('{checkpoint = "x.pt", strict = "false"}', r"strict: expected true or false, got 'false'"),
])
def test_finetune_parameters_are_checked(params, message):
    from mtcore.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        mtcore.build(None, SMALL + [f'transfer={{name = "finetune", params = {params}}}'],
                     splits=())
    with pytest.raises(ConfigError, match=r"stages: expected a non-empty list of stage tables"):
        mtcore.build(None, SMALL + ['transfer={name = "staged", params = {stages = {epochs = 1}}}'],
                     splits=())


def test_finetune_that_would_load_nothing_is_refused(source_ckpt):
    """strict = false between unrelated backbones shares no tensor: an error, not a silent run
    from scratch (a frozen random backbone, with features)."""
    from mtcore.errors import ConfigError

    path, _ = source_ckpt
    for name in ("finetune", "features"):
        with pytest.raises(ConfigError, match=r"shares no parameter \(name and shape\) with this "
                                              r"model's backbone; nothing would load"):
            mtcore.build(None, SMALL + ['model.backbone={name = "resnet", params = {width = 8}}',
                                        f'transfer={{name = "{name}", params = {{checkpoint = '
                                        f'"{path}", strict = false}}}}'], splits=())



def test_mtcore_config_prints_the_backbone_structure_transfer_takes(source_ckpt, capsys):
    import tomllib

    from mtcore.cli.main import main

    path, _ = source_ckpt  # its backbone: unet of width 8 (the default's is 16)
    assert main(["config", "--set", f'transfer={{name = "structure", params = {{checkpoint = '
                                    f'"{path}"}}}}']) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["model"]["backbone"]["params"]["width"] == 8
