"""Inference on new images (mtcore.predict, ``mtcore predict``): the files' predictions against the
model run by hand on the same pixels, the files written, task selection and input errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mtcore
from mtcore.cli.main import main
from mtcore.errors import DataError
from mtcore.predict import class_colours

TINY = [
    "data.dataset.params.size=16", "data.dataset.params.num_samples=48", "data.batch_size=16",
    "data.eval_batch_size=48", "model.backbone.params.width=8", "tasks.vae.head.params.width=8",
    "tasks.gan.head.params.width=8", "tasks.gan.head.params.d_width=8", "train.progress=false",
    "optim.epochs=1", "kernels=\"reference\"", 'train.gen_metrics="none"', "train.samples_every=0",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    mtcore.fit(mtcore.build(None, TINY), out)
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three RGB PNGs: two at the model's 16x16, one at 32x32 (resized on the way in) whose
    masks come back at 32x32."""
    d = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, size in enumerate((16, 32, 16)):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        if size == 32:  # 2x2 blocks: the bilinear 16x16 resize is their mean
            arr = arr[::2, ::2].repeat(2, 0).repeat(2, 1)
        Image.fromarray(arr).save(d / f"img{i}.png")
        paths.append(d / f"img{i}.png")
    return paths


def _by_hand(ckpt, paths):
    """The checkpoint's model on the files' pixels, loaded and resized without mtcore.predict."""
    trainer = mtcore.load(ckpt, splits=())
    x = torch.stack([torch.from_numpy(np.array(
        Image.open(p).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))).permute(2, 0, 1)
        for p in paths]).float() / 255
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model({"image": x})
    return x, out, trainer.exp.info


def test_predict_from_files_is_the_model_on_those_pixels(ckpt, files):
    x, out, info = _by_hand(ckpt, files)
    preds = mtcore.predict(ckpt, files)
    assert sorted(preds) == ["cls", "seg", "vae"]  # the GAN predicts nothing from an image
    mask = preds["seg"]["mask"]
    assert mask.kind == "mask" and mask.names == info.seg_class_names
    assert torch.equal(mask.value, out["seg"]["logits"].argmax(1))
    label = preds["cls"]["label"]
    probs = torch.softmax(out["cls"]["logits"].float(), 1)
    assert label.kind == "label" and label.names == info.label_names
    assert torch.equal(label.value, probs.argmax(1))
    torch.testing.assert_close(label.scores, probs)
    recon = preds["vae"]["reconstruction"]
    assert recon.kind == "image"
    torch.testing.assert_close(recon.value, out["vae"]["recon"])
    # the same from a tensor; a folder gives its images in name order
    again = mtcore.predict(ckpt, x)
    assert torch.equal(again["seg"]["mask"].value, mask.value)
    folder = mtcore.predict(ckpt, [files[0].parent], tasks=["seg"])
    assert list(folder) == ["seg"] and torch.equal(folder["seg"]["mask"].value, mask.value)
    # files read two at a time: the same predictions, joined in order
    pairs = mtcore.predict(ckpt, files, batch_size=2)
    for task, by_name in preds.items():
        for name, pred in by_name.items():
            torch.testing.assert_close(pairs[task][name].value, pred.value)
    with pytest.raises(DataError, match="batch_size must be >= 1, got 0"):
        mtcore.predict(ckpt, files, batch_size=0)


