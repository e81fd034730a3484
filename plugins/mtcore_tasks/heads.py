"""The first-party task heads: segmentation, classification, VAE and GAN."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtcore import kernels
from mtcore.plugin import (
    DatasetInfo,
    FeatureInfo,
    IncompatibleComponentsError,
    Prediction,
    TaskHead,
    class_colours,
)

from . import metrics as M
from .generators import Discriminator, ImageDecoder, ema_update, frozen_norm_stats
from .losses import AdversarialLoss, ClsCrossEntropy, SegCrossEntropy, VAELoss, lazy_r1
from .vae_nets import SpatialDecoder, SpatialEncoder

Batch = Mapping[str, torch.Tensor]

PALETTE = class_colours(256).float() / 255  # the colours of `mtcore predict`'s mask PNGs


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU, the last two fused (:class:`mtcore.kernels.FusedSequential`)."""
    return kernels.FusedSequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _pick(features: Sequence[FeatureInfo], name: str | None, what: str) -> FeatureInfo:
    if name is None:
        return features[-1]
    for f in features:
        if f.name == name:
            return f
    raise IncompatibleComponentsError(
        f"{what}: in_feature {name!r} is not a backbone feature map; the backbone returns "
        + ", ".join(f"{f.name} (C={f.channels}, stride={f.stride})" for f in features))


def _deepest(features: Sequence[FeatureInfo]) -> FeatureInfo:
    return max(features, key=lambda f: (f.stride, f.channels))


class _MetricAdapter:
    """Turns a head's outputs + batch into the arguments of a metric accumulator."""

    def __init__(self, metric: Any, update: Callable[[Any, Any, Any], None]) -> None:
        self.metric, self._update = metric, update

    def update(self, outputs, batch) -> None:
        self._update(self.metric, outputs, batch)

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metric.compute().items()
                if isinstance(v, int | float) or (torch.is_tensor(v) and v.numel() == 1)}


def _need(info: DatasetInfo, flag: bool, what: str) -> None:
    if not flag:
        raise IncompatibleComponentsError(f"dataset {info.name!r} has no {what}")


class SegmentationHead(TaskHead):
    """Per-pixel class logits from a top-down decoder (FPN-like, Lin et al. 2017): it starts at the
    coarsest map and merges every finer one (``in_features``, default: all the backbone returns),
    so the prediction sees global context and full resolution."""

    task_type = "segmentation"
    targets = ("mask",)
    primary_metric = ("miou", True)

    def __init__(self, features: Sequence[FeatureInfo], info: DatasetInfo,
                 loss: nn.Module | None = None, hidden: int = 32,
                 in_features: Sequence[str] | None = None) -> None:
        super().__init__()
        _need(info, info.has_masks, "masks (num_seg_classes = 0): segmentation needs them")
        self.num_classes, self.ignore_index = info.num_seg_classes, info.ignore_index
        self.class_names = tuple(info.seg_class_names)
        self.loss_fn = loss if loss is not None else SegCrossEntropy(ignore_index=info.ignore_index)
        own = getattr(self.loss_fn, "ignore_index", info.ignore_index)
        if own != info.ignore_index:  # the loss would train on pixels the metrics leave out
            raise IncompatibleComponentsError(
                f"segmentation head: the loss ignores mask value {own} but the dataset marks "
                f"unlabelled pixels {info.ignore_index}; set the loss's params.ignore_index = "
                f"{info.ignore_index}")
        if in_features is None:
            in_features = [f.name for f in features]
        chosen = [_pick(features, n, "segmentation head") for n in in_features]
        chosen.sort(key=lambda f: -f.stride)
        self.names = [f.name for f in chosen]
        self.final_stride = chosen[-1].stride
        self.lateral = nn.ModuleList(nn.Conv2d(f.channels, hidden, 1) for f in chosen)
        self.merge = nn.ModuleList(conv_block(hidden, hidden) for _ in chosen)
        self.classifier = nn.Conv2d(hidden, self.num_classes, 1)

    def forward(self, features, batch):
        x = None
        for name, lat, merge in zip(self.names, self.lateral, self.merge, strict=True):
            f = lat(features[name])
            if x is not None and x.shape[-2:] != f.shape[-2:]:
                x = F.interpolate(x, size=f.shape[-2:], mode="nearest")
            x = f if x is None else f + x
            x = merge(x)
        logits = self.classifier(x)
        if self.final_stride != 1:
            logits = F.interpolate(logits, size=batch["image"].shape[-2:], mode="bilinear",
                                   align_corners=False)
        return {"logits": logits}

    def compute_loss(self, outputs, batch):
        return self.loss_fn(outputs["logits"], batch["mask"])

    def new_metric(self):
        return _MetricAdapter(M.SegmentationMetrics(self.num_classes, self.ignore_index),
                              lambda m, o, b: m.update(o["logits"].argmax(1), b["mask"]))

    def predictions(self, outputs):
        return {"mask": Prediction("mask", outputs["logits"].argmax(1), self.class_names)}

    def visuals(self, outputs, batch):
        pred = outputs["logits"].argmax(1).cpu()
        colours = PALETTE[pred % len(PALETTE)].permute(0, 3, 1, 2)
        image = batch["image"].cpu()
        image = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image[:, :3]
        fg = (pred > 0).unsqueeze(1).float()
        return {"pred mask": image * (1 - 0.6 * fg) + colours * 0.6 * fg}


