"""Tests for the built-in datasets: shapes (procedural), digits (sklearn) and image folders."""

from __future__ import annotations

import math
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtcore.data import DatasetInfo, image_pixels
from mtcore_datasets.digits import MASK_THRESHOLD, DigitsDataset
from mtcore_datasets.image_folder import ImageFolderDataset
from mtcore_datasets.shapes import ShapesDataset


def _check_item(item: dict, info: DatasetInfo) -> None:
    """The dataset contract: dtypes, shapes and value ranges of one item."""
    image = item["image"]
    assert image.dtype == torch.float32
    assert image.shape == (info.channels, *info.image_size)
    assert 0.0 <= image.min() and image.max() <= 1.0
    if info.has_masks:
        mask = item["mask"]
        assert mask.dtype == torch.int64 and mask.shape == info.image_size
        valid = mask[mask != info.ignore_index]
        assert valid.min() >= 0 and valid.max() < info.num_seg_classes
    else:
        assert "mask" not in item
    if info.has_labels:
        label = item["label"]
        assert label.dtype == torch.int64 and label.shape == ()
        assert 0 <= label < info.num_labels
    else:
        assert "label" not in item


def _image_keys(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


# ----------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_items_follow_the_contract(channels):
    ds = ShapesDataset(size=16, num_samples=12, channels=channels)
    assert len(ds) == 12
    assert ds.info.num_seg_classes == 4 and ds.info.num_labels == 3
    assert ds.info.label_names == ("circle", "square", "triangle")
    for i in range(len(ds)):
        _check_item(ds[i], ds.info)


def test_shapes_default_split_sizes():
    assert len(ShapesDataset("val", size=8)) == 500
    assert len(ShapesDataset("test", size=8)) == 500


def test_shapes_deterministic_by_seed_and_seeds_differ():
    a = ShapesDataset(num_samples=20, seed=3)
    b = ShapesDataset(num_samples=20, seed=3)
    c = ShapesDataset(num_samples=20, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.masks, c.masks)
    assert not _image_keys(a.images) & _image_keys(c.images)


def test_shapes_splits_are_disjoint():
    keys = {
        s: _image_keys(ShapesDataset(s, num_samples=200).images) for s in ("train", "val", "test")
    }
    assert all(len(k) == 200 for k in keys.values())
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]


def test_shapes_label_is_kind_with_most_mask_pixels():
    ds = ShapesDataset(num_samples=300, seed=1)
    for i in range(len(ds)):
        item = ds[i]
        counts = [int((item["mask"] == kind).sum()) for kind in (1, 2, 3)]
        assert max(counts) > 0, "every image shows at least one shape"
        best = max(range(3), key=lambda k: (counts[k], -k))  # most pixels, lower kind on ties
        assert item["label"].item() == best
    # Every kind shows up as the label often (no kind dominates the "largest" rule).
    assert torch.bincount(ds.labels, minlength=3).min() > 60


