"""Every hook has a docs section and a docstring with an example (datasette's rule)."""

from pathlib import Path

import pytest

from mtcore import hookspecs
from mtcore.specs import KINDS

DOCS = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", [h for h, _ in KINDS.values()])
def test_hook_is_documented(hook):
    assert f"\n## {hook}\n" in DOCS
    doc = getattr(hookspecs, hook).__doc__
    assert "Called when" in doc and "@hookimpl" in doc


def test_every_hookspec_is_a_kind():
    hooks = {n for n in dir(hookspecs) if n.startswith("mtcore_")}
    assert hooks == {h for h, _ in KINDS.values()}


def test_the_complete_plugin_example_trains(tmp_path):
    """docs/plugins.md's example task, run as written: registered in process next to the
    installed plugins, added to a small default run, trained for an epoch."""
    import re
    import types

    import mtcore
    from mtcore.plugin_manager import default_manager
    from mtcore.registry import Registry
    from mtcore.trainer import Trainer

    section = DOCS.split("## A complete example")[1].split("\n## ")[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    module = types.ModuleType("acme_mtcore_plugin")
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)  # noqa: S102 - our own docs
    pm = default_manager()
    pm.register(module, "acme")
    exp = mtcore.build(None, [
        "data.dataset.params.size=16", "data.dataset.params.num_samples=48", "data.batch_size=16",
        "tasks.vae.enabled=false", "tasks.gan.enabled=false", "model.backbone.params.width=8",
        'tasks.cov={head={name="coverage"}, loss={name="coverage_l1"}}', "optim.epochs=1",
        "train.samples_every=0", 'kernels="reference"'], registry=Registry(pm))
    lines: list[str] = []
    result = Trainer(exp, tmp_path, progress=False, log=lines.append).fit()
    assert 0.0 <= result["metrics"]["cov.mae"] <= 1.0
    assert any("cov.mae=" in line for line in lines if line.startswith("epoch 1/1"))
    # its predictions: the head's own output, one number per image, as a CSV column
    import csv

    import torch
    from PIL import Image

    from mtcore.predict import predict_files
    image = tmp_path / "in" / "one.png"
    image.parent.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    preds, _ = predict_files(exp.model, exp.info, exp.device, [image], tmp_path / "pred")
    cov = preds["cov"]["coverage"]
    with torch.no_grad():
        x = (torch.tensor([200.0, 30.0, 30.0]) / 255).view(1, 3, 1, 1).expand(1, 3, 16, 16)
        assert torch.equal(cov.value, exp.model({"image": x}, ["cov"])["cov"]["coverage"])
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        (row,) = csv.DictReader(fh)
    assert float(row["cov.coverage"]) == pytest.approx(float(cov.value[0]), rel=1e-5)


def test_every_built_in_balancer_has_a_row_in_docs_balancers():
    from mtcore.registry import Registry

    table = (Path(__file__).parents[2] / "docs" / "balancers.md").read_text()
    names = sorted(p.spec.name for p in Registry().available("balancer") if p.plugin.builtin)
    assert {"equal", "pcgrad", "cagrad", "nash_mtl", "gradnorm", "dwa"} <= set(names)
    missing = [n for n in names if f"\n| `{n}` |" not in table]
    assert not missing, f"docs/balancers.md has no table row for {missing}"


def test_the_readmes_own_images_config_builds_as_it_says(tmp_path):
    """README "Train on your own images": its config on a folder of that layout builds the
    default four tasks; with other labels the default cascade is refused, naming the fix the
    README gives, and that fix builds; without masks, so does training without segmentation."""
    import re

    import numpy as np
    from PIL import Image

    import mtcore
    from mtcore.config import load_toml
    from mtcore.errors import IncompatibleComponentsError

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Train on your own images", 1)[1].split("\n## ", 1)[0]
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    root = tmp_path / "photos"
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(np.full((8, 8), i % 3, np.uint8)).save(root / "masks" / f"{i}.png")
    labels = root / "labels.csv"
    labels.write_text("filename,label\n" + "".join(f"{i}.png,{'cat' if i % 2 else 'dog'}\n"
                                                   for i in range(4)))
    config = tmp_path / "photos.toml"
    config.write_text(toml.replace('root = "photos"', f'root = "{root.as_posix()}"'))
    assert load_toml(config)["data"]["dataset"]["name"] == "image_folder"
    exp = mtcore.build(config)
    assert list(exp.model.heads) == ["seg", "cls", "vae", "gan"]
    assert exp.info.seg_class_names == ("background", "cat", "dog")

    labels.write_text("filename,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4)))
    config.write_text(config.read_text().replace(', label_names = ["cat", "dog"]', ""))
    with pytest.raises(IncompatibleComponentsError, match=r'pool = "avgmax", from_task = ""'):
        mtcore.build(config)
    own = re.search(r"--set '(tasks\.cls\.head\.params=\{.*?\})'", section).group(1)
    assert list(mtcore.build(config, [own]).model.heads) == ["seg", "cls", "vae", "gan"]
    for f in (root / "masks").iterdir():
        f.unlink()
    (root / "masks").rmdir()
    config.write_text(config.read_text().replace(
        ', class_names = ["background", "cat", "dog"]', ""))
    noise_gan = re.search(r"--set '(tasks\.gan\.head=\{.*?\})'", section).group(1)
    with pytest.raises(IncompatibleComponentsError, match="has no masks.*" + re.escape(noise_gan)):
        mtcore.build(config, [own, "tasks.seg.enabled=false"])
    exp = mtcore.build(config, [own, "tasks.seg.enabled=false", noise_gan])
    assert list(exp.model.heads) == ["cls", "vae", "gan"]
