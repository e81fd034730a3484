"""The layout GAN sharing the segmenter: who gets which gradient, batch-norm statistics, the
class-balanced loss by hand, the layout bank, sampling by label, wiring errors, learning."""

import pytest
import torch
import torch.nn.functional as F

import mtcore
from mtcore.errors import ConfigError, IncompatibleComponentsError
from mtcore_tasks.layout_gan import LayoutGANHead, class_balanced_ce

BASE = ["data.dataset.params.size=16", "data.dataset.params.num_samples=16",
        "model.backbone.params.width=8", 'kernels="reference"', "tasks.vae.enabled=false",
        "tasks.cls.enabled=false", "tasks.gan.enabled=false",
        'tasks.scene={head={name="layout_gan", params={seg_task="seg", latent_dim=4, '
        'width=8, hidden=8, d_width=8, bank_size=4, seg_on_fakes=0.5}}}']


def _build(extra=()):
    return mtcore.build(None, BASE + list(extra), splits=("train",))


def _batch(exp, n=8):
    ds = exp.datasets["train"]
    return {k: torch.stack([ds[i][k] for i in range(n)]) for k in ds[0]}


def _touched(params):
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def test_class_balanced_ce_by_hand():
    # a 1x1x4 target: class 0 three times, class 2 once (class 1 absent)
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, -1.0],
                           [-2.0, 0.5, 1.5]]).T.reshape(1, 3, 1, 4)
    target = torch.tensor([0, 0, 0, 2]).reshape(1, 1, 4)
    ce = [-(torch.log_softmax(logits[0, :, 0, j], 0)[target[0, 0, j]]) for j in range(4)]
    # weights numel / (present classes * count): class 0 -> 4 / (2 * 3), class 2 -> 4 / (2 * 1)
    want = (sum(ce[:3]) * (4 / 6) + ce[3] * 2.0) / 4
    torch.testing.assert_close(class_balanced_ce(logits, target), want)


def test_each_term_trains_only_its_own_side():
    torch.manual_seed(0)
    exp = _build()
    model, head = exp.model, exp.model.heads["scene"]
    model.train()
    batch = _batch(exp)
    terms = head.loss_terms(model(batch)["scene"], batch)
    shared = list(model.backbone.parameters()) + list(model.heads["seg"].parameters())
    gen = list(head.generator.parameters())

    terms["seg"].backward(retain_graph=True)  # the segmenter judges: the generator learns
    assert all(_touched(gen)[:2]) and not any(_touched(shared))
    model.zero_grad(set_to_none=True)
    terms["seg_on_fakes"].backward(retain_graph=True)  # generated pairs: the segmenter learns
    assert not any(_touched(gen)) and any(_touched(list(model.backbone.parameters())))
    assert any(_touched(list(model.heads["seg"].parameters())))
    model.zero_grad(set_to_none=True)
    terms["adv"].backward()  # the discriminator's verdict: the generator (D is frozen by the
    assert all(_touched(gen)[:2]) and not any(_touched(shared))  # trainer in the main step)


def test_judging_generated_images_leaves_batch_norm_statistics_alone():
    exp = _build()
    model, head = exp.model, exp.model.heads["scene"]
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert before
    fakes = torch.rand(4, 3, 16, 16, requires_grad=True)
    head.segment(fakes, frozen=True).sum().backward()
    head.segment(fakes, frozen=False).sum().backward()
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k]), k
    model(_batch(exp))  # a real training pass does move them (the check above can fail)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("train", [True, False])
def test_the_frozen_judge_computes_what_the_segmenter_does(train):
    exp = _build()
    head = exp.model.heads["scene"]
    exp.model.train(train)
    x = torch.rand(3, 3, 16, 16)
    got = head.segment(x, frozen=True)
    torch.testing.assert_close(got, exp.model({"image": x})["seg"]["logits"])