def test_shapes_count_bounds_and_single_shape_geometry():
    ds = ShapesDataset(size=64, num_samples=150, seed=2, min_shapes=1, max_shapes=1)
    fills = {1: [], 3: []}
    for mask in ds.masks.long():
        kinds = torch.unique(mask[mask > 0]).tolist()
        assert len(kinds) == 1
        kind = kinds[0]
        ys, xs = torch.nonzero(mask == kind, as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        if kind in fills:
            fills[kind].append(((mask == kind).sum() / box).item())
    # A disc fills pi/4 of its bounding box; an equilateral triangle at most about half of it.
    assert abs(np.mean(fills[1]) - math.pi / 4) < 0.04
    assert np.median(fills[3]) < 0.6


def test_shapes_scale_with_image_size():
    small = ShapesDataset(size=32, num_samples=50, seed=5)
    large = ShapesDataset(size=64, num_samples=50, seed=5)
    # Same layout at double resolution: pixel (i, j) of 32 is the centre of block (2i, 2j) of 64.
    down = large.masks[:, ::2, ::2]
    agree = (down == small.masks).float().mean().item()
    assert agree > 0.9
    assert (small.labels == large.labels).float().mean() > 0.9


def test_shapes_num_samples_by_split():
    """A table sizes each split; a split it leaves out keeps its default size."""
    sizes = {"train": 30}
    assert len(ShapesDataset("train", size=16, num_samples=sizes)) == 30
    assert len(ShapesDataset("val", size=16, num_samples=sizes)) == 500
    # the same split and seed draw the same first images whatever the table says of other splits
    a = ShapesDataset("val", size=16, num_samples={"val": 20, "train": 5})
    b = ShapesDataset("val", size=16, num_samples=20)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "training"}, "split must be one of"),
        ({"size": 4}, "size must be an int >= 8"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": {"train": 0}}, "got 0 for 'train'"),
        ({"num_samples": {"trian": 10}}, r"unknown split\(s\) \['trian'\]"),
        ({"min_shapes": 3, "max_shapes": 2}, "min_shapes"),
        ({"channels": 2}, "channels"),
        ({"seed": -1}, "seed"),
        ({"min_radius": "0.1"}, r"min_radius and max_radius .* got '0.1', 0.26"),
    ],
)
def test_shapes_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**kwargs)


# ----------------------------------------------------------------------------------- digits

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def sk_digits():
    bunch = sklearn_datasets.load_digits()
    return bunch.data, bunch.target


def test_digits_match_sklearn_at_native_size(sk_digits):
    data, target = sk_digits
    seen = []
    for split in ("train", "val", "test"):
        ds = DigitsDataset(split, size=8, val_fraction=0.2, test_fraction=0.1)
        idx = ds.indices.numpy()
        assert np.array_equal(ds.labels.numpy(), target[idx])
        np.testing.assert_allclose(ds.images[:, 0].reshape(len(ds), 64).numpy() * 16, data[idx])
        _check_item(ds[0], ds.info)
        seen.append(idx)
    all_idx = np.concatenate(seen)
    assert len(all_idx) == len(target) == 1797
    assert np.array_equal(np.sort(all_idx), np.arange(1797))  # disjoint and complete
    # Stratified: each digit's val share is val_fraction to within one image.
    val = DigitsDataset("val", size=8, val_fraction=0.2, test_fraction=0.1)
    for digit in range(10):
        n = int((target == digit).sum())
        assert abs(int((val.labels == digit).sum()) - 0.2 * n) <= 1


def test_digits_resized_bilinear_with_threshold_mask(sk_digits):
    data, _ = sk_digits
    ds = DigitsDataset("val", size=20, channels=3)
    assert ds.images.shape[1:] == (3, 20, 20)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])
    for j in range(5):
        src = (data[ds.indices[j].item()].reshape(8, 8) / 16).astype(np.float32)
        ref = np.asarray(Image.fromarray(src, mode="F").resize((20, 20), Image.BILINEAR))
        got = ds.images[j, 0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
        clear = np.abs(ref - MASK_THRESHOLD) > 1e-4
        assert np.array_equal(ds.masks[j].numpy()[clear], (ref >= MASK_THRESHOLD)[clear])
        _check_item(ds[j], ds.info)
    assert 0.1 < ds.masks.float().mean() < 0.6  # the mask is a digit, not empty or everything


def test_digits_seeded_split():
    a, b = DigitsDataset("val", size=8, seed=1), DigitsDataset("val", size=8, seed=1)
    c = DigitsDataset("val", size=8, seed=2)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)


def test_digits_errors(monkeypatch):
    with pytest.raises(ValueError, match="split 'test' is empty"):
        DigitsDataset("test", size=8)
    with pytest.raises(ValueError, match="split must be one of"):
        DigitsDataset("dev")
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataset(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"val_fraction='0.2'"):
        DigitsDataset(val_fraction="0.2")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now fails
    with pytest.raises(ImportError, match=re.escape("pip install 'mtcore[digits]'")):
        DigitsDataset()


# ----------------------------------------------------------------------------- image folder

