"""Tests of the streaming metric accumulators against hand computations and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, jaccard_score

from mtcore_tasks.metrics import ClassificationMetrics, ReconstructionMetrics, SegmentationMetrics

# ----------------------------------------------------------------------------- segmentation


def test_segmentation_hand_computed_2x2():
    # mask [[0, 1], [1, 255]], preds [[0, 1], [0, 1]]; the ignored pixel is dropped.
    # valid (target, pred): (0,0), (1,1), (1,0) -> confusion rows=target [[1, 0], [1, 1], [0, 0]]
    # class 0: TP 1, FP 1, FN 0 -> IoU 1/2; class 1: TP 1, FP 0, FN 1 -> IoU 1/2;
    # class 2 absent from both -> NaN, not in the mean. mIoU 1/2, pixel acc 2/3.
    m = SegmentationMetrics(num_classes=3)
    m.update(torch.tensor([[[0, 1], [0, 1]]]), torch.tensor([[[0, 1], [1, 255]]]))
    assert m.confusion.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    out = m.compute()
    assert out["iou/0"] == pytest.approx(0.5)
    assert out["iou/1"] == pytest.approx(0.5)
    assert math.isnan(out["iou/2"])
    assert out["miou"] == pytest.approx(0.5)
    assert out["pixel_acc"] == pytest.approx(2 / 3)


def test_segmentation_class_only_predicted_counts_in_miou():
    # target all class 0, prediction says class 1 on one of two pixels:
    # class 0: TP 1, FN 1 -> 1/2; class 1: FP 1 -> 0. mIoU = 1/4.
    m = SegmentationMetrics(num_classes=2)
    m.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    assert m.compute()["miou"] == pytest.approx(0.25)


def test_segmentation_streaming_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    c = 5
    m = SegmentationMetrics(num_classes=c, ignore_index=255)
    all_t, all_p = [], []
    for _ in range(3):
        logits = torch.randn(2, c, 6, 7, generator=g)
        mask = torch.randint(0, c - 1, (2, 6, 7), generator=g)  # class 4 never in the target
        mask[torch.rand(2, 6, 7, generator=g) < 0.2] = 255
        m.update(logits, mask)  # logits -> argmax over dim 1
        valid = mask != 255
        all_t.append(mask[valid])
        all_p.append(logits.argmax(1)[valid])
    t, p = torch.cat(all_t).numpy(), torch.cat(all_p).numpy()
    np.testing.assert_array_equal(m.confusion.numpy(), confusion_matrix(t, p, labels=range(c)))
    out = m.compute()
    assert out["miou"] == pytest.approx(jaccard_score(t, p, average="macro"), rel=1e-12)
    present = sorted(set(t.tolist()) | set(p.tolist()))
    per = jaccard_score(t, p, average=None, labels=present)
    for cls, value in zip(present, per, strict=True):
        assert out[f"iou/{cls}"] == pytest.approx(value, rel=1e-12)
    assert out["pixel_acc"] == pytest.approx(float((t == p).mean()), rel=1e-12)


def test_segmentation_reset_and_empty():
    m = SegmentationMetrics(num_classes=2)
    out = m.compute()
    assert math.isnan(out["miou"]) and math.isnan(out["pixel_acc"])
    m.update(torch.tensor([[[1]]]), torch.tensor([[[1]]]))
    assert m.compute()["miou"] == 1.0
    m.reset()
    assert int(m.confusion.sum()) == 0


def test_segmentation_errors():
    m = SegmentationMetrics(num_classes=3)
    mask = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"mask holds class index 5, outside \[0, 3\)"):
        m.update(mask, torch.tensor([[[0, 5], [0, 0]]]))
    with pytest.raises(ValueError, match=r"preds holds class index 3, outside \[0, 3\)"):
        m.update(torch.tensor([[[0, 3], [0, 0]]]), mask)
    with pytest.raises(
        ValueError, match=r"preds must match the target shape \(1, 2, 2\).*\(1, 2, 3\)"
    ):
        m.update(torch.zeros(1, 2, 3, dtype=torch.long), mask)
    with pytest.raises(
        ValueError, match=r"preds scores must have 3 classes in dim 1.*\(1, 4, 2, 2\)"
    ):
        m.update(torch.zeros(1, 4, 2, 2), mask)
    with pytest.raises(TypeError, match=r"mask must hold integer class indices"):
        m.update(mask, mask.float())
    with pytest.raises(ValueError, match=r"num_classes must be a positive int"):
        SegmentationMetrics(num_classes=0)
    assert int(m.confusion.sum()) == 0  # failed updates leave no trace


# ----------------------------------------------------------------------------- classification


def test_classification_hand_computed():
    # labels [0, 0, 1, 2], preds [0, 1, 1, 1], 4 classes
    # class 0: TP 1, FN 1, FP 0 -> F1 2/3; class 1: TP 1, FP 2 -> 2/4 = 1/2; class 2: TP 0 -> 0;
    # class 3: no support, never predicted -> excluded. macro-F1 = (2/3 + 1/2 + 0) / 3 = 7/18.
    m = ClassificationMetrics(num_classes=4)
    m.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 2]))
    out = m.compute()
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["macro_f1"] == pytest.approx(7 / 18)


def test_classification_streaming_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    k = 6
    m = ClassificationMetrics(num_classes=k)
    ys, ps = [], []
    for n in (7, 1, 12):
        logits = torch.randn(n, k, generator=g)
        labels = torch.randint(0, k - 1, (n,), generator=g)
        m.update(logits, labels)
        ys.append(labels)
        ps.append(logits.argmax(1))
    y, p = torch.cat(ys).numpy(), torch.cat(ps).numpy()
    out = m.compute()
    assert out["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"), rel=1e-12)
    assert out["accuracy"] == pytest.approx(float((y == p).mean()), rel=1e-12)
    np.testing.assert_array_equal(m.confusion.numpy(), confusion_matrix(y, p, labels=range(k)))


def test_classification_errors_and_reset():
    m = ClassificationMetrics(num_classes=3)
    with pytest.raises(ValueError, match=r"labels holds class index 3, outside \[0, 3\)"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must be \[N\], got shape \(2, 1\)"):
        m.update(torch.tensor([0, 1]), torch.tensor([[0], [1]]))
    with pytest.raises(TypeError, match=r"preds must be class indices"):
        m.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    m.update(torch.tensor([2]), torch.tensor([2]))
    assert m.compute() == {"accuracy": 1.0, "macro_f1": 1.0}
    m.reset()
    assert all(math.isnan(v) for v in m.compute().values())


# ----------------------------------------------------------------------------- reconstruction


def test_reconstruction_hand_computed():
    # recon [[0.5, 0.5]] vs image [[0, 1]] -> mse 0.25 -> psnr 10 log10(1 / 0.25) = 6.0206 dB
    m = ReconstructionMetrics()
    m.update(
        torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
        torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        rec=torch.tensor([1.0, 3.0]),
        kl=torch.tensor([0.5, 0.5]),
    )
    out = m.compute()
    assert out["mse"] == pytest.approx(0.25)
    assert out["psnr"] == pytest.approx(10 * math.log10(4.0))
    assert out["elbo"] == pytest.approx(-(1.5 + 3.5) / 2)
    m2 = ReconstructionMetrics(data_range=2.0)
    m2.update(torch.full((1, 2), 0.5), torch.tensor([[0.0, 1.0]]), torch.zeros(1), torch.zeros(1))
    assert m2.compute()["psnr"] == pytest.approx(10 * math.log10(16.0))


def test_reconstruction_split_level_mse_and_psnr():
    # PSNR comes from the split-level MSE, not the mean of per-batch values
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.rand(n, 1, 3, 3, generator=g), torch.rand(n, 1, 3, 3, generator=g))
        for n in (1, 4, 2)
    ]
    m = ReconstructionMetrics()
    rec_all, kl_all = [], []
    for recon, image in batches:
        rec = ((recon - image) ** 2).flatten(1).sum(1)
        kl = torch.rand(recon.shape[0], generator=g)
        m.update(recon, image, rec, kl)
        rec_all.append(rec)
        kl_all.append(kl)
    recon = torch.cat([b[0] for b in batches]).double()
    image = torch.cat([b[1] for b in batches]).double()
    mse = F.mse_loss(recon, image).item()
    out = m.compute()
    assert out["mse"] == pytest.approx(mse, rel=1e-12)
    assert out["psnr"] == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-12)
    elbo = -(torch.cat(rec_all).double() + torch.cat(kl_all).double()).mean().item()
    assert out["elbo"] == pytest.approx(elbo, rel=1e-12)


def test_reconstruction_bernoulli_elbo_from_bce():
    # Bernoulli rec per sample = summed BCE of the decoder's logits; the metric takes the sigmoid
    logits = torch.tensor([[0.0, 2.0]])
    image = torch.tensor([[1.0, 1.0]])
    rec = F.binary_cross_entropy_with_logits(logits, image, reduction="none").sum(1)
    m = ReconstructionMetrics()
    m.update(torch.sigmoid(logits), image, rec, torch.tensor([0.25]))
    # -(ln 2 + ln(1 + e^-2) + 0.25)
    assert m.compute()["elbo"] == pytest.approx(-(math.log(2) + math.log1p(math.exp(-2)) + 0.25))


def test_reconstruction_perfect_empty_reset_errors():
    m = ReconstructionMetrics()
    assert all(math.isnan(v) for v in m.compute().values())
    x = torch.rand(2, 3)
    m.update(x, x.clone(), torch.zeros(2), torch.zeros(2))
    assert m.compute()["psnr"] == math.inf
    m.reset()
    assert math.isnan(m.compute()["mse"])
    with pytest.raises(ValueError, match=r"rec must be per-sample \[N\] = \(2,\).*shape \(2, 1\)"):
        m.update(x, x, torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match=r"recon and image must have the same shape.*\(2, 2\)"):
        m.update(x, x[:, :2], torch.zeros(2), torch.zeros(2))
    with pytest.raises(TypeError, match=r"image must be a floating-point tensor"):
        m.update(x, x.long(), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"data_range must be > 0"):
        ReconstructionMetrics(data_range=0.0)
    assert m.num_samples == 0
