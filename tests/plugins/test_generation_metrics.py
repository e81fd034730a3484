"""Offline generation metrics: FID against scipy and closed forms, k-NN precision/recall against
hand-made point sets and a brute-force reference, the cached per-dataset evaluator (masks and
labels), and what the generative heads report beside their real-vs-real baselines."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from mtcore.data import DatasetInfo
from mtcore_datasets.shapes import ShapesDataset
from mtcore_tasks import evaluator as evaluator_mod
from mtcore_tasks import generation_metrics as gm_mod
from mtcore_tasks.evaluator import (
    FEATURE_DIM,
    FEATURE_GROUPS,
    Evaluator,
    default_cache_dir,
    get_evaluator,
    train_evaluator,
)
from mtcore_tasks.generation_metrics import (
    GenerationMetrics,
    class_consistency,
    frechet_distance,
    grouped_frechet_distance,
    head_generation_metrics,
    precision_recall,
)

scipy_linalg = pytest.importorskip("scipy.linalg")


class BarsDataset:
    """A bar at 0/45/90/135 degrees (the label), random colour, place and length, noisy background."""

    def __init__(self, num_samples: int, size: int = 32, seed: int = 0, labelled: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (num_samples,), generator=g)
        grid = torch.arange(size, dtype=torch.float32)
        yy, xx = torch.meshgrid(grid, grid, indexing="ij")
        images = []
        for label in self.labels.tolist():
            th = label * math.pi / 4 + (float(torch.rand((), generator=g)) - 0.5) * 0.3
            cx, cy = ((torch.rand(2, generator=g) * 0.5 + 0.25) * size).tolist()
            across = (-(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)).abs()
            along = ((xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)).abs()
            half_len = size * (0.2 + 0.15 * float(torch.rand((), generator=g)))
            bar = ((across < 1.5) & (along < half_len)).float()
            fg = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4
            bg = torch.rand(3, 1, 1, generator=g) * 0.3
            img = bg + (fg - bg) * bar + 0.05 * torch.randn(3, size, size, generator=g)
            images.append(img.clamp(0, 1))
        self.images = torch.stack(images)
        self.info = DatasetInfo("bars", 3, (size, size), num_labels=4 if labelled else 0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self.images[i]}
        if self.info.has_labels:
            item["label"] = self.labels[i]
        return item


# ---------------------------------------------------------------- Frechet distance


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation: sample statistics and scipy's general matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy_linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_frechet_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(400, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim)) * 0.7 + rng.normal(size=dim)
    expected = _scipy_fid(a, b)
    got = frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert frechet_distance(torch.from_numpy(b), torch.from_numpy(a)) == pytest.approx(expected)


def _with_stats(z: np.ndarray, mean: float, std: float) -> np.ndarray:
    """z shifted and scaled so its sample mean and (unbiased) std are exactly mean and std."""
    z = (z - z.mean(0)) / z.std(0, ddof=1)
    return mean + std * z


def test_frechet_one_dimensional_closed_form():
    # Two 1-D Gaussians: d^2 = (mu1 - mu2)^2 + (s1 - s2)^2.
    rng = np.random.default_rng(0)
    a = _with_stats(rng.normal(size=(50, 1)), 1.0, 2.0)
    b = _with_stats(rng.normal(size=(80, 1)), -0.5, 0.5)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(4.5)


def test_frechet_independent_dims_add_up():
    # Diagonal covariances commute, so the distance is the sum of the per-dim 1-D distances.
    rng = np.random.default_rng(1)
    means_a, stds_a = [0.0, 3.0, -1.0], [1.0, 0.2, 4.0]
    means_b, stds_b = [1.0, 3.0, 1.0], [2.0, 0.2, 1.0]
    z = rng.normal(size=(2000, 3))
    # Whiten so the sample covariance is exactly diagonal.
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    a = np.asarray(means_a) + z * np.asarray(stds_a)
    b = np.asarray(means_b) + z[::-1] * np.asarray(stds_b)
    expected = sum(
        (ma - mb) ** 2 + (sa - sb) ** 2
        for ma, mb, sa, sb in zip(means_a, means_b, stds_a, stds_b, strict=True)
    )
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected)


def test_grouped_frechet_is_the_sum_over_groups_and_ignores_cross_group_covariance():
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.normal(size=(300, 5)))
    b = torch.from_numpy(rng.normal(size=(300, 5)) * 1.5 + 0.5)
    assert grouped_frechet_distance(a, b, (5,)) == pytest.approx(frechet_distance(a, b))
    assert grouped_frechet_distance(a, b, (2, 3)) == pytest.approx(
        frechet_distance(a[:, :2], b[:, :2]) + frechet_distance(a[:, 2:], b[:, 2:]))
    # mixing the two groups of b with each other changes only the cross-group covariance
    # (same marginals per group: both groups of b are i.i.d. copies of one distribution)
    c = torch.from_numpy(rng.normal(size=(300, 2)))
    d = torch.cat([c, c], dim=1)  # the groups perfectly correlated
    e = torch.cat([c, torch.from_numpy(rng.normal(size=(300, 2)))], dim=1)  # independent
    assert grouped_frechet_distance(d, e, (2, 2)) < 0.2 < frechet_distance(d, e)
    with pytest.raises(ValueError, match=r"groups \(2, 2\) add up to 4, but the features have 5"):
        grouped_frechet_distance(a, b, (2, 2))
    with pytest.raises(ValueError, match="groups must be positive ints"):
        grouped_frechet_distance(a, b, (5, 0))


@pytest.mark.parametrize("n", [500, 20])  # 20 < D: a rank-deficient covariance
def test_frechet_of_a_set_with_itself_is_zero(n):
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) * 3 + 1
    scale = float(x.var(0).sum())
    got = frechet_distance(x, x.clone())
    assert 0.0 <= got <= 1e-6 * scale


def test_frechet_bad_input_is_named():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="feats_a and feats_b must have the same feature size"):
        frechet_distance(x, torch.randn(10, 5))
    with pytest.raises(ValueError, match="feats_b needs at least 2 rows"):
        frechet_distance(x, torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"feats_a must be a 2-D.*\(10, 4, 1\)"):
        frechet_distance(x[..., None], x)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="feats_b .* NaN"):
        frechet_distance(x, bad)
    with pytest.raises(TypeError, match="feats_a must be a torch.Tensor"):
        frechet_distance([[1.0, 2.0]], x)


# ---------------------------------------------------------------- precision / recall


def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, one point at a time."""

    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def covered(query, ref, r):
        return np.mean([bool(np.any(np.linalg.norm(ref - q, axis=1) <= r)) for q in query])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_identical_sets():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_far_away_fakes():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(100, 2, generator=g)
    fake = torch.randn(100, 2, generator=g) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_hand_made_points():
    # Real: ten points 1 apart on the x axis; with k=1 each ball has radius 1.
    real = torch.tensor([[float(i), 0.0] for i in range(10)])
    # Fake: two tight pairs. The pair near x=0 lies inside the real manifold, the pair at x=50
    # does not -> precision 1/2. Fake radii (k=1): 0.2, 0.2, 0.5, 0.5, so only real (0, 0)
    # (0.1 from fake[0]) is covered -> recall 1/10.
    fake = torch.tensor([[0.0, 0.1], [0.0, 0.3], [50.0, 0.0], [50.0, 0.5]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(0.1)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(120, 3))
    fake = rng.normal(size=(90, 3)) * 1.5 + 0.7
    expected = _brute_precision_recall(real, fake, k)
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, batch_size=17)
    assert got == pytest.approx(expected)