COLOURS = [(200, 10, 30), (0, 128, 255), (90, 90, 90), (255, 255, 0), (10, 220, 120)]


def _image(path: Path, colour=(0, 0, 0), size=(8, 6)) -> None:
    """Write a flat-colour RGB image of ``size`` (W, H), so any resize keeps the colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _mask(path: Path, values: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(values.astype(np.uint8)).save(path)
    elif mode == "P":
        img = Image.new("P", (values.shape[1], values.shape[0]))
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
        img.putdata(values.flatten().tolist())
        img.save(path)
    else:
        Image.fromarray(values.astype(np.uint8)).save(path)  # an [H, W, 3] colour array


def _halves(right: int, left: int = 0, size=(8, 6)) -> np.ndarray:
    """Mask [H, W]: left half ``left``, right half ``right``."""
    w, h = size
    values = np.full((h, w), left, dtype=np.int64)
    values[:, w // 2 :] = right
    return values


def _csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("filename,label\n" + "".join(f"{a},{b}\n" for a, b in rows))


def _folder(root: Path, n=5, masks=True, labels=True) -> Path:
    """n flat-colour images img<i>.png; mask i right half = i % 3 + 1; label i = i % 2."""
    for i in range(n):
        _image(root / "images" / f"img{i}.png", COLOURS[i % len(COLOURS)])
        if masks:
            _mask(root / "masks" / f"img{i}.png", _halves(i % 3 + 1))
    if labels:
        _csv(root / "labels.csv", [(f"img{i}.png", i % 2) for i in range(n)])
    return root


def test_image_folder_loads_images_masks_labels(tmp_path):
    root = _folder(tmp_path, n=5)
    train = ImageFolderDataset(root, "train", size=4, val_fraction=0.4)
    val = ImageFolderDataset(root, "val", size=4, val_fraction=0.4)
    assert (len(train), len(val)) == (3, 2)
    names = [p.name for p in train.files + val.files]
    assert sorted(names) == [f"img{i}.png" for i in range(5)]
    assert train.info.num_seg_classes == 4  # inferred: max mask value 3, + 1
    assert train.info.num_labels == 2 and val.info == train.info
    for ds in (train, val):
        for j, path in enumerate(ds.files):
            i = int(path.stem[3:])
            item = ds[j]
            _check_item(item, ds.info)
            expected = torch.tensor(COLOURS[i], dtype=torch.float32) / 255
            torch.testing.assert_close(item["image"], expected.view(3, 1, 1).expand(3, 4, 4))
            want = torch.zeros(4, 4, dtype=torch.int64)
            want[:, 2:] = i % 3 + 1  # nearest resize keeps the halves
            assert torch.equal(item["mask"], want)
            assert item["label"].item() == i % 2


def test_image_folder_seeded_split(tmp_path):
    root = _folder(tmp_path, n=20, masks=False, labels=False)
    a = ImageFolderDataset(root, "val", seed=0, size=4)
    b = ImageFolderDataset(root, "val", seed=0, size=4)
    c = ImageFolderDataset(root, "val", seed=1, size=4)
    assert a.files == b.files and len(a.files) == 4
    assert a.files != c.files
    train = ImageFolderDataset(root, "train", seed=0, size=4)
    assert not set(train.files) & set(a.files) and len(train) == 16
    assert not a.info.has_masks and not a.info.has_labels
    _check_item(a[0], a.info)
    with pytest.raises(ValueError, match="only 'train' and 'val' exist"):
        ImageFolderDataset(root, "test")


def test_image_folder_split_subfolders_share_class_counts(tmp_path):
    _image(tmp_path / "train/images/a.png")
    _mask(tmp_path / "train/masks/a.png", _halves(1))
    _image(tmp_path / "val/images/b.png")
    _mask(tmp_path / "val/masks/b.png", _halves(4))
    train = ImageFolderDataset(tmp_path, "train", size=(3, 5), channels=1)
    val = ImageFolderDataset(tmp_path, "val", size=(3, 5), channels=1)
    assert [p.name for p in train.files] == ["a.png"] and [p.name for p in val.files] == ["b.png"]
    assert train.info.num_seg_classes == val.info.num_seg_classes == 5
    assert train[0]["image"].shape == (1, 3, 5)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "test"))):
        ImageFolderDataset(tmp_path, "test")


def test_image_folder_palette_and_index_masks(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    _image(tmp_path / "images/rgb.png")
    colour = np.zeros((6, 8, 3), dtype=np.uint8)
    colour[:, 4:] = (0, 255, 0)  # class 2
    colour[0, 0] = (255, 0, 0)  # class 1
    _mask(tmp_path / "masks/rgb.png", colour, mode="RGB")
    _image(tmp_path / "images/pal.png")
    _mask(tmp_path / "masks/pal.png", _halves(1, left=2), mode="P")
    ds = ImageFolderDataset(tmp_path, "train", size=(6, 8), val_fraction=0.0, palette=palette)
    assert ds.info.num_seg_classes == 3
    masks = {p.stem: ds[j]["mask"] for j, p in enumerate(ds.files)}
    want_rgb = torch.as_tensor(_halves(2))
    want_rgb[0, 0] = 1
    assert torch.equal(masks["rgb"], want_rgb)
    assert torch.equal(masks["pal"], torch.as_tensor(_halves(1, left=2)))  # indices, not colours
    with pytest.raises(ValueError, match=r"rgb\.png is an RGB colour image.*palette"):
        ImageFolderDataset(tmp_path, val_fraction=0.0)
    colour[2, 3] = (1, 2, 3)
    _mask(tmp_path / "masks/rgb.png", colour, mode="RGB")
    with pytest.raises(ValueError, match=r"rgb\.png has colour \(1, 2, 3\).*not in palette"):
        ImageFolderDataset(tmp_path, val_fraction=0.0, palette=palette)


def test_image_folder_ignore_value_passes_through(tmp_path):
    _image(tmp_path / "images/a.png")
    _mask(tmp_path / "masks/a.png", _halves(255, left=1))
    ds = ImageFolderDataset(tmp_path, size=(6, 8), val_fraction=0.0, num_seg_classes=2)
    assert ds.info.num_seg_classes == 2 and ds.info.ignore_index == 255
    assert torch.equal(ds[0]["mask"], torch.as_tensor(_halves(255, left=1)))


def test_image_folder_label_names(tmp_path):
    for i in range(3):
        _image(tmp_path / f"images/p{i}.jpg", COLOURS[i])
    _csv(tmp_path / "labels.csv", [("p0.jpg", "dog"), ("p1.jpg", "cat"), ("p2.jpg", 0)])
    ds = ImageFolderDataset(tmp_path, val_fraction=0.0, label_names=["cat", "dog"])
    assert ds.info.label_names == ("cat", "dog") and ds.info.num_labels == 2
    assert [ds[j]["label"].item() for j in range(3)] == [1, 0, 0]
    with pytest.raises(ValueError, match=r"unknown label name 'dog' for 'p0\.jpg'"):
        ImageFolderDataset(tmp_path, val_fraction=0.0, label_names=["cat", "cow"])
    with pytest.raises(ValueError, match=r"labels\.csv line 2: unknown label name 'dog'"):
        ImageFolderDataset(tmp_path, val_fraction=0.0)


def _expect(root: Path, match: str, **kwargs) -> None:
    kwargs.setdefault("val_fraction", 0.0)
    with pytest.raises(ValueError, match=match):
        ImageFolderDataset(root, **kwargs)


def test_image_folder_errors_name_the_file(tmp_path):
    root = _folder(tmp_path / "missing_mask", n=2)
    (root / "masks/img1.png").unlink()
    _expect(root, r"missing mask for image .*img1\.png")

    root = _folder(tmp_path / "orphan_mask", n=2)
    _mask(root / "masks/ghost.png", _halves(1))
    _expect(root, r"mask .*ghost\.png has no image")

    root = _folder(tmp_path / "unreadable", n=2, masks=False)
    (root / "images/img1.png").write_bytes(b"not a png")
    _expect(root, r"unreadable image .*img1\.png")

    root = _folder(tmp_path / "mask_size", n=2)
    _mask(root / "masks/img0.png", np.zeros((5, 8)))
    _expect(root, r"mask .*img0\.png is 8x5 \(WxH\) but its image .*img0\.png is 8x6")

    root = _folder(tmp_path / "mask_value", n=3)  # values 0..3
    _expect(root, r"mask .*img2\.png has value 3, outside 0\.\.2", num_seg_classes=3)

    root = _folder(tmp_path / "label_range", n=2, masks=False)
    _csv(root / "labels.csv", [("img0.png", 0), ("img1.png", 2)])
    _expect(root, r"line 3: label 2 for 'img1\.png' is out of range", label_names=["a", "b"])
    _csv(root / "labels.csv", [("img0.png", 0), ("img1.png", -1)])
    _expect(root, r"label -1 for 'img1\.png' is out of range")

    root = _folder(tmp_path / "csv_extra", n=2, masks=False)
    _csv(root / "labels.csv", [("img0.png", 0), ("img1.png", 1), ("gone.png", 1)])
    _expect(root, r"line 4: row for a missing file 'gone\.png'")

    root = _folder(tmp_path / "csv_short", n=2, masks=False)
    _csv(root / "labels.csv", [("img0.png", 0)])
    _expect(root, r"image .*img1\.png is missing from .*labels\.csv")

    (tmp_path / "empty/images").mkdir(parents=True)
    _expect(tmp_path / "empty", r"empty folder: no images .* found in .*empty[/\\]images")
    _expect(tmp_path / "nothing_here", r"is not a directory")


ORIENTATION = 0x0112  # the EXIF tag


def _photo(path: Path, pixels: np.ndarray, orientation: int) -> None:
    """Save uint8 [H, W, 3] ``pixels`` as stored data, with an EXIF orientation tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


