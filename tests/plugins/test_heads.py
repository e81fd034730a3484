"""Task heads: KL warm-up, decoder sharing, and build-time errors."""

from __future__ import annotations

import pytest
import torch

import mtcore
from mtcore.errors import IncompatibleComponentsError

# the noise-to-image GAN these tests are about (the default config's GAN is the layout GAN)
NOISE_GAN = ('tasks.gan={head={name="gan", params={latent_dim=32, width=16, d_width=16}}, '
             'loss={name="adversarial"}}')
BASE = ["data.dataset.params.size=16", "data.dataset.params.num_samples=8",
        "model.backbone.params.width=8", "kernels=\"reference\"", NOISE_GAN,
        # the vector-latent VAE these tests are about (the default config's is spatial)
        'tasks.vae.head.params.latent="vector"', 'tasks.vae.loss.params.recon="bernoulli"']


def _vae_only(extra=()):
    return mtcore.build(None, BASE + ["tasks.seg.enabled=false", "tasks.cls.enabled=false",
                                      "tasks.gan.enabled=false", *extra], splits=("train",))


def test_kl_warmup_ramps_the_kl_term_linearly():
    exp = _vae_only(["tasks.vae.head.params.kl_warmup_steps=4"])
    head = exp.model.heads["vae"]
    batch = {"image": exp.datasets["train"].images[:4]}
    exp.model.train()
    torch.manual_seed(0)
    out = exp.model(batch)["vae"]
    full = head.loss_fn(out["recon_logits"], batch["image"], out["mu"], out["logvar"])
    for step, ramp in [(0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0), (9, 1.0)]:
        head.steps.fill_(step)
        expected = full.rec + (full.total - full.rec) * ramp
        assert torch.allclose(head.compute_loss(out, batch), expected), step
    head.steps.zero_()
    head.after_main_step()
    assert int(head.steps) == 1


def test_gan_shares_the_vae_decoder():
    exp = mtcore.build(None, BASE + ["tasks.seg.enabled=false", "tasks.cls.enabled=false",
                                     "tasks.gan.head.params.share_decoder=\"vae\""], splits=("train",))
    gan, vae = exp.model.heads["gan"], exp.model.heads["vae"]
    assert gan.generator is vae.decoder
    ids = [id(p) for p in exp.model.parameters()]
    assert len(ids) == len(set(ids))
    assert not any(id(p) in {id(q) for q in gan.discriminator.parameters()}
                   for p in vae.decoder.parameters())


def test_gan_sharing_with_a_non_vae_task_is_a_build_error():
    with pytest.raises(IncompatibleComponentsError, match="share_decoder='seg' must name a VAE"):
        mtcore.build(None, BASE + ["tasks.gan.head.params.share_decoder=\"seg\""],
                     splits=("train",))


def test_gan_latent_mismatch_with_shared_decoder_is_a_build_error():
    with pytest.raises(IncompatibleComponentsError, match="latent_dim 8 != the shared VAE"):
        mtcore.build(None, BASE + ["tasks.gan.head.params.share_decoder=\"vae\"",
                                   "tasks.gan.head.params.latent_dim=8"], splits=("train",))


def test_generative_heads_need_power_of_two_square_images():
    with pytest.raises(IncompatibleComponentsError, match="square images of 4\\*2\\^k pixels"):
        mtcore.build(None, BASE + ["data.dataset.params.size=24"], splits=("train",))


def test_gan_ema_is_not_trained_by_the_optimizer():
    from mtcore.trainer import Trainer

    exp = mtcore.build(None, BASE + ["tasks.seg.enabled=false", "tasks.cls.enabled=false",
                                     "train.progress=false"], splits=("train",))
    trainer = Trainer(exp, None, progress=False)
    trainer._apply_stage(0)
    gan = exp.model.heads["gan"]
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in gan.ema.parameters())
    assert not any(p.requires_grad for p in gan.ema.parameters())
    assert not any(id(p) in in_opt for p in gan.discriminator.parameters())


