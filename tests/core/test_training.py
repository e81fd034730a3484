"""End-to-end training on tiny settings: artefacts, D/G alternation, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import mtcore
from mtcore.trainer import Trainer

TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=48", "data.batch_size=16",
    "data.eval_batch_size=48", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8",
    "train.gen_metric_samples=32", "train.num_samples=4", "train.progress=false",
    "optim.epochs=2", "kernels=\"reference\"",
]


def test_default_config_tiny_run_writes_every_artefact(tmp_path):
    out = tmp_path / "run"
    exp = mtcore.build(None, TINY)
    result = mtcore.fit(exp, out)
    for name in ("config.toml", "metrics.jsonl", "metrics.json", "checkpoints/last.pt",
                 "checkpoints/best.pt", "samples/epoch_001.png", "samples/epoch_002.png",
                 "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (0, "init"), (1, "train"), (1, "val"), (2, "train"), (2, "val")]
    val = rows[-1]
    for key in ("seg.miou", "seg.pixel_acc", "cls.accuracy", "cls.macro_f1", "vae.psnr",
                "vae.elbo", "gan.fid", "gan.precision", "gan.recall", "vae.fid"):
        assert key in val, key
    assert 0 <= val["seg.miou"] <= 1 and 0 <= val["cls.accuracy"] <= 1
    # training rows log every task's loss and weight
    for task in ("seg", "cls", "vae", "gan"):
        assert f"{task}.loss" in rows[1] and rows[1][f"{task}.weight"] == 1.0
    assert json.loads((out / "metrics.json").read_text())["metrics"] == result["metrics"]
    # the grid: input row + seg masks + vae recon + the GAN's images of the input masks + vae
    # samples + one row of GAN samples per label (3), 4 columns of 32-px tiles
    grid = Image.open(out / "samples" / "epoch_002.png")
    grid.verify()
    w, h = Image.open(out / "samples" / "epoch_002.png").size
    assert (w, h) == (96 + 4 * (32 + 2) + 2, 8 * (32 + 2) + 2)
    assert Image.open(out / "curves.png").size[0] > 100
    # the saved config is the resolved one and reloads to the same
    from mtcore.config import load_toml, resolve_config
    assert resolve_config(load_toml(out / "config.toml")) == exp.config


def test_cpu_trainer_runs_channels_last_without_nan_filling(monkeypatch):
    """The default config trains NHWC (faster oneDNN convolutions) and deterministic mode skips
    PyTorch's NaN-filling of every fresh tensor, which costs time and buys nothing here."""
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    torch.use_deterministic_algorithms(False)  # as in a fresh process
    trainer = Trainer(mtcore.build(None, TINY), None, progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory
    # a user who turned deterministic mode on (to debug with NaN-filling, say) keeps it as set
    torch.utils.deterministic.fill_uninitialized_memory = True
    Trainer(mtcore.build(None, TINY), None, progress=False)
    assert torch.utils.deterministic.fill_uninitialized_memory
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    logits = trainer.model(batch)["seg"]["logits"]
    assert logits.is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous()
    plain = Trainer(mtcore.build(None, [*TINY, "model.channels_last=false"]), None, progress=False)
    assert all(c.weight.is_contiguous() for c in plain.model.modules()
               if isinstance(c, torch.nn.Conv2d))


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_discriminator_and_generator_steps_alternate():
    exp = mtcore.build({"tasks": {"gan": {"head": {"name": "gan", "params": {
        "width": 8, "d_width": 8, "r1_gamma": 1.0, "r1_every": 1}},
        "loss": {"name": "adversarial"}}}}, TINY[:4] + ["model.backbone.params.width=8",
                                                          "kernels=\"reference\""])
    trainer = Trainer(exp, None, progress=False)
    head = trainer.heads["gan"]
    (aux_opt, _, d_params), = trainer.aux.values()
    seen = {}

    def aux_step(orig=aux_opt.step):
        assert all(p.grad is None for p in head.generator.parameters()), "G got grads in a D step"
        seen["g_before_d"] = _params(head.generator)
        orig()
        seen["d_after_d"] = _params(head.discriminator)
        seen["g_after_d"] = _params(head.generator)

    def main_step(orig=trainer.optimizer.step):
        assert all(p.grad is None for p in d_params), "D got grads in the G step"
        orig()

    aux_opt.step, trainer.optimizer.step = aux_step, main_step
    d0 = _params(head.discriminator)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    trainer.model.train()
    trainer.train_step(batch)
    g1, d1 = _params(head.generator), _params(head.discriminator)
    # the D step moved D and left G (weights and BatchNorm statistics) untouched
    assert any(not torch.equal(d0[k], seen["d_after_d"][k]) for k in d0)
    g0 = seen["g_before_d"]
    assert all(torch.equal(g0[k], seen["g_after_d"][k]) for k in g0)
    # the G step moved G but not D
    assert all(torch.equal(d1[k], seen["d_after_d"][k]) for k in d1)
    assert any(not torch.equal(g1[k], seen["g_before_d"][k]) for k in g1 if "weight" in k)
    # EMA moved after the G step
    assert any(not torch.equal(a, b) for a, b in zip(head.ema.state_dict().values(),
                                                     seen["g_before_d"].values(), strict=True))


@pytest.mark.parametrize("extra", [[], ['data.augment=[{name="flip"}, {name="random_resized_crop"}, '
                                           '{name="color_jitter", params={brightness=0.3}}]']],
                         ids=["plain", "augmented"])
def test_resume_is_bit_exact(tmp_path, extra):
    """A run stopped after epoch 1 and resumed ends as an uninterrupted one, to the bit; with
    training-time augmentation too (its draws come from the saved training stream)."""
    sets = TINY + ["train.gen_metrics=\"none\"", "train.samples_every=0", *extra]
    full = Trainer(mtcore.build(None, sets), tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(mtcore.build(None, sets), tmp_path / "part", progress=False)
    part.fit(stop_after=1)
    resumed = Trainer(mtcore.build(None, sets), tmp_path / "part", progress=False)
    resumed.fit(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.history == resumed.history


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from mtcore.errors import CheckpointError

    trainer = Trainer(mtcore.build(None, TINY), tmp_path / "empty", progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainer.fit(resume=True)


def test_resume_checks_what_changed(tmp_path):
    """A changed model, loss or optimizer kind is refused, naming the keys; the memory format and
    the epoch count may change silently; other optimizer settings with a warning that names them,
    and they take effect (the checkpoint's own values do not come back)."""
    import warnings

    from mtcore.errors import CheckpointError, ConfigError

    sets = TINY + ["train.gen_metrics=\"none\"", "train.samples_every=0", "optim.epochs=1",
                   "model.channels_last=false"]
    Trainer(mtcore.build(None, sets), tmp_path, progress=False).fit()

    def resume(*extra):
        trainer = Trainer(mtcore.build(None, [*sets, *extra]), tmp_path, progress=False)
        trainer._resume()
        return trainer

    with pytest.raises(CheckpointError, match=r"model\.backbone\.params\.width changed"):
        resume("model.backbone.params.width=4")
    saved = (tmp_path / "config.toml").read_text()
    with pytest.raises(CheckpointError, match=r"model\.backbone\.params\.width changed"):
        Trainer(mtcore.build(None, [*sets, "model.backbone.params.width=4"]), tmp_path,
                progress=False).fit(resume=True)
    assert (tmp_path / "config.toml").read_text() == saved  # a refused resume rewrote it
    # also the balancer's state, the stages and the steps per epoch must be the checkpoint's
    for override, changed in [("tasks.seg.loss.params.label_smoothing=0.2",
                               r"tasks\.seg\.loss\.params\.label_smoothing"),
                              ('optim.optimizer="sgd"', r"optim\.optimizer"),
                              ('balancer={name = "uncertainty"}', r"balancer\.name, balancer\.params"),
                              ('transfer={name = "staged"}', r"transfer\.name")]:
        with pytest.raises(CheckpointError, match=changed + r".* changed"):
            resume(override)
    for override, steps in (("data.batch_size=8", 6), ("train.max_steps_per_epoch=1", 1)):
        with pytest.raises(CheckpointError, match=rf"the run took 3 steps per epoch and this "
                                                  rf"config gives {steps} \(data.batch_size"):
            resume(override)
    resume("data.batch_size=15")  # 48 images: still 3 (full) batches an epoch, so it resumes
    lines: list[str] = []
    Trainer(mtcore.build(None, sets), tmp_path, progress=False, log=lines.append).fit(resume=True)
    assert "the run is at epoch 1 of optim.epochs = 1: nothing to train" in lines[0]
    with pytest.warns(RuntimeWarning, match=r"a changed seed: the run goes on with other data, "
                                            r"augmentation or shuffle"):
        resume("seed=3")
    with pytest.warns(RuntimeWarning, match=r"a changed data\.augment: the run goes on"):
        resume('data.augment=[{name = "flip"}]')
    # a run from before data.augment existed: no key in its config is no augmentation, no change
    from mtcore.checkpoint import save_atomic

    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["config"]["data"]["augment"]
    save_atomic(state, last)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*resuming with a changed")
        resume()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*changed optimizer settings")
        kept = resume("optim.epochs=2", "model.channels_last=true")
    with pytest.warns(RuntimeWarning, match=r"changed optimizer settings \(optim\.lr, "
                                           r"optim\.weight_decay, tasks\.gan\.optim\.betas\)"):
        new = resume("optim.epochs=2", "optim.lr=1e-4", "optim.weight_decay=0.5",
                     "tasks.gan.optim.betas=[0.5, 0.9]")
    for a, b in zip(kept.optimizer.param_groups, new.optimizer.param_groups, strict=True):
        factor = a["lr"] / a["initial_lr"]  # the schedule at the restored step, the same in both
        if a["name"] != "head.gan":  # the GAN generator group has its own settings
            assert b["initial_lr"] == 1e-4 and b["weight_decay"] == 0.5
            assert b["lr"] == pytest.approx(1e-4 * factor)
        else:
            assert b["betas"] == (0.5, 0.9) and a["betas"] == (0.0, 0.99)
    assert kept.scheduler.last_epoch == new.scheduler.last_epoch == kept.global_step > 0
    assert new.scheduler.base_lrs == [g["initial_lr"] for g in new.optimizer.param_groups]
    kept.fit(resume=False)  # continues from the restored state: the second epoch only
    assert kept.epoch == 2 and [r["epoch"] for r in kept.history if r["split"] == "val"] == [1, 2]
    with pytest.raises(ConfigError, match=r"optim.epochs = 1, but the run has trained 2 epochs "
                                          r"already; give at least 2"):
        Trainer(mtcore.build(None, sets), tmp_path, progress=False).fit(resume=True)


def test_head_backbone_mismatch_is_a_build_error():
    from mtcore.errors import IncompatibleComponentsError

    with pytest.raises(IncompatibleComponentsError, match=r"tasks\.seg\.head.*in_feature|no "):
        mtcore.build({"tasks": {"seg": {"head": {"name": "segmentation",
                                                 "params": {"in_features": ["nope"]}}}}}, TINY[:5])


def test_loss_that_does_not_fit_the_head_is_a_build_error():
    from mtcore.errors import IncompatibleComponentsError

    with pytest.raises(IncompatibleComponentsError, match="loss 'dice' is for 'segmentation'"):
        mtcore.build({"tasks": {"c": {"head": {"name": "classification"},
                                      "loss": {"name": "dice"}}}}, TINY[:5])


def test_famo_recompute_leaves_batchnorm_statistics_alone():
    """FAMO evaluates the batch again after the step (in train mode, as the step did); that pass
    must not update running statistics a second time (one step = one BN update) and must see the
    step's own loss schedule (the VAE's KL warm-up counter moves after it)."""
    exp = mtcore.build(None, [*TINY, 'balancer.name="famo"', "tasks.gan.enabled=false"])
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    trainer._apply_stage(0)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    bns = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    calls = []
    original = trainer.balancer.after_step
    vae = trainer.heads["vae"]

    def spy(losses, recompute):
        calls.append(int(vae.steps))  # the KL warm-up counter the recompute sees
        return original(losses, recompute)

    trainer.balancer.after_step = spy
    trainer.train_step(batch)
    assert calls == [0]  # the step's own (first) KL weight, not the next step's
    assert int(vae.steps) == 1
    assert all(int(m.num_batches_tracked) == 1 for m in bns)


def test_a_group_schedule_overrides_the_global_one():
    """The default keeps the GAN (generator group and discriminator) at a constant rate while
    the rest follows the cosine: halfway, cosine groups are at lr/2, the GAN's at lr."""
    exp = mtcore.build(None, TINY)  # TINY keeps the default's schedules: 2 epochs of 3 steps
    assert exp.config["optim"]["schedule"] == "cosine"
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    factor = {g["name"]: f(3) for g, f in zip(trainer.optimizer.param_groups,
                                              trainer.scheduler.lr_lambdas, strict=True)}
    assert factor["backbone"] == pytest.approx(0.5)  # 3 of 6 steps into the cosine
    assert factor["head.seg"] == pytest.approx(0.5)
    assert factor["head.gan"] == 1.0
    (d_opt, d_sched, _), = trainer.aux.values()
    assert d_sched.lr_lambdas[0](3) == 1.0
    assert "schedule" not in d_opt.param_groups[0]  # a trainer option, not an optimizer one


def test_an_unknown_group_schedule_is_a_config_error():
    with pytest.raises(mtcore.errors.ConfigError, match="tasks.gan.optim.schedule"):
        mtcore.build(None, [*TINY, 'tasks.gan.optim.schedule="linear"'])


def test_famo_recompute_replays_the_steps_random_draws():
    """With a learning rate too small to move any weight, FAMO's recompute must return exactly the
    step's losses, stochastic tasks included (VAE reparameterisation noise, GAN latents): it
    replays the step's random draws, and the training stream continues as if it had not run."""
    exp = mtcore.build(None, [*TINY, 'balancer.name="famo"', "optim.lr=1e-30",
                              "optim.groups.discriminator.lr=1e-30", "tasks.gan.optim.lr=1e-30"])
    trainer = Trainer(exp, None, progress=False, log=lambda _: None)
    trainer._apply_stage(0)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    seen = {}
    original = trainer.balancer.after_step

    def spy(losses, recompute):
        seen["step"] = {k: v.detach().clone() for k, v in losses.items()}
        state = torch.get_rng_state()
        seen["again"] = recompute()
        seen["rng_kept"] = torch.equal(state, torch.get_rng_state())
        return original(losses, lambda: seen["again"])

    trainer.balancer.after_step = spy
    trainer.train_step(batch)
    assert set(seen["step"]) == {"seg", "cls", "vae", "gan"}
    for k, v in seen["step"].items():
        assert torch.equal(v, seen["again"][k]), k
    assert seen["rng_kept"]


@pytest.mark.parametrize("kernels", ["reference", "cpp"])
def test_bf16_autocast_trains_the_default_tasks(kernels, request):
    """train.amp="bf16" on the CPU: the discriminator's fused bias + activation got a bf16 conv
    output and an fp32 bias and raised a dtype error on every backend; now the bias follows."""
    if kernels == "cpp":
        request.getfixturevalue("cpp_built")
    overrides = [*TINY[:-1], f'kernels="{kernels}"', 'train.amp="bf16"']
    trainer = Trainer(mtcore.build(None, overrides), None, progress=False, log=lambda _: None)
    trainer._apply_stage(0)
    batch = next(iter(trainer._loader(trainer.train_set, True)))
    fp32 = Trainer(mtcore.build(None, [*TINY[:-1], f'kernels="{kernels}"']), None, progress=False,
                   log=lambda _: None)
    fp32._apply_stage(0)
    logs, want = trainer.train_step(batch), fp32.train_step(batch)
    for task in ("seg", "cls", "vae", "gan"):  # same init and batch: bf16 rounding only
        assert logs[f"{task}.loss"] == pytest.approx(want[f"{task}.loss"], rel=0.03), task


def test_sampling_a_label_needs_a_conditional_generator(tmp_path):
    """--label on an unconditional generator was silently ignored; now an error that says so.
    A run folder given as the checkpoint is named as a directory (it said "does not exist")."""
    from mtcore.errors import CheckpointError

    fast = [*TINY, "optim.epochs=1", 'train.gen_metrics="none"', "train.samples_every=0",
            "tasks.seg.enabled=false", "tasks.cls.enabled=false", "tasks.vae.enabled=false",
            'tasks.gan={head={name="gan", params={width=8, d_width=8}}, loss={name="adversarial"}}']
    for conditional in (True, False):
        out = tmp_path / str(conditional)
        flag = f"tasks.gan.head.params.conditional={str(conditional).lower()}"
        mtcore.fit(mtcore.build(None, [*fast, flag]), out)
        ckpt = out / "checkpoints" / "last.pt"
        if conditional:
            images = mtcore.sample(ckpt, n=4, label=1)
            assert images.shape == (4, 3, 16, 16) and 0 <= images.min() <= images.max() <= 1
        else:
            with pytest.raises(CheckpointError, match="--label 1: the 'gan' head is not "
                                                      "class-conditional"):
                mtcore.sample(ckpt, n=4, label=1)
            assert mtcore.sample(ckpt, n=4).shape == (4, 3, 16, 16)
    with pytest.raises(CheckpointError, match="is a directory; give a file"):
        mtcore.sample(tmp_path / "True", n=4)


def test_a_fresh_run_into_an_old_run_folder_says_so_and_leaves_no_stale_grids(tmp_path):
    fast = [*TINY, 'train.gen_metrics="none"', "tasks.gan.enabled=false"]
    Trainer(mtcore.build(None, [*fast, "optim.epochs=2"]), tmp_path, progress=False,
            log=lambda _: None).fit()
    assert (tmp_path / "samples" / "epoch_002.png").is_file()
    lines: list[str] = []
    Trainer(mtcore.build(None, [*fast, "optim.epochs=1"]), tmp_path, progress=False,
            log=lines.append).fit()
    assert any("holds an earlier run: starting over" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch_001.png"]


def test_default_steps_with_cpp_kernels_match_the_reference(cpp_built):
    """The fused ops (the losses, the discriminator's layers, and the model layers that
    FusedSequential runs fused: BatchNorm/pixel norm + activation, upsample + conv) change float
    rounding only: the first default step from the same init, batch and sampling noise logs the
    reference's losses to 1e-5; the second, after Adam's first update (which moves every weight
    by +-lr, whatever its gradient's size, so tiny gradients that differ in sign part the runs),
    to 1e-3."""
    from mtcore import kernels
    from mtcore.trainer import to_device

    trainers = {}
    for k in ("reference", "cpp"):
        trainers[k] = Trainer(mtcore.build(None, [*TINY[:-1], f'kernels="{k}"']), None,
                              progress=False, log=lambda _: None)
        trainers[k]._apply_stage(0)
    batch = to_device(next(iter(trainers["cpp"]._loader(trainers["cpp"].train_set, True))), "cpu")
    logs = {k: [] for k in trainers}
    try:
        for step in range(2):
            for k, trainer in trainers.items():
                kernels.set_backend(k)
                torch.manual_seed(100 + step)  # the VAE's noise comes from the global generator
                logs[k].append(trainer.train_step(batch))
    finally:
        kernels.set_backend(None)
    for tol, got, want in zip((1e-5, 1e-3), logs["cpp"], logs["reference"], strict=True):
        for task in ("seg", "cls", "vae", "gan"):
            assert got[f"{task}.loss"] == pytest.approx(want[f"{task}.loss"], rel=tol), task
    fused = [m for m in trainers["cpp"].model.modules() if isinstance(m, kernels.FusedSequential)]
    assert len(fused) >= 8  # the U-Net's blocks, the segmentation head's, both image decoders


def test_every_default_task_trains_on_a_users_image_folder(tmp_path):
    """The default four tasks on a folder of photos (sizes differ, JPEG), masks and labels:
    the run reaches its generation metrics, whose evaluator cache is named after a dataset
    name that holds a ':' (``image_folder:photos``; it used to be refused as a file name)."""
    from mtcore_tasks.evaluator import cache_key_for

    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    g = torch.Generator().manual_seed(0)
    rows = ["filename,label"]
    for i in range(40):
        w, h = 20 + i % 5, 18
        img = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8)
        mask = torch.zeros(h, w, dtype=torch.uint8)
        mask[4:12, 5:15] = 1 + i % 2
        img[mask > 0] = torch.tensor([230, 20, 20] if i % 2 else [20, 20, 230], dtype=torch.uint8)
        Image.fromarray(img.numpy()).save(root / "images" / f"p{i}.jpg")
        Image.fromarray(mask.numpy()).save(root / "masks" / f"p{i}.png")
        rows.append(f"p{i}.jpg,{'red' if i % 2 else 'blue'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    sets = [*TINY, "optim.epochs=1", "train.samples_every=0", "train.gen_metric_samples=16",
            f'data.dataset={{name = "image_folder", params = {{root = "{root.as_posix()}", '
            'size = 16, class_names = ["background", "blue", "red"], label_names = ["blue", '
            '"red"], val_fraction = 0.5}}']
    exp = mtcore.build(None, sets)
    assert exp.info.name == "image_folder:photos"
    assert cache_key_for(exp.info) == "image_folder-photos-16x16-c3"
    result = mtcore.fit(exp, tmp_path / "run")
    for key in ("seg.miou", "cls.accuracy", "vae.psnr", "gan.fid", "gan.class_consistency"):
        assert key in result["metrics"], key


def test_fit_names_a_missing_validation_split():
    from mtcore.errors import ConfigError
    from mtcore.experiment import build_experiment

    exp = build_experiment(None, TINY, splits=("train",))
    with pytest.raises(ConfigError, match=r"fit\(\) needs the 'val' dataset in the experiment "
                                          r"\(built with splits=\('train',\); "
                                          r"data.val_split = 'val'\)"):
        Trainer(exp, None, progress=False).fit()
