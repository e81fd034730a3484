"""Task heads: KL warm-up, decoder sharing, and build-time errors."""

from __future__ import annotations

import pytest
import torch

import mtcore
from mtcore.errors import IncompatibleComponentsError

BASE = ["data.dataset.params.size=16", "data.dataset.params.num_samples=8",
        "model.backbone.params.width=8", "kernels=\"reference\""]


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