def test_the_ema_generator_has_its_own_class_embedding(tmp_path):
    """The EMA generator's layers average weights trained against earlier embeddings, so it
    keeps an EMA of the class embedding too: samples and eval use it, training the live one."""
    exp = mtcore.build(None, BASE + ["tasks.seg.enabled=false", "tasks.cls.enabled=false",
                                     "tasks.vae.enabled=false",
                                     "tasks.gan.head.params.ema_decay=0.75"], splits=("train",))
    gan = exp.model.heads["gan"]
    assert torch.equal(gan.ema_embed.weight, gan.embed.weight)
    assert not gan.ema_embed.weight.requires_grad
    assert not any(p is gan.ema_embed.weight for p in gan.main_parameters())
    before = gan.ema_embed.weight.clone()
    with torch.no_grad():
        gan.embed.weight.add_(1.0)
    gan.after_main_step()
    torch.testing.assert_close(gan.ema_embed.weight, before + 0.25)  # decay 0.75: a quarter
    labels = torch.tensor([0, 1, 2, 1])
    z = torch.randn(4, gan.latent_dim, generator=torch.Generator().manual_seed(3))
    want = torch.sigmoid(gan.ema(z + gan.ema_embed(labels)))
    got = gan.sample(4, labels=labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)
    # a checkpoint from before it existed loads (through mtcore's loader, which compares keys)
    # with the trained embedding in its place
    from mtcore.checkpoint import save_atomic
    from mtcore.trainer import Trainer

    state = Trainer(exp, None, progress=False).state()
    state["model"] = {k: v for k, v in state["model"].items() if "ema_embed" not in k}
    save_atomic(state, tmp_path / "old.pt")
    old = mtcore.load(tmp_path / "old.pt", splits=()).model.heads["gan"]
    assert torch.equal(old.ema_embed.weight, old.embed.weight)
    assert torch.equal(old.embed.weight, gan.embed.weight)


def _cls_only(extra=()):
    return mtcore.build(None, BASE + ["tasks.seg.enabled=false", "tasks.vae.enabled=false",
                                      "tasks.gan.enabled=false", *POOLED, *extra], splits=("train",))


POOLED = ["tasks.cls.head.params.from_task=\"\"", "tasks.cls.head.params.pool=\"avgmax\""]


def test_area_pooling_logits_are_scaled_log_pixel_shares():
    exp = _cls_only(["tasks.cls.head.params.pool=\"area\""])
    head = exp.model.heads["cls"]
    assert head.in_feature == "dec1"  # the finest map; of the two at stride 1, the decoder's
    with torch.no_grad():
        head.log_scale.fill_(torch.log(torch.tensor(2.0)))
    x = torch.randn(2, head.pixel[0][0].in_channels, 4, 4)
    logits = head({"dec1": x}, {})["logits"]
    # by hand: per-pixel softmax over labels + "none", mean over the 16 pixels, 2 * log(share)
    p = torch.softmax(head.pixel(x), dim=1)
    share = torch.stack([p[:, k].sum((1, 2)) / 16 for k in range(head.num_labels)], dim=1)
    assert torch.allclose(logits, 2.0 * torch.log(share + 1e-4), atol=1e-6)
    # confident per-pixel kinds: label 1 on 9 pixels, label 0 on 4, "none" on 3 -> label 1 wins
    kinds = torch.tensor([1] * 9 + [0] * 4 + [head.num_labels] * 3).view(1, 4, 4)

    class Confident(torch.nn.Module):
        def forward(self, _):
            return 50.0 * torch.nn.functional.one_hot(kinds, head.num_labels + 1).permute(
                0, 3, 1, 2).float()

    head.pixel = Confident()
    logits = head({"dec1": x[:1]}, {})["logits"]
    assert logits.argmax(1).item() == 1
    assert torch.allclose(logits[0, :2], 2.0 * torch.log(torch.tensor([4 / 16, 9 / 16]) + 1e-4),
                          atol=1e-4)


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(ValueError, match="pool must be one of .*'none'\\], got 'mean'"):
        _cls_only(["tasks.cls.head.params.pool=\"mean\""])
    with pytest.raises(ValueError, match="pool='none' .* needs from_task"):
        _cls_only(["tasks.cls.head.params.pool=\"none\""])
    with pytest.raises(IncompatibleComponentsError,
                       match="tasks.cls.head.params.from_task='seg' must name an enabled segm"):
        mtcore.build(None, BASE + ["tasks.seg.enabled=false"], splits=("train",))