class ClassificationHead(TaskHead):
    """Label logits from a pooled backbone map, from a segmentation task's output, or both.

    ``pool="avgmax"``: global average + max pooling of a map (default: the deepest), then an MLP.
    ``pool="none"`` (only with ``from_task``): no features of its own, just the term below.
    ``pool="area"``: a small per-pixel classifier over the labels plus a "none" class on a map
    (default: the finest; of equal strides the last listed, the U-Net's ``dec1``); each label's
    logit is ``s * log(soft pixel share)`` with a learnt scale ``s``. It suits labels defined by
    area ("the kind covering the most pixels"), where global pooling has to learn counting.

    ``from_task = "<segmentation task>"`` (a task cascade): the logits also get a learnt linear
    map of the log soft pixel share of every segmentation class, read from that task's output,
    so the label can use what the fully supervised segmentation has learnt about each pixel.
    When the labels are the segmentation classes after background (same names) the map starts
    as "the label whose class covers the most pixels", else at zero; ``fixed_map=True`` keeps
    that rule and learns only a temperature. ``detach_from_task=True`` stops the classification
    loss's gradient at the segmentation output.
    """

    task_type = "classification"
    targets = ("label",)
    primary_metric = ("accuracy", True)
    POOLS = ("avgmax", "area", "none")

    def __init__(self, features: Sequence[FeatureInfo], info: DatasetInfo,
                 loss: nn.Module | None = None, hidden: int = 64, dropout: float = 0.0,
                 in_feature: str | None = None, pool: str = "avgmax",
                 from_task: str | None = None, detach_from_task: bool = False,
                 fixed_map: bool = False) -> None:
        super().__init__()
        _need(info, info.has_labels, "image-level labels (num_labels = 0)")
        if pool not in self.POOLS:
            raise ValueError(f"classification head: pool must be one of {list(self.POOLS)}, "
                             f"got {pool!r}")
        if pool == "none" and not from_task:
            raise ValueError("classification head: pool='none' (no features of its own) needs "
                             "from_task, the segmentation task to read")
        self.num_labels, self.pool = info.num_labels, pool
        self.label_names = tuple(info.label_names)
        if in_feature:
            f = _pick(features, in_feature, "classification head")
        elif pool == "area":
            finest = min(x.stride for x in features)
            f = [x for x in features if x.stride == finest][-1]
        else:
            f = _deepest(features)
        self.in_feature = f.name
        self.loss_fn = loss if loss is not None else ClsCrossEntropy()
        if pool == "area":
            self.pixel = nn.Sequential(conv_block(f.channels, hidden),
                                       nn.Conv2d(hidden, info.num_labels + 1, 1))
            self.log_scale = nn.Parameter(torch.zeros(()))
        elif pool == "avgmax":
            self.mlp = nn.Sequential(nn.Linear(2 * f.channels, hidden), nn.ReLU(inplace=True),
                                     nn.Dropout(dropout), nn.Linear(hidden, info.num_labels))
        self.from_task = from_task or None
        self.detach_from_task, self.fixed_map = bool(detach_from_task), bool(fixed_map)
        self.seg_area = None
        if self.from_task:
            _need(info, info.has_masks, "masks: from_task reads a segmentation task's output")
            same = tuple(info.seg_class_names[1:]) == tuple(info.label_names) and info.label_names
            # when the labels are the segmentation classes after background (shapes), the map
            # starts from "the label whose class covers the most pixels"; else from zero
            rule = torch.zeros(info.num_labels, info.num_seg_classes)
            if same:
                rule[:, 1:].fill_diagonal_(1.0)
            if fixed_map:
                if not same:
                    raise IncompatibleComponentsError(
                        "classification head: fixed_map needs labels that are the segmentation "
                        f"classes after background; labels {info.label_names}, segmentation "
                        f"classes {info.seg_class_names}. Name the classes so (a dataset's "
                        "class_names / label_names), learn the map (fixed_map = false) or give "
                        "the head features of its own (pool = \"avgmax\", from_task = \"\")")
                # keep the rule (a buffer: nothing trains it); learn only its sharpness
                self.register_buffer("seg_rule", rule)
                self.rule_log_scale = nn.Parameter(torch.zeros(()))
            else:  # a learnt map, trained from the rule
                self.seg_area = nn.Linear(info.num_seg_classes, info.num_labels)
                with torch.no_grad():
                    self.seg_area.weight.copy_(rule)
                    self.seg_area.bias.zero_()

    def link(self, heads):
        if not self.from_task:
            return
        other = heads.get(self.from_task)
        if other is None or other.task_type != "segmentation":
            raise IncompatibleComponentsError(
                f"tasks.{self.task_name}.head.params.from_task={self.from_task!r} must name an "
                "enabled segmentation task (or be \"\" with pool = \"avgmax\"); tasks: "
                + ", ".join(f"{k} ({h.task_type})" for k, h in heads.items()))
        self.reads = (self.from_task,)

    def forward(self, features, batch, upstream=None):
        x = features[self.in_feature] if self.pool != "none" else None
        if self.pool == "area":
            share = torch.softmax(self.pixel(x).float(), 1)[:, :self.num_labels].mean((2, 3))
            logits = self.log_scale.exp() * torch.log(share + 1e-4)
        elif self.pool == "avgmax":
            logits = self.mlp(torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))
        else:  # "none": the segmentation term alone
            logits = 0.0
        if self.from_task:
            seg = upstream[self.from_task]["logits"].float()
            if self.detach_from_task:  # the label's loss then leaves the segmentation alone
                seg = seg.detach()
            log_share = torch.log(torch.softmax(seg, 1).mean((2, 3)) + 1e-4)
            if self.fixed_map:
                term = self.rule_log_scale.exp() * (log_share @ self.seg_rule.T)
            else:
                term = self.seg_area(log_share)
            logits = logits + term
        return {"logits": logits}

    def compute_loss(self, outputs, batch):
        return self.loss_fn(outputs["logits"], batch["label"])

    def new_metric(self):
        return _MetricAdapter(M.ClassificationMetrics(self.num_labels),
                              lambda m, o, b: m.update(o["logits"].argmax(1), b["label"]))

    def predictions(self, outputs):
        probs = torch.softmax(outputs["logits"].float(), 1)
        return {"label": Prediction("label", probs.argmax(1), self.label_names, probs)}


