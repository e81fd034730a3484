"""A layout-to-image GAN that shares the segmenter: the generation path of the shared backbone.

The generator draws an image for a semantic layout (a segmentation mask) and noise through SPADE
blocks (Park et al. 2019, "Semantic Image Synthesis with Spatially-Adaptive Normalization"), with
the noise fed to every block beside the layout (OASIS's 3D noise, Schönfeld et al. 2021). Three
signals train it, two of them through the multi-task model's own segmenter (the shared backbone
and the segmentation task's head):

- a discriminator of its own, judging (image, layout) pairs (pix2pix-style input concatenation,
  trained by its own optimizer in the auxiliary steps, R1-regularised);
- the **segmenter as a judge**: the generated image, run through the shared backbone and the
  segmentation head with their parameters detached (no batch-norm statistic recorded), must be
  segmented as its layout (``seg_weight``): the generator learns to draw what the segmenter
  recognises (OASIS's idea, with the segmenter kept a pure judge);
- and back: **generated pairs as extra segmentation data** (``seg_on_fakes``): the segmenter
  trains on the detached generated images labelled with their layouts, so the generator's
  colours and textures reach the shared backbone (``L = l1 L_gen + l2 L_seg`` share theta_s).

Sampling draws layouts of the requested label from a bank of training layouts the head keeps (in
its state, so checkpoints carry it) and new noise: the geometry of a sample is a real layout;
its colours, textures and background are generated.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtcore.plugin import DatasetInfo, FeatureInfo, IncompatibleComponentsError, TaskHead

from .generators import Discriminator, ema_update, num_upsamples
from .heads import _generation_metrics
from .losses import AdversarialLoss, lazy_r1


class SPADE(nn.Module):
    """Spatially-adaptive normalisation (Park et al. 2019): instance-normalised activations,
    scaled and shifted per pixel by convolutions of the conditioning map (layout + noise)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond = F.interpolate(cond, size=x.shape[-2:], mode="nearest")
        h = self.shared(cond)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class LayoutGenerator(nn.Module):
    """``(layout one-hot [N, S, H, W], z [N, noise_dim]) -> image logits [N, C, H, W]``.

    ``z`` holds a global code (``latent_dim``, broadcast over the image: OASIS's 3D noise) and
    one code per layout class (``region_dim`` each, painted over that class's pixels), so every
    region draws its own colour and texture and stays uniform inside. The conditioning map
    (layout, global code, region codes) drives a SPADE block at every resolution; the content
    starts from the global code at 4x4 and doubles per stage (upsample, conv, SPADE, leaky ReLU)."""

    def __init__(self, num_classes: int, latent_dim: int, out_channels: int,
                 size: tuple[int, int], width: int = 16, hidden: int = 32,
                 region_dim: int = 8, coords: bool = False) -> None:
        super().__init__()
        k = num_upsamples(size)
        self.coords = coords
        cond = num_classes + latent_dim + region_dim + (2 if coords else 0)
        c = width * 2 ** min(k, 2)
        self.fc = nn.Linear(latent_dim, c * 16)
        self.c0 = c
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(k):
            nxt = max(width, c // 2) if i >= k - 2 else c
            self.convs.append(nn.Conv2d(c, nxt, 3, padding=1))
            self.norms.append(SPADE(nxt, cond, hidden))
            c = nxt
        self.out = nn.Conv2d(c, out_channels, 3, padding=1)
        self.latent_dim, self.region_dim, self.num_classes = latent_dim, region_dim, num_classes
        self.noise_dim = latent_dim + num_classes * region_dim

    def forward(self, layout: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n, s, h, w = layout.shape
        if z.shape != (n, self.noise_dim):
            raise ValueError(f"layout generator: z must be [{n}, {self.noise_dim}] (global "
                             f"{self.latent_dim} + {s} classes x {self.region_dim}), got "
                             f"{tuple(z.shape)}")
        zg, zr = z[:, : self.latent_dim], z[:, self.latent_dim :].view(n, s, self.region_dim)
        regions = torch.einsum("nshw,nsr->nrhw", layout, zr)
        parts = [layout, zg.view(n, -1, 1, 1).expand(-1, -1, h, w), regions]
        if self.coords:  # where each pixel is: position-dependent patterns (stripes) come easy
            ys = torch.linspace(-1, 1, h, device=z.device, dtype=z.dtype).view(1, 1, h, 1)
            xs = torch.linspace(-1, 1, w, device=z.device, dtype=z.dtype).view(1, 1, 1, w)
            parts += [ys.expand(n, 1, h, w), xs.expand(n, 1, h, w)]
        cond = torch.cat(parts, dim=1)
        x = F.leaky_relu(self.fc(zg).view(n, self.c0, 4, 4), 0.2)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = F.leaky_relu(norm(conv(x), cond), 0.2)
        return self.out(x)


@contextlib.contextmanager
def untracked_norm_stats(*modules: nn.Module) -> Iterator[None]:
    """Batch-norm layers of ``modules`` normalise as they are (training: with the batch's own
    statistics) but record no running statistics for the block: generated images pass through
    the shared layers without moving what evaluation uses. Nothing is written in place (a
    restore-by-copy would bump the version of tensors the real batch's backward still needs), and
    the judgement does not depend on running statistics that the step's own real batch moved (a
    replayed step, FAMO's recompute, sees the same)."""
    norms = [m for mod in modules for m in mod.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _frozen_call(module: nn.Module, *args):
    """``module(*args)`` with its parameters detached: gradients reach the inputs only."""
    params = {k: p.detach() for k, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args, strict=False)


def class_balanced_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy whose pixels are weighted by the inverse frequency of their class in the batch
    (OASIS): every class present counts equally, so small shapes are not drowned by background."""
    num = logits.shape[1]
    counts = torch.bincount(target.flatten(), minlength=num).float()
    present = (counts > 0).sum().clamp_min(1)
    coef = target.numel() / (present * counts.clamp_min(1))
    per_pixel = F.cross_entropy(logits.float(), target, reduction="none")
    return (per_pixel * coef[target]).mean()


def _check_number(name: str, value, low: float, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) \
            or value < low:
        what = "an int" if integer else "a number"
        raise ValueError(f"layout_gan head: {name} must be {what} >= {low}, got {value!r}")


class LayoutGANHead(TaskHead):
    """A layout-conditioned generator trained against its own (image, layout) discriminator and
    judged by the shared segmenter (see the module docstring).

    ``seg_task``: the segmentation task whose head (on the shared backbone) judges the fakes and
    learns from them ("": none, the discriminator alone: a single-task baseline). ``seg_weight``: the generator's segmentation term; ``seg_on_fakes``: the
    weight of the segmenter's loss on generated pairs (0: the segmenter only judges). Each step
    draws an image for every ``fake_every``-th mask of the batch (1: all; 2 halves the cost,
    and micro-batches or processes of even size draw for the same masks as the whole batch).
    ``bank_size`` training layouts per label are kept for sampling; ``ema_decay`` is the
    sampling generator's weight EMA; ``d_width``, ``r1_gamma``, ``r1_every``, ``d_steps`` and
    ``augment`` are the discriminator's as in the ``gan`` head."""

    task_type = "gan"  # an adversarial generator: the ``adversarial`` losses fit it
    targets = ("mask",)

    def __init__(self, features: Sequence[FeatureInfo], info: DatasetInfo,
                 loss: nn.Module | None = None, seg_task: str = "seg", latent_dim: int = 32,
                 width: int = 16, hidden: int = 32, region_dim: int = 8, coords: bool = False,
                 d_width: int = 16,
                 seg_weight: float = 1.0,
                 seg_on_fakes: float = 0.0, fake_every: int = 1, bank_size: int = 64,
                 ema_decay: float = 0.99, d_steps: int = 1, r1_gamma: float = 1.0,
                 r1_every: int = 8, mbstd_group: int = 4, augment: Sequence[str] = ()) -> None:
        super().__init__()
        if not info.has_masks:
            raise IncompatibleComponentsError(
                f"layout_gan head: dataset {info.name!r} has no masks; the generator draws "
                "images for segmentation layouts. Without masks use the noise-to-image GAN: "
                "--set 'tasks.gan.head={name = \"gan\"}'")
        if not isinstance(seg_task, str):
            raise ValueError(f"layout_gan head: seg_task must be a task name or \"\", got "
                             f"{seg_task!r}")
        for name, value, low in (("latent_dim", latent_dim, 1), ("width", width, 1),
                                 ("hidden", hidden, 1), ("region_dim", region_dim, 0),
                                 ("d_width", d_width, 1),
                                 ("bank_size", bank_size, 1), ("fake_every", fake_every, 1),
                                 ("d_steps", d_steps, 1), ("r1_every", r1_every, 1),
                                 ("mbstd_group", mbstd_group, 1)):
            _check_number(name, value, low, integer=True)
        for name, value in (("seg_weight", seg_weight), ("seg_on_fakes", seg_on_fakes),
                            ("r1_gamma", r1_gamma)):
            _check_number(name, value, 0.0)
        if not (isinstance(ema_decay, int | float) and 0 <= ema_decay < 1):
            raise ValueError(f"layout_gan head: ema_decay must be in [0, 1), got {ema_decay!r}")
        self.info, self.seg_task, self.latent_dim = info, seg_task, latent_dim
        self.num_classes = info.num_seg_classes
        self.seg_weight, self.seg_on_fakes = float(seg_weight), float(seg_on_fakes)
        self.fake_every, self.ema_decay = fake_every, float(ema_decay)
        self.d_steps, self.r1_gamma, self.r1_every = d_steps, float(r1_gamma), r1_every
        self.conditional = info.has_labels
        self.loss_fn = loss if loss is not None else AdversarialLoss()
        if not hasattr(self.loss_fn, "d_loss"):
            raise IncompatibleComponentsError("layout_gan head: its loss needs d_loss/g_loss "
                                              "methods (an adversarial loss)")
        self.generator = LayoutGenerator(self.num_classes, latent_dim, info.channels,
                                         info.image_size, width, hidden, region_dim,
                                         bool(coords))
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        # judges (image, layout) pairs: the layout's one-hot channels beside the image's
        self.discriminator = Discriminator(info.channels + self.num_classes, info.image_size,
                                           d_width, 0, mbstd_group, augment)
        h, w = info.image_size
        groups = max(info.num_labels, 1)
        self.register_buffer("bank", torch.zeros(groups, bank_size, h, w, dtype=torch.uint8))
        self.register_buffer("bank_count", torch.zeros(groups, dtype=torch.long))
        self._backbone: list[nn.Module] = []  # the model's, held without registering them
        self._seg: list[TaskHead] = []

    # -- wiring -------------------------------------------------------------------------------
    def link(self, heads: Mapping[str, TaskHead]) -> None:
        if not self.seg_task:  # no segmenter to judge: its own discriminator only
            return
        seg = heads.get(self.seg_task)
        if seg is None or seg.task_type != "segmentation":
            raise IncompatibleComponentsError(
                f"layout_gan head: seg_task={self.seg_task!r} must name a segmentation task "
                f"(or be \"\" for none: no segmenter judges the images); tasks: "
                f"{', '.join(heads)}")
        if getattr(seg, "num_classes", None) != self.num_classes:
            raise IncompatibleComponentsError(
                f"layout_gan head: segmentation task {self.seg_task!r} predicts "
                f"{getattr(seg, 'num_classes', '?')} classes, the dataset has {self.num_classes}")
        self._seg = [seg]

    def link_backbone(self, backbone: nn.Module) -> None:
        self._backbone = [backbone]

    def auxiliary_parameters(self):
        return {"discriminator": list(self.discriminator.parameters())}

    @property
    def auxiliary_steps(self):
        return self.d_steps

    def main_parameters(self):
        skip = {id(p) for p in self.discriminator.parameters()}
        skip |= {id(p) for p in self.ema.parameters()}
        return (p for p in self.parameters() if id(p) not in skip)

    # -- the judges ---------------------------------------------------------------------------
    def segment(self, images: torch.Tensor, frozen: bool) -> torch.Tensor:
        """The shared segmenter's logits [N, S, H, W] for ``images``, in the model's mode but
        recording no batch-norm statistics; ``frozen``: its parameters detached, so gradients
        reach the images only."""
        if not self._backbone or not self._seg:
            raise RuntimeError("layout_gan head: not linked to a model's backbone and "
                               "segmentation head (build it with mtcore.build)")
        backbone, seg = self._backbone[0], self._seg[0]
        call = _frozen_call if frozen else (lambda m, *a: m(*a))
        with untracked_norm_stats(backbone, seg):
            feats = call(backbone, images)
            return call(seg, feats, {"image": images})["logits"]

    def _judge(self, images: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        return self.discriminator(torch.cat([images, layout], dim=1))

    # -- generation ---------------------------------------------------------------------------
    def _one_hot(self, masks: torch.Tensor) -> torch.Tensor:
        m = masks.long().clamp(0, self.num_classes - 1)  # unlabelled pixels drawn as background
        return F.one_hot(m, self.num_classes).permute(0, 3, 1, 2).float()

    def _layout_target(self, masks: torch.Tensor) -> torch.Tensor:
        return masks.long().clamp(0, self.num_classes - 1)

    def generate(self, masks: torch.Tensor, z: torch.Tensor | None = None, ema: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] for layouts ``masks`` [N, H, W] (class indices) and noise ``z``."""
        net = self.ema if ema else self.generator
        dev = next(net.parameters()).device
        if z is None:
            z = torch.randn(masks.shape[0], net.noise_dim, generator=generator).to(dev)
        layout = self._one_hot(masks.to(dev))
        if next(net.parameters()).is_contiguous(memory_format=torch.channels_last):
            layout = layout.contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(net(layout, z))

    @torch.no_grad()
    def _remember(self, masks: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Keep the first ``bank_size`` training layouts of each label for sampling."""
        groups = labels if labels is not None and self.info.has_labels else None
        size = self.bank.shape[1]
        for i in range(masks.shape[0]):
            g = int(groups[i]) if groups is not None else 0
            k = int(self.bank_count[g])
            if k < size:
                self.bank[g, k] = masks[i].clamp(0, 255).to(torch.uint8)
                self.bank_count[g] += 1

    @torch.no_grad()
    def layouts(self, n: int, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training layouts [n, H, W] (of ``labels`` when given) drawn from the bank."""
        if int(self.bank_count.sum()) == 0:
            raise RuntimeError("layout_gan head: no layouts yet (the bank fills in training)")
        groups = (labels.long().cpu() if labels is not None and self.info.has_labels
                  else torch.zeros(n, dtype=torch.long))
        out = torch.zeros(n, *self.bank.shape[2:], dtype=torch.long)
        counts = self.bank_count.cpu()
        for g in groups.unique().tolist():
            sel = (groups == g).nonzero().flatten()
            have = int(counts[g])
            if have == 0:
                name = self.info.label_names[g] if self.info.label_names else g
                raise ValueError(f"layout_gan head: no training layout of label {name!r} seen")
            pick = torch.randint(0, have, (sel.numel(),), generator=generator)
            out[sel] = self.bank[g].cpu()[pick].long()
        return out

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None):
        if labels is None and self.info.has_labels:
            nonempty = (self.bank_count > 0).nonzero().flatten().cpu()
            labels = nonempty[torch.randint(0, nonempty.numel(), (n,), generator=generator)]
        masks = self.layouts(n, labels, generator)
        return self.generate(masks, generator=generator)

    # -- training -----------------------------------------------------------------------------
    def _step_masks(self, batch) -> torch.Tensor:
        return batch["mask"][:: self.fake_every]

    def forward(self, features, batch):
        if "mask" not in batch:  # inference on images alone: nothing to draw from
            return {}
        if self.training:
            self._remember(batch["mask"], batch.get("label"))
        masks = self._step_masks(batch) if self.training else batch["mask"]
        fake = self.generate(masks, ema=not self.training)
        layout = self._one_hot(masks).to(fake.dtype)
        out = {"fake": fake, "layout": masks, "fake_logits": self._judge(fake, layout)}
        if self.training and self.seg_weight > 0 and self._seg:
            out["judged"] = self.segment(fake, frozen=True)
        if self.training and self.seg_on_fakes > 0 and self._seg:
            out["learned"] = self.segment(fake.detach(), frozen=False)
        return out

    def loss_terms(self, outputs, batch) -> dict[str, torch.Tensor]:
        """``adv``: the generator's adversarial loss; ``seg``: the frozen segmenter's
        class-balanced cross entropy of the fakes against their layouts (the generator's
        gradient only); ``seg_on_fakes``: the segmenter's cross entropy on the detached fakes
        (its own gradient only)."""
        if "fake_logits" not in outputs:
            return {}
        target = self._layout_target(outputs["layout"])
        terms = {"adv": self.loss_fn.g_loss(outputs["fake_logits"].float())}
        if "judged" in outputs:
            terms["seg"] = class_balanced_ce(outputs["judged"], target)
        if "learned" in outputs:
            terms["seg_on_fakes"] = F.cross_entropy(outputs["learned"].float(), target)
        return terms

    def compute_loss(self, outputs, batch):
        t = self.loss_terms(outputs, batch)
        if not t:
            raise ValueError("layout_gan head: the batch has no 'mask' to draw layouts from")
        loss = t["adv"]
        if "seg" in t:
            loss = loss + self.seg_weight * t["seg"]
        if "seg_on_fakes" in t:
            loss = loss + self.seg_on_fakes * t["seg_on_fakes"]
        return loss

    def auxiliary_loss(self, batch, step):
        masks = self._step_masks(batch)
        real = batch["image"][:: self.fake_every]
        layout = self._one_hot(masks).to(real.dtype)
        with torch.no_grad():
            fake = self.generate(masks, ema=False)
        d_loss = self.loss_fn.d_loss(self._judge(real, layout).float(),
                                     self._judge(fake, layout).float())
        out = {"d_loss": d_loss}
        loss = d_loss
        r1 = lazy_r1(lambda x: self._judge(x, layout), real, self.r1_gamma, self.r1_every, step)
        if r1 is not None:
            out["r1"] = r1
            loss = loss + r1 * self.r1_every
        out["loss"] = loss
        return out

    def after_main_step(self):
        ema_update(self.ema, self.generator, self.ema_decay)

    def new_metric(self):
        return _LayoutMetric(self)

    def generation_metrics(self, datasets, split, num_samples, seed, final=True):
        with self._layouts_from(datasets.get("train", datasets[split])):
            return _generation_metrics(self, datasets, split, num_samples, seed,
                                       conditional=self.conditional, final=final)

    @contextlib.contextmanager
    def _layouts_from(self, dataset) -> Iterator[None]:
        """Before training has filled the bank (the untrained generator's metrics), sample from
        ``dataset``'s first layouts of each label for the block; the bank itself stays empty."""
        if int(self.bank_count.sum()) or dataset is None:
            yield
            return
        bank, count = self.bank.clone(), self.bank_count.clone()
        size = self.bank.shape[1]
        for i in range(len(dataset)):
            if int(self.bank_count.min()) >= size:
                break
            item = dataset[i]
            label = item.get("label") if self.info.has_labels else None
            self._remember(item["mask"][None], None if label is None else label.view(1))
        try:
            yield
        finally:
            with torch.no_grad():
                self.bank.copy_(bank)
                self.bank_count.copy_(count)

    def visuals(self, outputs, batch):
        return {"from input masks": outputs["fake"]} if "fake" in outputs else {}

    def describe(self):
        return {"task_type": self.task_type, "seg_task": self.seg_task,
                "latent_dim": self.latent_dim, "seg_weight": self.seg_weight,
                "seg_on_fakes": self.seg_on_fakes}


class _LayoutMetric:
    """How the segmenter reads the EMA generator's images of the evaluation layouts:
    ``fake_seg_acc``, the share of their pixels it labels with the layout's class (high: the
    generator draws what the segmenter recognises), and the generator's adversarial loss."""

    def __init__(self, head: LayoutGANHead) -> None:
        self.head, self.right, self.total, self.g_sum, self.n = head, 0, 0, 0.0, 0

    @torch.no_grad()
    def update(self, outputs, batch) -> None:
        if "fake" not in outputs:
            return
        head = self.head
        if head._seg:
            pred = head.segment(outputs["fake"], frozen=False).argmax(1)
            target = head._layout_target(outputs["layout"])
            self.right += int((pred == target).sum())
            self.total += target.numel()
        k = outputs["fake_logits"].shape[0]
        self.g_sum += float(head.loss_fn.g_loss(outputs["fake_logits"].float())) * k
        self.n += k

    def compute(self) -> dict[str, float]:
        out = {"g_loss": self.g_sum / max(self.n, 1)}
        if self.total:
            out["fake_seg_acc"] = self.right / self.total
        return out