def test_a_task_optim_table_overrides_the_heads_group():
    from mtcore.trainer import Trainer

    exp = _cls_only(["tasks.cls.optim={lr=0.01, betas=[0.5, 0.9], weight_decay=0.0}",
                     "optim.groups.heads={lr=0.005, weight_decay=0.1}", "train.progress=false"])
    groups = {g["name"]: g for g in Trainer(exp, None, progress=False).optimizer.param_groups}
    assert groups["head.cls"]["lr"] == pytest.approx(0.01)
    assert groups["head.cls"]["betas"] == (0.5, 0.9)
    assert groups["head.cls"]["weight_decay"] == 0.0
    assert groups["backbone"]["lr"] == pytest.approx(exp.config["optim"]["lr"])


def test_pixel_norm_generator_samples_the_same_in_train_and_eval_mode():
    from mtcore_tasks.generators import ImageDecoder, PixelNorm

    torch.manual_seed(0)
    dec = ImageDecoder(8, 3, (16, 16), width=8, norm="pixel")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dec.modules())
    z = torch.randn(5, 8)
    train_out = dec.train()(z)
    assert torch.equal(dec.eval()(z), train_out)  # no batch statistics: the EMA copy is exact
    torch.testing.assert_close(dec(z[:1]), train_out[:1])  # one sample does not need the batch
    x = torch.tensor([[[[3.0]], [[4.0]]]])  # one pixel, features (3, 4): RMS = sqrt(12.5)
    torch.testing.assert_close(PixelNorm()(x), x / 12.5**0.5)


@pytest.mark.parametrize("norm", ["pixel", "batch"])
def test_channels_last_decoder_runs_nhwc_from_its_first_map(norm):
    """In a channels_last model the 4x4 map from the linear layer is made NHWC at once: every
    conv then gets NHWC input (no copy), with the same outputs and gradients as NCHW."""
    from mtcore_tasks.generators import ImageDecoder

    torch.manual_seed(0)
    dec = ImageDecoder(8, 3, (16, 16), width=8, norm=norm).double()
    z = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    want = dec(z)
    (g_want,) = torch.autograd.grad(want.square().sum(), z)
    dec = dec.to(memory_format=torch.channels_last)
    seen = []
    for m in dec.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda _, args: seen.append(
                args[0].is_contiguous(memory_format=torch.channels_last)))
    got = dec(z)
    (g_got,) = torch.autograd.grad(got.square().sum(), z)
    assert seen == [True] * 3
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_gan_own_generator_uses_pixel_norm_and_bad_norm_is_an_error():
    exp = mtcore.build(None, BASE + ["tasks.seg.enabled=false", "tasks.cls.enabled=false",
                                     "tasks.vae.enabled=false"], splits=("train",))
    gan = exp.model.heads["gan"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gan.generator.modules())
    with pytest.raises(ValueError, match="decoder norm must be one of \\['batch', 'pixel'\\]"):
        mtcore.build(None, BASE + ["tasks.gan.head.params.g_norm=\"layer\""], splits=("train",))