@pytest.mark.parametrize("orientation,turns", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_open_image_turns_a_picture_upright(tmp_path, orientation, turns):
    from mtcore.plugin import open_image

    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # every pixel distinct
    _photo(tmp_path / "p.png", stored, orientation)
    # EXIF 3: turned 180 degrees; 6: a quarter clockwise to view; 8: a quarter anticlockwise
    want = np.rot90(stored, k=turns)
    got = np.asarray(open_image(tmp_path / "p.png").convert("RGB"))
    assert got.shape == want.shape and np.array_equal(got, want)


def test_open_image_names_an_unreadable_file(tmp_path):
    from mtcore.plugin import DataError, open_image

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"unreadable image .*bad\.jpg"):
        open_image(tmp_path / "bad.jpg")


@pytest.mark.parametrize("preload", [True, False])
def test_image_folder_reads_photos_upright_so_masks_drawn_on_them_line_up(tmp_path, preload):
    # stored 8 wide x 4 high: left half red, right half blue; EXIF 6 shows it a quarter turned
    # clockwise, 4 wide x 8 high, red on top; the mask was drawn on that view: 1 on top, 2 below
    stored = np.zeros((4, 8, 3), dtype=np.uint8)
    stored[:, :4] = (255, 0, 0)
    stored[:, 4:] = (0, 0, 255)
    _photo(tmp_path / "images/photo.png", stored, 6)
    upright_mask = np.ones((8, 4), dtype=np.int64)
    upright_mask[4:] = 2
    _mask(tmp_path / "masks/photo.png", upright_mask)
    item = ImageFolderDataset(tmp_path, "train", size=(8, 4), val_fraction=0.0,
                              preload=preload)[0]  # no resize
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    assert torch.equal(item["image"][:, :4], red.view(3, 1, 1).expand(3, 4, 4))
    assert torch.equal(item["image"][:, 4:], blue.view(3, 1, 1).expand(3, 4, 4))
    assert torch.equal(item["mask"], torch.from_numpy(upright_mask))
    # a mask saved in the stored orientation is named, with why
    _mask(tmp_path / "masks/photo.png", np.ones((4, 8)))
    _expect(tmp_path, r"mask .*photo\.png is 8x4 \(WxH\) but its image .*photo\.png is 4x8 "
            r"\(turned a quarter: images are read upright", preload=preload)


