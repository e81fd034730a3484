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