def test_cascade_classification_reads_the_segmentation_output():
    exp = mtcore.build(None, BASE + ["tasks.vae.enabled=false", "tasks.gan.enabled=false",
                                     "tasks.cls.head.params.from_task=\"seg\"",
                                     "tasks.cls.head.params.pool=\"avgmax\"",
                                     "tasks.cls.head.params.fixed_map=false"], splits=("train",))
    model = exp.model.eval()
    cls, seg = model.heads["cls"], model.heads["seg"]
    assert cls.reads == ("seg",) and model._order.index("seg") < model._order.index("cls")
    with torch.no_grad():
        cls.seg_area.weight.normal_()
        cls.seg_area.bias.normal_()
        batch = {"image": exp.datasets["train"].images[:3]}
        out = model(batch)
        feats = model.backbone(batch["image"])
        x = feats[cls.in_feature]
        plain = cls.mlp(torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))
        share = torch.softmax(out["seg"]["logits"], 1).mean((2, 3))  # [3, num_seg_classes]
        expected = plain + torch.log(share + 1e-4) @ cls.seg_area.weight.T + cls.seg_area.bias
    assert list(out) == ["seg", "cls"]
    torch.testing.assert_close(out["cls"]["logits"], expected)
    assert seg.num_classes == share.shape[1]


def test_cascade_from_a_non_segmentation_task_is_a_build_error():
    with pytest.raises(IncompatibleComponentsError, match="from_task='vae' must name an enabled segm"):
        mtcore.build(None, BASE + ["tasks.cls.head.params.from_task=\"vae\""], splits=("train",))


def test_run_order_puts_readers_after_what_they_read_and_rejects_cycles():
    from mtcore.model import _run_order

    assert _run_order({"a": ("c",), "b": (), "c": ("b",)}) == ["b", "c", "a"]
    assert _run_order({"x": (), "y": ()}) == ["x", "y"]
    with pytest.raises(IncompatibleComponentsError, match="cycle: a -> b -> a"):
        _run_order({"a": ("b",), "b": ("a",)})
    with pytest.raises(IncompatibleComponentsError, match="task 'a' reads .* 'zz', which does not"):
        _run_order({"a": ("zz",)})


def test_cascade_map_starts_as_the_largest_class_rule_when_labels_are_the_classes():
    exp = mtcore.build(None, BASE + ["tasks.vae.enabled=false", "tasks.gan.enabled=false",
                                     "tasks.cls.head.params.from_task=\"seg\"",
                                     "tasks.cls.head.params.fixed_map=false"], splits=("train",))
    info, lin = exp.info, exp.model.heads["cls"].seg_area
    assert info.seg_class_names[1:] == info.label_names  # shapes: background + the 3 kinds
    expected = torch.zeros(info.num_labels, info.num_seg_classes)
    expected[torch.arange(3), torch.arange(3) + 1] = 1.0
    assert torch.equal(lin.weight, expected) and not lin.bias.any()
    # so seg shares (bg 0.5, circle 0.1, square 0.3, triangle 0.1) give "square" the top logit
    share = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert lin(torch.log(share)).argmax(1).item() == 1


@pytest.mark.parametrize("detach", [False, True])
def test_cascade_gradient_reaches_the_segmentation_head_unless_detached(detach):
    exp = mtcore.build(None, BASE + ["tasks.vae.enabled=false", "tasks.gan.enabled=false",
                                     "tasks.cls.head.params.from_task=\"seg\"",
                                     f"tasks.cls.head.params.detach_from_task={str(detach).lower()}"],
                       splits=("train",))
    model = exp.model.train()
    ds = exp.datasets["train"]
    batch = {"image": ds.images[:4], "label": ds.labels[:4]}
    out = model(batch)
    loss = model.heads["cls"].compute_loss(out["cls"], batch)
    seg_w = model.heads["seg"].classifier.weight
    (g,) = torch.autograd.grad(loss, [seg_w], allow_unused=True, materialize_grads=True)
    assert bool(g.abs().sum() == 0) == detach