def test_cli_writes_masks_at_the_image_size_labels_and_images(ckpt, files, tmp_path, capsys):
    _, out, info = _by_hand(ckpt, files)
    dest = tmp_path / "pred"
    # two files a batch: the second batch streams into the same CSV
    assert main(["predict", "--checkpoint", str(ckpt), "--out", str(dest), "--batch-size", "2",
                 *map(str, files)]) == 0
    assert "predicted 3 image(s)" in capsys.readouterr().out
    want = out["seg"]["logits"].argmax(1)
    for i, p in enumerate(files):
        png = Image.open(dest / f"{p.stem}.seg.mask.png")
        assert png.mode == "P"
        got = torch.from_numpy(np.array(png).astype(np.int64))
        expect = want[i] if i != 1 else want[i].repeat_interleave(2, 0).repeat_interleave(2, 1)
        assert torch.equal(got, expect)  # pixel value = class index, at the file's own size
        palette = np.array(png.getpalette()[:12]).reshape(4, 3)
        assert palette.tolist() == [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25]]
        rec = np.array(Image.open(dest / f"{p.stem}.vae.reconstruction.png"))
        expect_rec = (out["vae"]["recon"][i].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        assert rec.shape == (16, 16, 3) and np.array_equal(rec, expect_rec.numpy())
    with open(dest / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    probs = torch.softmax(out["cls"]["logits"].float(), 1)
    assert [r["file"] for r in rows] == [str(p) for p in files]
    for r, pr in zip(rows, probs, strict=True):
        k = int(pr.argmax())
        assert (r["cls.label"], int(r["cls.label.index"])) == (info.label_names[k], k)
        assert float(r["cls.label.score"]) == pytest.approx(float(pr[k]), abs=1e-4)
    assert json.loads((dest / "classes.json").read_text()) == {
        "seg.mask": list(info.seg_class_names), "cls.label": list(info.label_names)}


def test_bad_inputs_are_clear_errors(ckpt, files, tmp_path, capsys):
    with pytest.raises(DataError, match="no such file or folder"):
        mtcore.predict(ckpt, [tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder with no images"):
        mtcore.predict(ckpt, [tmp_path / "empty"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"unreadable image .*bad\.png"):
        mtcore.predict(ckpt, [tmp_path / "bad.png"])
    with pytest.raises(DataError, match=r"float \[N, 3, 16, 16\].*got torch.float32 of shape "
                                        r"\(2, 3, 8, 8\)"):
        mtcore.predict(ckpt, torch.rand(2, 3, 8, 8))
    with pytest.raises(DataError, match="'gan'.*predict from an image are seg, cls, vae"):
        mtcore.predict(ckpt, files, tasks=["gan"])
    other = tmp_path / "other"
    other.mkdir()
    Image.open(files[0]).save(other / files[0].name)
    assert main(["predict", "--checkpoint", str(ckpt), str(files[0]), str(other / files[0].name),
                 "--out", str(tmp_path / "o")]) == 2
    assert "two inputs share the name 'img0'" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(ckpt), str(files[0]), "--batch-size", "0"]) == 2
    assert "--batch-size: expected a positive number, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_forward_of_some_tasks_runs_what_they_read(ckpt):
    trainer = mtcore.load(ckpt, splits=())
    trainer.model.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert list(trainer.model({"image": x}, ["cls"])) == ["seg", "cls"]  # the cascade's input
        assert list(trainer.model({"image": x}, ["vae"])) == ["vae"]
        with pytest.raises(ValueError, match="unknown task.*'nope'"):
            trainer.model({"image": x}, ["nope"])


def test_class_colours_are_distinct():
    colours = class_colours(256)
    assert colours.dtype == torch.uint8 and colours.shape == (256, 3)
    assert len({tuple(c) for c in colours.tolist()}) == 256
    assert colours[1].tolist() == [230, 25, 75]


def test_a_checkpoint_predicts_without_its_training_data(tmp_path, files):
    """The checkpoint keeps the dataset's facts (size, channels, class names), so a model
    trained on an image folder predicts after that folder is gone."""
    import shutil

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    g = torch.Generator().manual_seed(1)
    rows = ["filename,label"]
    for i in range(8):
        img = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(root / "images" / f"a{i}.png")
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[:, 8:] = 1 + i % 2
        Image.fromarray(mask).save(root / "masks" / f"a{i}.png")
        rows.append(f"a{i}.png,{'odd' if i % 2 else 'even'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    data = {"dataset": {"name": "image_folder", "params": {
        "root": str(root), "size": 16, "label_names": ["even", "odd"]}}}
    sets = [*TINY[4:], "data.batch_size=4", "data.eval_batch_size=8",
            "tasks.vae.enabled=false", "tasks.gan.enabled=false",
            "tasks.cls.head.params.fixed_map=false"]  # its labels are no segmentation classes
    out = tmp_path / "run"
    mtcore.fit(mtcore.build({"data": data}, sets), out)
    ckpt = out / "checkpoints" / "last.pt"
    before = mtcore.predict(ckpt, files)
    shutil.rmtree(root)
    after = mtcore.predict(ckpt, files)
    assert torch.equal(after["seg"]["mask"].value, before["seg"]["mask"].value)
    assert after["cls"]["label"].names == ("even", "odd")
    assert after["seg"]["mask"].names == ("class_0", "class_1", "class_2")


def test_a_checkpoint_from_before_it_kept_the_dataset_facts_still_loads(ckpt, files, tmp_path):
    state = torch.load(ckpt, weights_only=True)
    del state["info"]  # as written before: the dataset is built again for its facts
    torch.save(state, tmp_path / "old.pt")
    old = mtcore.predict(tmp_path / "old.pt", files)
    assert torch.equal(old["seg"]["mask"].value, mtcore.predict(ckpt, files)["seg"]["mask"].value)


def test_one_path_alone_and_one_task_by_name(ckpt, files):
    one = mtcore.predict(ckpt, str(files[0]), tasks="seg")
    assert list(one) == ["seg"] and one["seg"]["mask"].value.shape == (1, 16, 16)
    both = mtcore.predict(ckpt, files, tasks=["seg"])
    assert torch.equal(one["seg"]["mask"].value[0], both["seg"]["mask"].value[0])
    x, _, _ = _by_hand(ckpt, files)
    as_f64 = mtcore.predict(ckpt, x.double(), tasks=["seg"])  # any float dtype: run in float32
    assert torch.equal(as_f64["seg"]["mask"].value, both["seg"]["mask"].value)
    with pytest.raises(DataError, match="no tasks given"):
        mtcore.predict(ckpt, files, tasks=[])
    with pytest.raises(DataError, match=r"got torch.float32 of shape \(0, 3, 16, 16\)"):
        mtcore.predict(ckpt, torch.rand(0, 3, 16, 16))


def test_a_photo_is_predicted_upright_with_its_mask_at_the_upright_size(ckpt, tmp_path):
    """A phone photo stores its pixels sideways and says so in EXIF (orientation 6: turn a
    quarter clockwise to view): it is predicted as a viewer shows it, and its mask fits that."""
    stored = (torch.rand(16, 32, 3, generator=torch.Generator().manual_seed(1)) * 255)
    stored = stored.to(torch.uint8).numpy()[::2, ::2].repeat(2, 0).repeat(2, 1)  # 2x2 blocks
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # 16 wide, 32 high
    Image.fromarray(upright).save(tmp_path / "plain.png")
    _, out, _ = _by_hand(ckpt, [tmp_path / "plain.png"])
    want = out["seg"]["logits"].argmax(1)[0]
    assert torch.equal(mtcore.predict(ckpt, tmp_path / "photo.png")["seg"]["mask"].value[0], want)
    dest = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--out", str(dest), "--tasks", "seg",
                 str(tmp_path / "photo.png")]) == 0
    png = Image.open(dest / "photo.seg.mask.png")
    assert png.size == (16, 32)  # (width, height) of the upright photo
    assert torch.equal(torch.from_numpy(np.array(png).astype(np.int64)),
                       want.repeat_interleave(2, 0))