def test_precision_recall_bad_input():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"fake_feats needs more than k=3 rows.*\(3, 2\)"):
        precision_recall(x, torch.randn(3, 2), k=3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="same feature size"):
        precision_recall(x, torch.randn(5, 3), k=1)


# ---------------------------------------------------------------- evaluator


@pytest.fixture(scope="module")
def bars():
    return BarsDataset(1200, seed=0), BarsDataset(400, seed=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluators")


@pytest.fixture(scope="module")
def bars_evaluator(bars, cache_dir) -> Evaluator:
    return get_evaluator(bars[0], "bars-test", cache_dir=cache_dir, epochs=3)


def test_evaluator_learns_the_labels(bars, bars_evaluator):
    val = bars[1]
    acc = bars_evaluator.accuracy_on(val)
    assert acc > 0.9
    # The fraction of real images classified as their own label is exactly the accuracy ...
    assert class_consistency(bars_evaluator, val.images, val.labels) == pytest.approx(acc)
    # ... while labels unrelated to the images score near chance (1/4).
    shuffled = val.labels[torch.randperm(len(val), generator=torch.Generator().manual_seed(0))]
    assert class_consistency(bars_evaluator, val.images, shuffled) < 0.45
    feats = bars_evaluator.features(val.images[:10])
    assert feats.shape == (10, FEATURE_DIM) and feats.dtype == torch.float32
    assert bars_evaluator.mode == "labels"  # the bars have no masks


def test_evaluator_second_call_loads_from_disk(bars, bars_evaluator, cache_dir, monkeypatch):
    path = bars_evaluator.cache_path
    assert path is not None and path.parent == cache_dir and path.name.startswith("bars-test-")
    mtime = os.stat(path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached evaluator should have been loaded, not retrained")

    monkeypatch.setattr(evaluator_mod, "train_evaluator", no_training)
    loaded = get_evaluator(bars[0], "bars-test", cache_dir=cache_dir, epochs=3)
    assert loaded.cache_path == path and os.stat(path).st_mtime_ns == mtime
    images = bars[1].images[:64]
    assert torch.equal(loaded.features(images), bars_evaluator.features(images))
    assert torch.equal(loaded.predict(images), bars_evaluator.predict(images))
    # Other training parameters are another cache entry, so they train again.
    with pytest.raises(AssertionError, match="not retrained"):
        get_evaluator(bars[0], "bars-test", cache_dir=cache_dir, epochs=4)


def test_changed_data_under_the_same_key_trains_a_new_evaluator(tmp_path):
    """The cache name holds a fingerprint of the data: other images under the same key and size
    (say, a new version of a procedural generator) must not load the old evaluator."""
    old, new = BarsDataset(48, size=8, seed=0), BarsDataset(48, size=8, seed=1)
    first = get_evaluator(old, "bars", cache_dir=tmp_path, epochs=1)
    assert get_evaluator(old, "bars", cache_dir=tmp_path, epochs=1).cache_path == first.cache_path
    edited = BarsDataset(48, size=8, seed=0)
    edited.images[47, 0, 0, 0] += 0.5  # one pixel of the last item
    paths = {first.cache_path}
    for data in (new, edited):
        ev = get_evaluator(data, "bars", cache_dir=tmp_path, epochs=1)
        assert ev.cache_path not in paths
        paths.add(ev.cache_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert evaluator_mod.data_fingerprint(old, 48) == evaluator_mod.data_fingerprint(
        BarsDataset(48, size=8, seed=0), 48)


def test_training_is_deterministic_by_seed():
    data = BarsDataset(96, size=16, seed=3)
    a = train_evaluator(data, evaluator_mod.TrainConfig(epochs=1, seed=5))
    b = train_evaluator(data, evaluator_mod.TrainConfig(epochs=1, seed=5))
    c = train_evaluator(data, evaluator_mod.TrainConfig(epochs=1, seed=6))
    x = data.images[:8]
    assert torch.equal(a.features(x), b.features(x))
    assert not torch.equal(a.features(x), c.features(x))


def test_corrupt_cache_file_warns_and_retrains(tmp_path):
    data = BarsDataset(96, size=16, seed=4)
    first = get_evaluator(data, "tiny", cache_dir=tmp_path, epochs=1)
    path = first.cache_path
    path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match=r"unreadable evaluator cache file .*retraining"):
        again = get_evaluator(data, "tiny", cache_dir=tmp_path, epochs=1)
    x = data.images[:8]
    assert torch.equal(again.features(x), first.features(x))  # same seed, same weights
    loaded = get_evaluator(data, "tiny", cache_dir=tmp_path, epochs=1)  # the file was rewritten
    assert torch.equal(loaded.features(x), first.features(x))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_cache_dir_follows_mtcore_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTCORE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "evaluators"
    ev = get_evaluator(BarsDataset(40, size=8, seed=0), "env", epochs=1)
    assert ev.cache_path.parent == tmp_path / "evaluators" and ev.cache_path.exists()


def test_unlabelled_dataset_uses_rotation_pretext(tmp_path):
    data = BarsDataset(64, size=16, seed=2, labelled=False)
    ev = get_evaluator(data, "unlabelled", cache_dir=tmp_path, epochs=1)
    assert ev.mode == "rotation" and ev.num_labels == 0
    assert ev.features(data.images[:5]).shape == (5, FEATURE_DIM)
    with pytest.raises(ValueError, match="rotation pretext task"):
        ev.predict(data.images[:5])


def test_evaluator_bad_input(bars_evaluator):
    with pytest.raises(
        ValueError, match=r"images must have shape \[N, 3, 32, 32\].*\(2, 3, 16, 16\)"
    ):
        bars_evaluator.features(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*x \* 0.5 \+ 0.5"):
        bars_evaluator.features(torch.rand(2, 3, 32, 32) * 2 - 1)
    with pytest.raises(TypeError, match="float tensor"):
        bars_evaluator.features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="cache_key"):
        get_evaluator(BarsDataset(4, size=8), "../escape", cache_dir="/nonexistent")
    with pytest.raises(TypeError, match="DatasetInfo"):
        get_evaluator([{"image": torch.rand(3, 8, 8)}], "x")


# ---------------------------------------------------------------- metrics on images


def test_generation_metrics_real_vs_noise(bars, bars_evaluator):
    train, val = bars
    metrics = GenerationMetrics(bars_evaluator, val.images, num_samples=300)
    like_real = metrics(train.images[:300], labels=train.labels[:300])
    noise = metrics(torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert like_real["fid"] * 20 < noise["fid"]
    assert like_real["precision"] > 0.8 and like_real["recall"] > 0.8
    assert noise["precision"] < 0.05
    assert like_real["class_consistency"] > 0.9 and "class_consistency" not in noise
    # Features instead of images give the same numbers.
    from_feats = GenerationMetrics(bars_evaluator, bars_evaluator.features(val.images), 300)
    assert from_feats(train.images[:300]) == pytest.approx(
        {k: v for k, v in like_real.items() if k != "class_consistency"}
    )
    with pytest.raises(ValueError, match="fewer than num_samples=300"):
        metrics(train.images[:100])
    with pytest.raises(ValueError, match=r"labels must hold one label per image: 310 fake_images, "
                                         r"labels \(10,\)"):
        metrics(train.images[:310], labels=train.labels[:10])


def test_an_evaluator_trains_on_batches_of_two_or_more():
    """BatchNorm needs two samples: batch_size 1 skipped every batch and cached an untrained net."""
    with pytest.raises(ValueError, match="batch_size must be >= 2, got 1"):
        evaluator_mod.TrainConfig(batch_size=1).validate()


# ---------------------------------------------------------------- masks and labels: shapes


def blur(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """A k x k box blur (edges replicated): shapes turn into soft blobs and the noise goes."""
    w = torch.ones(x.shape[1], 1, k, k) / (k * k)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (k // 2,) * 4, mode="replicate"),
                                      w, groups=x.shape[1])


class Unmasked:
    """A dataset without its masks: images and labels only, what the v1 evaluator trained on."""

    def __init__(self, data):
        import dataclasses

        self.data = data
        self.info = dataclasses.replace(data.info, num_seg_classes=0, seg_class_names=())

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.data[i]
        return {"image": item["image"], "label": item["label"]}


def test_each_feature_group_has_total_variance_1_on_the_training_images(bars, bars_evaluator):
    feats = bars_evaluator.features(bars[0].images).double()
    assert bars_evaluator.feature_groups == tuple(d for _, d in FEATURE_GROUPS)
    for (name, _), group in zip(FEATURE_GROUPS, feats.split(bars_evaluator.feature_groups, 1),
                                strict=True):
        assert float(group.var(0).sum()) == pytest.approx(1.0, rel=1e-3), name
        assert float(group.mean(0).abs().max()) < 1e-3, name
    assert feats.shape[1] == FEATURE_DIM


def test_a_dataset_with_masks_and_labels_trains_both():
    data = ShapesDataset("train", size=16, num_samples=64)
    ev = train_evaluator(data, evaluator_mod.TrainConfig(epochs=1))
    assert ev.mode == "masks+labels" and ev.num_labels == 3
    out = ev.net(data.images[:5])
    assert out["seg"].shape == (5, 4, 16, 16)  # 16x16 images: segmented at full resolution
    assert out["logits"].shape == (5, 3) and ev.predict(data.images[:5]).shape == (5,)
    assert ev.meta["classifier_input"] in ("shares", "probe", "probe+shares")
    assert set(ev.meta["classifier_cv_accuracy"]) == {"shares", "probe", "probe+shares"}
    # a masks-only dataset: a segmenter, no classifier
    masks_only = Unlabelled(data)
    ev = train_evaluator(masks_only, evaluator_mod.TrainConfig(epochs=1))
    assert ev.mode == "masks" and ev.num_labels == 0 and ev.features(data.images[:3]).shape == (
        3, FEATURE_DIM)
    with pytest.raises(ValueError, match="trained on 'masks' .*cannot predict labels"):
        ev.predict(data.images[:3])


class Unlabelled(Unmasked):
    """A dataset without its labels: images and masks only."""

    def __init__(self, data):
        import dataclasses

        self.data = data
        self.info = dataclasses.replace(data.info, num_labels=0, label_names=())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.data[i]
        return {"image": item["image"], "mask": item["mask"]}


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset("train", num_samples=1000), ShapesDataset("val", num_samples=300)


@pytest.fixture(scope="module")
def shapes_evaluator(shapes, cache_dir) -> Evaluator:
    return get_evaluator(shapes[0], "shapes-test", cache_dir=cache_dir, epochs=8)


@pytest.mark.slow
def test_shapes_evaluator_learns_masks_and_labels(shapes, shapes_evaluator):
    """1000 training images (the default run has 4000 and names 0.95-0.96 of the labels)."""
    train, val = shapes
    ev = shapes_evaluator
    assert ev.mode == "masks+labels"
    # the classifier input is the cross-validated best of the probe and the pixel shares
    scores = ev.meta["classifier_cv_accuracy"]
    assert ev.meta["classifier_input"] == max(scores, key=scores.get)
    with torch.no_grad():
        seg = ev.net(val.images)["seg"].argmax(1)  # one cell per 2x2 pixels at 32x32
    target = val.masks[:, ::2, ::2].long()
    shape = target > 0
    assert (seg[shape] == target[shape]).double().mean() > 0.6  # the kind of shape pixels
    assert ev.accuracy_on(val) > 0.7  # chance: about 1/3


@pytest.mark.slow
def test_features_separate_blurred_from_real_images(shapes, shapes_evaluator):
    """Blurred real images (what the GAN's textured blobs look like) against real ones lie more
    than 10x the real-vs-real FID apart in the evaluator's grouped features (measured 14x with
    1000 training images; the deepest block of a labels-only net gave 30x in the same setting,
    so this does not show the new features see blur better than the old ones did: the C2ST
    is the metric that calls blur out, tests/plugins/test_c2st.py)."""
    train, val = shapes
    groups = shapes_evaluator.feature_groups
    feats = shapes_evaluator.features

    def fid(a, b):
        return grouped_frechet_distance(a, b, groups)

    real_a, real_b = feats(train.images[:300]), feats(val.images)
    assert fid(real_b, feats(blur(val.images))) > 10 * fid(real_a, real_b)


def test_the_cache_name_follows_the_arch_version(tmp_path, monkeypatch):
    data = BarsDataset(40, size=8, seed=0)
    old = get_evaluator(data, "v", cache_dir=tmp_path, epochs=1)
    monkeypatch.setattr(evaluator_mod, "ARCH_VERSION", evaluator_mod.ARCH_VERSION + 1)
    new = get_evaluator(data, "v", cache_dir=tmp_path, epochs=1)
    assert new.cache_path != old.cache_path and old.cache_path.exists()
    assert new.meta["arch_version"] == evaluator_mod.ARCH_VERSION
    # an older version's file under the new name is not trusted
    new.cache_path.write_bytes(old.cache_path.read_bytes())
    with pytest.warns(RuntimeWarning, match=r"arch_version \d+ != \d+; retraining"):
        get_evaluator(data, "v", cache_dir=tmp_path, epochs=1)


class StubGenerator(torch.nn.Module):
    """A stand-in generative head: real training images of the label asked for (a perfect
    conditional generator), optionally passed through ``transform``."""

    def __init__(self, data, start: int, transform=None) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where the metrics run
        self.images, self.labels = data.images[start:], data.labels[start:]
        self.transform = transform or (lambda x: x)

    def sample(self, n, labels=None, generator=None):
        if labels is None:
            return self.transform(self.images[:n])
        picks, used = [], {}
        for k in labels.tolist():
            pool = (self.labels == k).nonzero().flatten()
            picks.append(int(pool[used.get(k, 0) % len(pool)]))
            used[k] = used.get(k, 0) + 1
        return self.transform(self.images[picks])


@pytest.mark.slow
def test_head_metrics_come_beside_their_real_baselines(shapes, shapes_evaluator, monkeypatch):
    """Real images of the asked label score like the real-vs-real baseline; blurred ones do not;
    the per-epoch call leaves out the C2ST and the baselines, and the baseline is computed once."""
    train, val = shapes
    monkeypatch.setattr(gm_mod, "get_evaluator", lambda *a, **k: shapes_evaluator)
    monkeypatch.setattr(gm_mod, "_REFERENCES", type(gm_mod._REFERENCES)())
    calls = []
    c2st = gm_mod.c2st_accuracy
    monkeypatch.setattr(gm_mod, "c2st_accuracy", lambda *a: calls.append(1) or c2st(*a))
    datasets = {"train": train, "val": val}
    real = head_generation_metrics(StubGenerator(train, 300), datasets, "val", 300, seed=0,
                                   conditional=True)
    metrics = ("fid", "precision", "recall", "class_consistency", "c2st")
    assert set(real) == {*metrics, *(f"{k}_real" for k in metrics)}
    # the baseline: train[:300] against val[:300]; class consistency of real images = accuracy
    assert real["class_consistency_real"] == pytest.approx(shapes_evaluator.accuracy_on(val))
    assert abs(real["c2st_real"] - 0.5) < 0.1 and real["precision_real"] > 0.6
    assert real["fid"] < 2 * real["fid_real"] and abs(real["c2st"] - 0.5) < 0.1
    assert real["class_consistency"] > 0.7
    blobs = head_generation_metrics(StubGenerator(train, 300, blur), datasets, "val", 300,
                                    seed=0, conditional=True)
    assert {k: blobs[k] for k in blobs if k.endswith("_real")} == {
        k: real[k] for k in real if k.endswith("_real")}
    assert blobs["fid"] > 8 * blobs["fid_real"] and blobs["c2st"] > 0.9, blobs
    assert blobs["precision"] < blobs["precision_real"] and blobs["recall"] < blobs["recall_real"]
    assert len(calls) == 3  # the real baseline's C2ST once, then one per final call
    per_epoch = head_generation_metrics(StubGenerator(train, 300, blur), datasets, "val", 300,
                                        seed=0, conditional=True, final=False)
    assert per_epoch == {k: blobs[k] for k in ("fid", "precision", "recall", "class_consistency")}
    assert len(calls) == 3
    unconditional = head_generation_metrics(StubGenerator(train, 300), datasets, "val", 300,
                                            seed=0, conditional=False)
    assert "class_consistency" not in unconditional
    assert "class_consistency_real" not in unconditional