def test_fixed_map_cascade_is_the_largest_class_rule_with_a_learnt_temperature():
    exp = mtcore.build(None, BASE + ["tasks.vae.enabled=false", "tasks.gan.enabled=false",
                                     "tasks.cls.head.params.from_task=\"seg\"",
                                     "tasks.cls.head.params.pool=\"none\"",
                                     "tasks.cls.head.params.fixed_map=true"], splits=("train",))
    cls = exp.model.heads["cls"]
    trainable = [n for n, p in cls.named_parameters()]
    assert trainable == ["rule_log_scale"]  # the rule itself is a buffer: no optimizer moves it
    with torch.no_grad():
        cls.rule_log_scale.fill_(torch.log(torch.tensor(3.0)))
    seg = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]])).view(1, 4, 1, 1)  # one-pixel "image"
    logits = cls({}, {}, {"seg": {"logits": seg}})["logits"]
    expected = 3.0 * torch.log(torch.tensor([[0.1, 0.3, 0.1]]) + 1e-4)  # the 3 kinds' shares
    torch.testing.assert_close(logits, expected)
    # labels that are not the segmentation classes after background: no rule to fix
    from mtcore.plugin import DatasetInfo, FeatureInfo
    from mtcore_tasks.heads import ClassificationHead

    info = DatasetInfo(name="x", channels=3, image_size=(8, 8), num_seg_classes=3, num_labels=2,
                       seg_class_names=("bg", "a", "b"), label_names=("b", "a"))
    with pytest.raises(IncompatibleComponentsError, match="fixed_map needs labels that are"):
        ClassificationHead([FeatureInfo("f", 4, 1)], info, from_task="seg", fixed_map=True,
                           pool="none")


def _gan_only(extra):
    return mtcore.build(None, BASE + ["tasks.seg.enabled=false", "tasks.cls.enabled=false",
                                      "tasks.vae.enabled=false", *extra], splits=("train",))


def test_ac_gan_terms_are_cross_entropies_of_the_discriminator_classifier():
    """ac_weight adds CE(D's class logits on reals, labels) to the D loss and
    CE(D's class logits on fakes, their labels) to the generator loss, each times ac_weight."""
    import torch.nn.functional as F

    exp = _gan_only(["tasks.gan.head.params.ac_weight=0.5"])
    head = exp.model.heads["gan"].train()
    d = head.discriminator
    ds = exp.datasets["train"]
    batch = {"image": ds.images[:8], "label": ds.labels[:8]}
    torch.manual_seed(0)
    aux = head.auxiliary_loss(batch, step=1)  # step 1: no R1 (r1_every > 1)
    _, classes = d(batch["image"], batch["label"], return_classes=True)
    expected_ac = F.cross_entropy(classes, batch["label"])
    torch.testing.assert_close(aux["d_ac"], expected_ac)
    torch.testing.assert_close(aux["loss"], aux["d_loss"] + 0.5 * expected_ac)
    out = head({}, batch)
    g_plain = head.loss_fn.g_loss(out["fake_logits"])
    expected_g = g_plain + 0.5 * F.cross_entropy(out["fake_classes"], batch["label"])
    torch.testing.assert_close(head.compute_loss(out, batch), expected_g)


def test_ac_gan_off_by_default_and_bad_weight_is_an_error():
    head = _gan_only([]).model.heads["gan"]
    assert head.discriminator.classes is None
    with pytest.raises(RuntimeError, match="return_classes needs class_head"):
        head.discriminator(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long),
                           return_classes=True)
    with pytest.raises(ValueError, match="ac_weight must be >= 0"):
        _gan_only(["tasks.gan.head.params.ac_weight=-1.0"])


def test_a_segmentation_loss_must_ignore_what_the_dataset_marks_unlabelled():
    """shapes marks nothing but 255 as unlabelled; a loss ignoring 0 would train on pixels the
    metrics leave out (or the other way round)."""
    base = ["data.dataset.params.size=16", "data.dataset.params.num_samples=8"]
    with pytest.raises(IncompatibleComponentsError, match=r"the loss ignores mask value 0 but the "
                                                          r"dataset marks unlabelled pixels 255; "
                                                          r"set the loss's params.ignore_index = 255"):
        mtcore.build(None, [*base, 'tasks.seg.loss={name = "focal", params = {ignore_index = 0}}'],
                     splits=())
    exp = mtcore.build(None, [*base, 'tasks.seg.loss={name = "dice"}'], splits=())
    assert exp.model.heads["seg"].loss_fn.ignore_index == 255