def test_upright_size_reads_the_header_as_open_image_turns_the_picture(tmp_path, monkeypatch):
    from PIL import ImageFile

    from mtcore.plugin import open_image, upright_size

    stored = np.zeros((4, 6, 3), dtype=np.uint8)
    want = {}
    for orientation in range(1, 9):
        for suffix in (".jpg", ".png"):
            path = tmp_path / f"p{orientation}{suffix}"
            _photo(path, stored, orientation)
            want[path] = open_image(path).size
            assert want[path] == ((4, 6) if orientation >= 5 else (6, 4))
    Image.fromarray(stored).save(tmp_path / "plain.png")  # no EXIF: Pillow's PNG would decode
    want[tmp_path / "plain.png"] = (6, 4)
    # EXIF after the pixel data (an eXIf chunk before IEND), which the header does not show
    png = (tmp_path / "plain.png").read_bytes()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = (len(payload).to_bytes(4, "big") + b"eXIf" + payload
             + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big"))
    end = png.rindex(b"IEND") - 4
    (tmp_path / "tail.png").write_bytes(png[:end] + chunk + png[end:])
    want[tmp_path / "tail.png"] = open_image(tmp_path / "tail.png").size
    assert want[tmp_path / "tail.png"] == (4, 6)

    def no_decoding(self):
        raise AssertionError("upright_size decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for path, size in want.items():
        assert upright_size(path) == size, path


def test_image_folder_reads_files_on_demand_exactly_as_it_preloads_them(tmp_path, monkeypatch):
    import mtcore_datasets.image_folder as image_folder

    root = _folder(tmp_path, n=6)
    g = torch.Generator().manual_seed(0)
    for i in range(6):  # textured pictures of two sizes, so resizing matters
        size = (12, 9) if i % 2 else (8, 6)
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        _mask(root / "masks" / f"img{i}.png", _halves(i % 3 + 1, size=size))
    eager = ImageFolderDataset(root, "train", size=5, val_fraction=0.0, preload=True)
    lazy = ImageFolderDataset(root, "train", size=5, val_fraction=0.0, preload=False)
    auto = ImageFolderDataset(root, "train", size=5, val_fraction=0.0)
    assert eager.preloaded and not lazy.preloaded and auto.preloaded  # 6 small items fit
    monkeypatch.setattr(image_folder, "PRELOAD_LIMIT", 6 * 5 * 5 * 4 - 1)  # one byte short
    assert not ImageFolderDataset(root, "train", size=5, val_fraction=0.0).preloaded
    assert len(lazy) == len(eager) == 6 and lazy.info == eager.info
    for i in range(6):
        a, b = eager[i], lazy[i]
        assert a.keys() == b.keys() == {"image", "mask", "label"}
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (i, key)
        # the preloaded pixels are the file's, resized as image_pixels does
        want = image_pixels(Image.open(eager.files[i]), 3, (5, 5))
        assert torch.equal(a["image"], torch.from_numpy(want.copy()).permute(2, 0, 1) / 255)
    loader = torch.utils.data.DataLoader(lazy, batch_size=3, num_workers=2)  # decoded in workers
    batches = list(loader)
    assert torch.equal(torch.cat([b["image"] for b in batches]),
                       torch.stack([eager[i]["image"] for i in range(6)]))


def test_image_folder_on_demand_names_a_bad_mask_when_it_is_read(tmp_path):
    root = _folder(tmp_path, n=3)  # mask values 1..3
    lazy = ImageFolderDataset(root, "train", val_fraction=0.0, num_seg_classes=3, preload=False)
    assert [int(lazy[i]["mask"].max()) for i in (0, 1)] == [1, 2]  # these fit
    with pytest.raises(ValueError, match=r"mask .*img2\.png has value 3, outside 0\.\.2"):
        lazy[2]
    # sizes are checked from the headers at construction, preloading or not
    _mask(root / "masks/img1.png", np.zeros((5, 8)))
    _expect(root, r"mask .*img1\.png is 8x5 \(WxH\) but its image", preload=False)
    _expect(root, r"preload must be true, false or \"auto\", got 'yes'", preload="yes")
    _expect(root, r"preload must be true, false or \"auto\", got 1", preload=1)
    # and every image opens (its header), masks or none
    bare = _folder(tmp_path / "bare", n=3, masks=False)
    (bare / "images/img1.png").write_bytes(b"not a png")
    _expect(bare, r"unreadable image .*img1\.png", preload=False)


def test_image_folder_class_names_name_the_segmentation_classes(tmp_path):
    root = _folder(tmp_path, n=3)  # mask values 0..3
    names = ["sky", "road", "car", "person"]
    ds = ImageFolderDataset(root, "train", val_fraction=0.0, class_names=names)
    assert ds.info.seg_class_names == tuple(names) and ds.info.num_seg_classes == 4
    plain = ImageFolderDataset(root, "train", val_fraction=0.0)
    assert plain.info.seg_class_names == ("class_0", "class_1", "class_2", "class_3")
    _expect(root, r"class_names has 4 names but num_seg_classes gives 5 classes",
            class_names=names, num_seg_classes=5)
    _expect(root, r"class_names has 2 names but the palette's colours gives 3 classes",
            class_names=["a", "b"], palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    _expect(root, r"class_names must be a list of distinct names", class_names=["a", "a"])
    # too few names for the masks' values: the value is named with the class count
    _expect(root, r"has value 3, outside 0\.\.2 \(num_seg_classes=3\)", class_names=names[:3])
    bare = _folder(tmp_path / "bare", n=2, masks=False)
    _expect(bare, r"num_seg_classes/palette/class_names given but .* does not exist",
            class_names=names)


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_grey_pictures_are_scaled_to_eight_bits_not_clipped(tmp_path, channels):
    levels = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")  # a 16-bit grey PNG
    image = Image.open(tmp_path / "deep.png")
    assert image.mode.startswith("I")
    got = image_pixels(image, channels, (2, 4))  # no resize
    want = np.round(levels / 65535 * 255).astype(np.uint8)  # 0, 1, 128, 255 / 4, 78, 156, 234
    assert np.array_equal(got, np.repeat(want[..., None], channels, axis=2))


def test_image_folder_bad_arguments(tmp_path):
    root = _folder(tmp_path, n=2)
    _expect(root, "split must be one of", split="dev")
    _expect(root, "channels", channels=4)
    _expect(root, "size must be", size=(4,))
    _expect(root, "size must be", size=0)
    _expect(root, "palette must be", palette=[[1, 2]])
    no_masks = _folder(tmp_path / "plain", n=2, masks=False, labels=False)
    _expect(no_masks, "masks does not exist", num_seg_classes=3)
    _expect(no_masks, r"labels\.csv does not exist", label_names=["a"])


def test_image_folder_from_a_config(tmp_path):
    """The registry calls factory(split, **params): the class takes root first, so the dataset
    could not be named in a config at all ("has no parameter 'root'")."""
    import mtcore
    from mtcore.errors import ConfigError

    root = _folder(tmp_path / "data", n=10)
    dataset = f'data.dataset={{name="image_folder", params={{root="{root}", size=8}}}}'
    exp = mtcore.build(None, [dataset, "tasks.vae.enabled=false", "tasks.gan.enabled=false",
                              'tasks.cls.head={name="classification", params={pool="avgmax", '
                              'from_task=""}}', "model.backbone.params.width=8"],
                       splits=("train", "val"))
    assert exp.info.num_seg_classes == 4 and exp.info.num_labels == 2
    assert exp.info.image_size == (8, 8)
    with pytest.raises(ConfigError, match="has no parameter 'sise'.*Did you mean 'size'"):
        mtcore.build(None, [dataset.replace("size=8", "sise=8")], splits=("train",))
