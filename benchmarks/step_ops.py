"""Each fused op at the sizes the default training step calls it with, cpp vs reference.

    python benchmarks/step_ops.py [--calls 300] [--layout channels_last|contiguous]

The op table of ``mtcore bench`` uses large shapes (the issue's); the default step (batch 32,
32x32 images, 4 segmentation classes, a width-16 discriminator) calls the same ops on much
smaller tensors, where a custom op's fixed cost matters. Feature maps, segmentation logits and
VAE reconstructions come in the model's memory format (``model.channels_last``, on by default);
images and targets from the loader stay contiguous. Prints the median forward + backward time of
each and the ratio reference / cpp (> 1: cpp faster).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from mtcore import kernels as K


def _median_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def cases(channels_last: bool = True
          ) -> dict[str, Callable[[str], tuple[torch.Tensor, list[torch.Tensor]]]]:
    """name -> fn(backend) giving (a scalar of one op call at a default-step size, its inputs);
    4-d model outputs in channels_last memory format if ``channels_last``."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(True)

    out: dict[str, Callable[[str], tuple[torch.Tensor, list[torch.Tensor]]]] = {}
    # the width-16 discriminator's fused layers: 32x32 (stride 1), then 16, 8, 4, and the final
    for c, s in ((16, 32), (32, 16), (64, 8), (128, 4)):
        x, b = leaf(32, c, s, s), leaf(c)
        out[f"bias_act lrelu 32x{c}x{s}x{s}"] = (
            lambda be, x=x, b=b: (K.bias_act(x, b, act="lrelu", backend=be).sum(), [x, b]))
    h = leaf(32, 128, 4, 4)
    out["minibatch_stddev 32x128x4x4"] = lambda be: (
        K.minibatch_stddev(h, 4, backend=be).sum(), [h])
    seg, seg_t = leaf(32, 4, 32, 32), torch.randint(0, 4, (32, 32, 32), generator=g)
    out["seg_cross_entropy 32x4x32x32"] = lambda be: (
        K.seg_cross_entropy(seg, seg_t, backend=be), [seg])
    cls, cls_t = leaf(32, 3), torch.randint(0, 3, (32,), generator=g)
    out["classification CE 32x3"] = lambda be: (
        K.seg_cross_entropy(cls, cls_t, None, -100, 0.05, "mean", backend=be), [cls])
    recon, image = leaf(32, 3, 32, 32), torch.rand(32, 3, 32, 32, generator=g)
    mu, logvar = leaf(32, 32), leaf(32, 32)
    out["vae_loss bernoulli 32x3x32x32"] = lambda be: (
        K.vae_loss(recon, image, mu, logvar, 1.0, "bernoulli", backend=be).total,
        [recon, mu, logvar])
    # the U-Net's and the segmentation/VAE decoders' BatchNorm + ReLU, at the step's map sizes
    for c, s in ((16, 32), (32, 32), (32, 16), (64, 8)):
        x, w, b = leaf(32, c, s, s), leaf(c), leaf(c)
        out[f"batch_norm_act relu 32x{c}x{s}x{s}"] = (
            lambda be, x=x, w=w, b=b: (K.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5,
                                                        "relu", backend=be).sum(), [x, w, b]))
    # the width-16 GAN generator: pixel norm + leaky ReLU, and its (upsample, conv) stages
    for c, s in ((64, 8), (32, 16), (16, 32)):
        x = leaf(32, c, s, s)
        out[f"pixel_norm_act lrelu 32x{c}x{s}x{s}"] = (
            lambda be, x=x: (K.pixel_norm_act(x, 1e-8, "lrelu", 0.2, backend=be).sum(), [x]))
    for c, s in ((128, 4), (64, 8), (32, 16)):
        x, w = leaf(32, c, s, s), leaf(c // 2, c, 3, 3)
        out[f"upsample_conv2d 32x{c}x{s}x{s}->{c // 2}"] = (
            lambda be, x=x, w=w: (K.upsample_conv2d(x, w, backend=be).sum(), [x, w]))
    d_logits = leaf(32)
    for role in ("d_real", "d_fake", "g"):
        out[f"adversarial {role}, 32 logits"] = (
            lambda be, role=role: (K.adversarial_loss(d_logits, "non_saturating", role,
                                                      backend=be), [d_logits]))
    return out


def _fwd_bwd(fn: Callable[[str], tuple[torch.Tensor, list[torch.Tensor]]], backend: str) -> None:
    loss, inputs = fn(backend)
    torch.autograd.grad(loss, inputs)  # gradients returned, not accumulated into .grad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300, help="timed calls per op and backend (>= 1)")
    p.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last",
                   help="memory format of the 4-d model outputs "
                        "(the default config's: channels_last)")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls must be >= 1, got {args.calls}")
    if "cpp" not in K.available_backends("cpu"):
        print("the C++ kernels are unavailable here; nothing to compare")
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd medians of "
          f"{args.calls} calls, {args.layout} model outputs")
    print(f"{'op at the default step size':<38} {'reference us':>13} {'cpp us':>9} {'ratio':>6}")
    for name, fn in cases(args.layout == "channels_last").items():
        ref = _median_us(functools.partial(_fwd_bwd, fn, "reference"), args.calls)
        cpp = _median_us(functools.partial(_fwd_bwd, fn, "cpp"), args.calls)
        print(f"{name:<38} {ref:>13.1f} {cpp:>9.1f} {ref / cpp:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