def test_cli_refuses_before_writing(ckpt, files, tmp_path, capsys):
    """A bad file in a later batch, an --out that is a file or an input folder, an empty task
    list: each is an error before any output exists."""
    d = tmp_path / "in"
    d.mkdir()
    for f in files[:2]:
        Image.open(f).save(d / f.name)
    (d / "z.png").write_bytes(b"junk")
    argv = ["predict", "--checkpoint", str(ckpt), "--batch-size", "1", str(d)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "unreadable image" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (d / "z.png").unlink()
    assert main([*argv, "--out", str(d)]) == 2
    assert "is a folder of input images" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "o"), "--tasks", ","]) == 2
    assert "no tasks given" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir())[:2] == ["classes.json",
                                                                    "img0.seg.mask.png"]
    assert not (tmp_path / "o" / "predictions.csv.partial").exists()


def test_a_plugins_prediction_is_checked():
    from mtcore.errors import ContractError
    from mtcore.heads import Prediction

    with pytest.raises(ContractError, match="kind must be 'mask', 'label', 'value' or 'image', got 'labels'"):
        Prediction("labels", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ContractError, match=r"value must be integer \[N, H, W\], got torch.float32"):
        Prediction("mask", torch.zeros(2, 4, 4))
    with pytest.raises(ContractError, match=r"value must be float \[N, C, H, W\]"):
        Prediction("image", torch.zeros(2, 4, 4))
    with pytest.raises(ContractError, match=r"value must be float \[N\], got torch.int64"):
        Prediction("value", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ContractError, match="scores are a label's"):
        Prediction("mask", torch.zeros(2, 4, 4, dtype=torch.long), scores=torch.zeros(2, 3))