def _generation_metrics(head: TaskHead, datasets: Mapping[str, Any], split: str,
                        num_samples: int, seed: int, conditional: bool,
                        final: bool = True) -> dict[str, float]:
    """FID / precision / recall (+ class consistency; + C2ST and real baselines when ``final``)
    in the cached evaluator's feature space: ``generation_metrics.head_generation_metrics``."""
    from .generation_metrics import head_generation_metrics

    return head_generation_metrics(head, datasets, split, num_samples, seed, conditional, final)


class VAEHead(TaskHead):
    """Features -> (mu, logvar) -> reparameterised z -> decoder -> image (Kingma & Welling 2014).

    ``latent = "vector"`` (default): one ``latent_dim`` vector per image, read through a 4x4
    average pool of ``in_feature`` and decoded from a 4x4 map (:class:`.generators.ImageDecoder`,
    which a GAN head may share). ``latent = "spatial"``: a latent *map* of ``latent_channels``
    channels on a ``latent_grid`` x ``latent_grid`` grid (the image side over a power of 2;
    default: half the side, i.e. stride 2, and 4 channels), encoded by strided convs and decoded
    by upsampling convs (:mod:`.vae_nets`), so the latent keeps where the edges and textures are
    (convolutional / hierarchical VAEs, e.g. Vahdat & Kautz 2020); ``mu`` and
    ``logvar`` are then ``[N, latent_channels, g, g]``. Both are Gaussian VAEs with the KL to
    N(0, I) summed over every latent element and the reparameterisation trick; ``sample()`` decodes
    z ~ N(0, I) of the latent's shape (a spatial latent's prior samples draw every cell alone, so
    they look like texture patches more than like images). ``kl_warmup_steps`` ramps the KL term
    in over that many steps (Bowman et al. 2016). ``latent_dim`` sizes only the vector latent and
    ``latent_grid`` / ``latent_channels`` only the spatial one; the other layout's are ignored.
    """

    task_type = "vae"
    targets = ("image",)
    LATENTS = ("vector", "spatial")

    def __init__(self, features: Sequence[FeatureInfo], info: DatasetInfo,
                 loss: nn.Module | None = None, latent_dim: int | None = None, width: int = 32,
                 in_feature: str | None = None, kl_warmup_steps: int = 0,
                 latent: str = "vector", latent_grid: int | None = None,
                 latent_channels: int | None = None) -> None:
        super().__init__()
        if kl_warmup_steps < 0:
            raise ValueError(f"vae head: kl_warmup_steps must be >= 0, got {kl_warmup_steps}")
        if latent not in self.LATENTS:
            raise ValueError(f"vae head: latent must be one of {list(self.LATENTS)}, got {latent!r}")
        # the other layout's sizes are checked too but unused, so one config switches layouts
        # with a single `--set tasks.vae.head.params.latent=...`
        for name, value in (("latent_dim", latent_dim), ("latent_grid", latent_grid),
                            ("latent_channels", latent_channels), ("width", width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"vae head: {name} must be a positive integer, got {value!r}")
        self.kl_warmup_steps, self.latent = kl_warmup_steps, latent
        # steps taken, a buffer so checkpoints resume the KL warm-up exactly
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        f = _pick(features, in_feature, "vae head") if in_feature else _deepest(features)
        self.in_feature, self.info = f.name, info
        self.loss_fn = loss if loss is not None else VAELoss()
        self.bernoulli = getattr(self.loss_fn, "recon", "mse") == "bernoulli"
        if latent == "vector":
            self.latent_dim = latent_dim = latent_dim or 32
            self.latent_shape: tuple[int, ...] = (latent_dim,)
            self.encode = nn.Sequential(nn.Conv2d(f.channels, width, 3, padding=1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(4),
                                        nn.Flatten(), nn.Linear(width * 16, 2 * latent_dim))
            self.decoder = ImageDecoder(latent_dim, info.channels, info.image_size, width)
        else:
            g, c = latent_grid or max(info.image_size[0] // 2, 1), latent_channels or 4
            up, down = self._spatial_levels(info.image_size, f, g)
            self.latent_grid, self.latent_channels = g, c
            self.latent_shape = (c, g, g)
            self.latent_dim = c * g * g  # the number of latent variables
            self.spatial_encoder = SpatialEncoder(f.channels, c, width, down)
            self.spatial_decoder = SpatialDecoder(c, info.channels, width, up)

    @staticmethod
    def _spatial_levels(size, f: FeatureInfo, grid: int) -> tuple[int, int]:
        """(decoder upsamplings, encoder downsamplings) for a ``grid`` x ``grid`` latent map."""
        h, w = size
        ratio = h // grid
        if h != w or h % grid or ratio & (ratio - 1):
            raise IncompatibleComponentsError(
                f"vae head: latent_grid {grid} must be the side of the square image ({h}x{w}) "
                "over a power of 2 (e.g. " + ", ".join(str(h >> k) for k in range(1, 4) if h >> k)
                + ")")
        if f.stride > ratio or ratio % f.stride:
            raise IncompatibleComponentsError(
                f"vae head: latent_grid {grid} (stride {ratio}) is finer than in_feature "
                f"{f.name!r} (stride {f.stride}); use latent_grid <= {h // f.stride} or a finer "
                "in_feature")
        return ratio.bit_length() - 1, (ratio // f.stride).bit_length() - 1

    @property
    def decoder(self) -> nn.Module:
        """The module mapping z to image logits (the vector latent's may be shared by a GAN)."""
        return self._modules["decoder"] if self.latent == "vector" else self.spatial_decoder

    def link(self, heads):
        for name, h in heads.items():
            if getattr(h, "share_decoder", None) == self.task_name and self.latent != "vector":
                raise IncompatibleComponentsError(
                    f"tasks.{name}.head.params.share_decoder = {self.task_name!r}: only a vector "
                    f"latent's decoder can be shared, and this vae head has latent = "
                    f"{self.latent!r}; set latent = \"vector\" or give the GAN its own generator")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output in [0, 1] (sigmoid of the logits)."""
        return torch.sigmoid(self.decoder(z))

    def forward(self, features, batch):
        x = features[self.in_feature]
        if self.latent == "vector":
            mu, logvar = self.encode(x).float().chunk(2, dim=1)
        else:
            mu, logvar = self.spatial_encoder(x)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        logits = self.decoder(z)
        return {"mu": mu, "logvar": logvar, "recon_logits": logits, "recon": torch.sigmoid(logits)}

    def compute_loss(self, outputs, batch):
        recon = outputs["recon_logits"] if self.bernoulli else outputs["recon"]
        out = self.loss_fn(recon.float(), batch["image"], outputs["mu"], outputs["logvar"])
        if self.training and self.kl_warmup_steps and int(self.steps) < self.kl_warmup_steps:
            # KL warm-up (Bowman et al. 2016): ramp the KL term from 0 to avoid early collapse
            ramp = float(self.steps) / self.kl_warmup_steps
            return out.rec + (out.total - out.rec) * ramp
        return out.total

    def after_main_step(self):
        self.steps += 1

    def new_metric(self):
        def update(m, o, b):
            x, r = b["image"], o["recon"].float()
            n = x.shape[0]
            if self.bernoulli:
                rec = F.binary_cross_entropy_with_logits(o["recon_logits"].float(), x,
                                                         reduction="none").reshape(n, -1).sum(1)
            else:
                rec = ((r - x) ** 2).reshape(n, -1).sum(1)
            mu, logvar = o["mu"].flatten(1), o["logvar"].flatten(1)
            kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
            m.update(r, x, rec, kl)
        return _MetricAdapter(M.ReconstructionMetrics(), update)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None):
        z = torch.randn(n, *self.latent_shape, generator=generator)
        return self.decode(z.to(next(self.parameters()).device))

    def generation_metrics(self, datasets, split, num_samples, seed, final=True):
        return _generation_metrics(self, datasets, split, num_samples, seed, conditional=False,
                                   final=final)

    def predictions(self, outputs):
        return {"reconstruction": Prediction("image", outputs["recon"])}

    def visuals(self, outputs, batch):
        return {"reconstruction": outputs["recon"]}


class GANHead(TaskHead):
    """A generator from noise (optionally class-conditional) against a discriminator trained by its
    own optimizer. Protocol: in D steps the generator gets no gradients and its BatchNorm
    statistics stay fixed, fakes are detached; in the G step (the main multi-task step) the trainer
    freezes D; the EMA generator updates after each G step and is used for sampling.
    ``share_decoder = "<vae task>"`` makes the generator the VAE's decoder (VAE-GAN); otherwise
    the head owns a generator normalised by ``g_norm`` ("pixel" by default: no batch statistics,
    so the EMA copy samples exactly what its weights compute). ``augment`` (e.g.
    ``["color", "translation", "cutout"]``) passes D's inputs, real and fake, through those
    differentiable augmentations in training (DiffAugment, Zhao et al. 2020). ``ac_weight > 0``
    (conditional only) adds an auxiliary classifier to D (AC-GAN, Odena et al. 2017): D learns
    the class of real images, the generator is pushed to make fakes D classifies as their
    label, each term weighted by ``ac_weight``."""

    task_type = "gan"
    targets = ("image",)

    def __init__(self, features: Sequence[FeatureInfo], info: DatasetInfo,
                 loss: nn.Module | None = None, latent_dim: int = 32, width: int = 32,
                 d_width: int = 32, conditional: bool = True, share_decoder: str | None = None,
                 d_steps: int = 1, r1_gamma: float = 0.5, r1_every: int = 4,
                 ema_decay: float = 0.99, mbstd_group: int = 4, g_norm: str = "pixel",
                 augment: Sequence[str] = (), ac_weight: float = 0.0) -> None:
        super().__init__()
        if not ac_weight >= 0:
            raise ValueError(f"gan head: ac_weight must be >= 0, got {ac_weight}")
        if d_steps < 1 or r1_every < 1 or not 0 <= ema_decay < 1 or r1_gamma < 0:
            raise ValueError("gan head: need d_steps >= 1, r1_every >= 1, 0 <= ema_decay < 1, "
                             f"r1_gamma >= 0; got {d_steps}, {r1_every}, {ema_decay}, {r1_gamma}")
        self.info, self.latent_dim = info, latent_dim
        self.conditional = conditional and info.has_labels
        self.loss_fn = loss if loss is not None else AdversarialLoss()
        if not hasattr(self.loss_fn, "d_loss"):
            raise IncompatibleComponentsError("gan head: its loss needs d_loss/g_loss methods")
        self.share_decoder, self.d_steps, self.r1_gamma, self.r1_every = (
            share_decoder, d_steps, r1_gamma, r1_every)
        self.ema_decay = ema_decay
        self.embed = nn.Embedding(info.num_labels, latent_dim) if self.conditional else None
        self._own = None if share_decoder else ImageDecoder(latent_dim, info.channels,
                                                            info.image_size, width, g_norm)
        self._shared: list[nn.Module] = []  # the VAE decoder, held without registering it twice
        self.ac_weight = float(ac_weight) if self.conditional else 0.0
        self.ac_loss = ClsCrossEntropy(label_smoothing=0.0)  # AC-GAN's class term
        self.discriminator = Discriminator(info.channels, info.image_size, d_width,
                                           info.num_labels if self.conditional else 0, mbstd_group,
                                           augment, class_head=self.ac_weight > 0)
        self.ema = copy.deepcopy(self._own) if self._own is not None else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        # the EMA generator's own class embedding: its layers average weights trained against
        # the embedding of ~1 / (1 - decay) steps ago, so the live one would not match them
        self.ema_embed = (copy.deepcopy(self.embed).requires_grad_(False)
                          if self.embed is not None else None)

    def link(self, heads):
        if not self.share_decoder:
            return
        other = heads.get(self.share_decoder)
        if other is None or not isinstance(getattr(other, "decoder", None), ImageDecoder):
            raise IncompatibleComponentsError(
                f"gan head: share_decoder={self.share_decoder!r} must name a VAE task; tasks: "
                + ", ".join(heads))
        if other.latent_dim != self.latent_dim:
            raise IncompatibleComponentsError(
                f"gan head: latent_dim {self.latent_dim} != the shared VAE decoder's "
                f"{other.latent_dim}")
        self._shared = [other.decoder]
        self.ema = copy.deepcopy(other.decoder).requires_grad_(False)

    @property
    def generator(self) -> nn.Module:
        return self._own if self._own is not None else self._shared[0]

    def _z(self, n, labels, generator=None, ema=False):
        """Latents for ``labels`` (None: unconditional), for the EMA generator if ``ema``."""
        dev = next(self.discriminator.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(dev)
        if self.embed is not None:
            z = z + (self.ema_embed if ema else self.embed)(labels.to(dev))
        return z

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the EMA embedding: it starts as the trained one
        own, live = prefix + "ema_embed.weight", prefix + "embed.weight"
        if self.ema_embed is not None and own not in state_dict and live in state_dict:
            state_dict[own] = state_dict[live]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _labels(self, batch, n):
        if not self.conditional:
            return None
        if "label" in batch:
            return batch["label"]
        return torch.randint(0, self.info.num_labels, (n,), device=batch["image"].device)

    def auxiliary_parameters(self):
        return {"discriminator": list(self.discriminator.parameters())}

    def main_parameters(self):
        """Generator-side parameters; the EMA copy is updated by ``after_main_step``, not trained."""
        skip = {id(p) for p in self.discriminator.parameters()}
        for frozen_copy in (self.ema, self.ema_embed):
            skip |= {id(p) for p in frozen_copy.parameters()} if frozen_copy is not None else set()
        return (p for p in self.parameters() if id(p) not in skip)

    @property
    def auxiliary_steps(self):
        return self.d_steps

    def forward(self, features, batch):
        n = batch["image"].shape[0]
        labels = self._labels(batch, n)
        gen = self.generator if self.training else self.ema
        fake = torch.sigmoid(gen(self._z(n, labels, ema=not self.training)))
        logits, classes = self._judge(fake, labels)
        out = {"fake": fake, "fake_logits": logits}
        if classes is not None:
            out.update(fake_classes=classes, labels=labels)
        return out

    def _judge(self, images, labels):
        """D's real/fake logits, and its class logits with AC-GAN (else None)."""
        if self.ac_weight > 0:
            return self.discriminator(images, labels, return_classes=True)
        return self.discriminator(images, labels), None

    def compute_loss(self, outputs, batch):
        loss = self.loss_fn.g_loss(outputs["fake_logits"].float())
        if self.ac_weight > 0:  # the generator makes fakes that D classifies as their label
            loss = loss + self.ac_weight * self.ac_loss(outputs["fake_classes"].float(),
                                                        outputs["labels"])
        return loss

    def auxiliary_loss(self, batch, step):
        real = batch["image"]
        n = real.shape[0]
        labels = self._labels(batch, n)
        with torch.no_grad(), frozen_norm_stats(self.generator):
            fake = torch.sigmoid(self.generator(self._z(n, labels)))
        real_logits, real_classes = self._judge(real, labels)
        d_loss = self.loss_fn.d_loss(real_logits.float(),
                                     self.discriminator(fake.detach(), labels).float())
        out = {"d_loss": d_loss}
        loss = d_loss
        if real_classes is not None:  # D's classifier learns from real images only
            ac = self.ac_loss(real_classes.float(), labels)
            out["d_ac"] = ac
            loss = loss + self.ac_weight * ac
        r1 = lazy_r1(lambda x: self.discriminator(x, labels), real, self.r1_gamma,
                     self.r1_every, step)
        if r1 is not None:
            out["r1"] = r1
            loss = loss + r1 * self.r1_every
        out["loss"] = loss
        return out

    def after_main_step(self):
        ema_update(self.ema, self.generator, self.ema_decay)
        if self.ema_embed is not None:
            ema_update(self.ema_embed, self.embed, self.ema_decay)

    def new_metric(self):
        class _Mean:
            def __init__(self, loss_fn):
                self.loss_fn, self.total, self.n = loss_fn, 0.0, 0

            def update(self, outputs, batch):
                k = outputs["fake_logits"].shape[0]
                self.total += float(self.loss_fn.g_loss(outputs["fake_logits"].float())) * k
                self.n += k

            def compute(self):
                return {"g_loss": self.total / max(self.n, 1)}
        return _Mean(self.loss_fn)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None):
        if self.conditional and labels is None:
            labels = torch.randint(0, self.info.num_labels, (n,), generator=generator)
        return torch.sigmoid(self.ema(self._z(n, labels, generator, ema=True)))

    def generation_metrics(self, datasets, split, num_samples, seed, final=True):
        return _generation_metrics(self, datasets, split, num_samples, seed, self.conditional,
                                   final=final)