def test_the_bank_keeps_each_labels_first_layouts_and_sampling_follows_the_label():
    exp = _build()
    head, ds = exp.model.heads["scene"], exp.datasets["train"]
    masks, labels = ds.masks.long(), ds.labels
    head._remember(masks, labels)
    for k in range(3):
        mine = masks[labels == k][:4]
        assert int(head.bank_count[k]) == len(mine)
        assert torch.equal(head.bank[k, :len(mine)].long(), mine)
    present = [k for k in range(3) if int(head.bank_count[k])]
    want = torch.tensor([present[i % len(present)] for i in range(12)])
    got = head.layouts(12, want, generator=torch.Generator().manual_seed(0))
    # shapes' label rule, from the mask alone: the kind with the most pixels
    pixels = F.one_hot(got.flatten(1), 4).sum(1)[:, 1:]
    assert torch.equal(pixels.argmax(1), want)
    images = head.sample(12, want, generator=torch.Generator().manual_seed(0))
    assert images.shape == (12, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_sampling_before_any_layout_is_a_clear_error():
    head = _build().model.heads["scene"]
    with pytest.raises(RuntimeError, match="no layouts yet"):
        head.sample(2, torch.tensor([0, 1]))


def test_the_bank_travels_in_the_state_dict():
    exp = _build()
    head, ds = exp.model.heads["scene"], exp.datasets["train"]
    head._remember(ds.masks.long(), ds.labels)
    other = _build().model.heads["scene"]
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.bank, head.bank) and torch.equal(other.bank_count, head.bank_count)


def test_wiring_errors_name_the_problem():
    with pytest.raises((IncompatibleComponentsError, ConfigError), match="seg_task='nope'"):
        _build(['tasks.scene.head.params.seg_task="nope"'])
    with pytest.raises((IncompatibleComponentsError, ConfigError), match="must name a segmentation"):
        _build(['tasks.scene.head.params.seg_task="cls"', "tasks.cls.enabled=true"])
    with pytest.raises((ValueError, ConfigError), match="bank_size"):
        _build(["tasks.scene.head.params.bank_size=0"])
    with pytest.raises((ValueError, ConfigError), match="seg_weight"):
        _build(["tasks.scene.head.params.seg_weight=-1.0"])


def test_a_layout_gan_head_needs_masks():
    from mtcore.plugin import DatasetInfo
    info = DatasetInfo(name="labels-only", channels=3, image_size=(16, 16), num_labels=2)
    with pytest.raises(IncompatibleComponentsError, match="no masks"):
        LayoutGANHead([], info)


def test_the_generator_learns_to_draw_what_the_segmenter_recognises():
    """Against a fixed segmenter, a few dozen generator steps on the judge's term alone raise
    the share of generated shape pixels segmented as their layout well above the start."""
    torch.manual_seed(0)
    exp = _build(["data.dataset.params.num_samples=32"])
    model, head = exp.model, exp.model.heads["scene"]
    batch = _batch(exp, 16)
    seg_opt = torch.optim.Adam(list(model.backbone.parameters())
                               + list(model.heads["seg"].parameters()), 1e-2)
    for _ in range(40):  # a segmenter that knows the classes a little
        model.train()
        loss = model.heads["seg"].compute_loss(model(batch, ["seg"])["seg"], batch)
        seg_opt.zero_grad()
        loss.backward()
        seg_opt.step()

    def judged_acc():
        with torch.no_grad():
            fake = head.generate(batch["mask"], z=torch.zeros(16, head.generator.noise_dim), ema=False)
            right = head.segment(fake, frozen=True).argmax(1) == batch["mask"]
            return float(right[batch["mask"] > 0].float().mean())  # the shapes' pixels

    start = judged_acc()
    g_opt = torch.optim.Adam(head.generator.parameters(), 1e-2)
    for _ in range(40):
        fake = head.generate(batch["mask"], ema=False)
        loss = class_balanced_ce(head.segment(fake, frozen=True), batch["mask"])
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
    assert judged_acc() > start + 0.2