def test_a_head_whose_prediction_misses_images_is_named(ckpt, monkeypatch):
    from mtcore.errors import ContractError
    from mtcore.heads import Prediction

    trainer = mtcore.load(ckpt, splits=())
    head = trainer.model.heads["seg"]
    monkeypatch.setattr(head, "predictions", lambda out: {
        "mask": Prediction("mask", out["logits"].argmax(1)[:1])})
    from mtcore.predict import run_predictions
    with pytest.raises(ContractError, match=r"task 'seg': predictions\(\)\['mask'\] has 1 entries "
                                            "for a batch of 3 images"):
        run_predictions(trainer.model, torch.rand(3, 3, 16, 16), trainer.device, tasks=["seg"])


def test_the_saved_dataset_facts_are_plain_values(tmp_path):
    from mtcore.checkpoint import info_state, saved_info
    from mtcore.data import DatasetInfo

    info = DatasetInfo("x", np.int64(3), (np.int64(8), 8), num_seg_classes=np.int64(2),
                       seg_class_names=["a", "b"])
    torch.save({"info": info_state(info)}, tmp_path / "c.pt")
    back = saved_info(torch.load(tmp_path / "c.pt", weights_only=True))
    assert back == DatasetInfo("x", 3, (8, 8), num_seg_classes=2, seg_class_names=("a", "b"))
    assert type(back.channels) is int

    class Richer(DatasetInfo):  # a plugin's subclass: only its dataset knows the extra fields
        pass
    assert info_state(Richer("x", 3, (8, 8))) is None
    assert saved_info({"info": None}) is None
    assert saved_info({"info": {**info_state(back), "added_later": 1}}) == back


def test_a_head_that_draws_noise_predicts_alike_however_batched(ckpt, files, tmp_path, monkeypatch):
    """A prediction call draws from one random stream seeded once: an image's noise depends on
    its place in the list, not on the batch size or on which entry point ran it (each batch
    used to restart the stream, so every batch drew the same noise)."""
    from mtcore.heads import Prediction
    from mtcore.predict import predict_files, predict_images, run_predictions

    trainer = mtcore.load(ckpt, splits=())
    head = trainer.model.heads["seg"]
    monkeypatch.setattr(head, "predictions", lambda out: {
        "noise": Prediction("value", torch.rand(out["logits"].shape[0]))})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expect = torch.rand(len(files))  # what one stream from seed 0 gives, image by image
    images = torch.rand(len(files), 3, 16, 16)
    before = torch.get_rng_state()
    for batch_size in (1, 2, 3):
        got = predict_images(trainer.model, trainer.exp.info, trainer.device, files,
                             tasks=["seg"], batch_size=batch_size)["seg"]["noise"].value
        assert torch.equal(got, expect), batch_size
        got = run_predictions(trainer.model, images, trainer.device, tasks=["seg"],
                              batch_size=batch_size)["seg"]["noise"].value
        assert torch.equal(got, expect), batch_size
    predict_files(trainer.model, trainer.exp.info, trainer.device, files, tmp_path / "out",
                  tasks=["seg"], batch_size=1)
    with open(tmp_path / "out" / "predictions.csv") as fh:
        column = [float(r["seg.noise"]) for r in csv.DictReader(fh)]
    assert column == pytest.approx(expect.tolist(), rel=1e-5)  # written with 6 digits
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
