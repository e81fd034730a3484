"""A real third-party plugin: built and pip-installed from a temp dir, listed, then uninstalled."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "mtcore-acme-test"
version = "0.3.1"

[project.entry-points.mtcore]
acme = "mtcore_acme_test"
"""

MODULE = '''
"""A tiny third-party mtcore plugin: one backbone and one balancer."""
from torch import nn
from mtcore.plugin import Backbone, BackboneSpec, BalancerSpec, FeatureInfo, LossBalancer, hookimpl


class Stem(Backbone):
    def __init__(self, in_channels, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.feature_info = (FeatureInfo("s1", width, 1),)

    def forward(self, x):
        return {"s1": self.conv(x)}


class Half(LossBalancer):
    def weights(self, losses):
        return {k: 0.5 for k in self.task_names}


@hookimpl
def mtcore_backbones():
    yield BackboneSpec("acme_stem", Stem, "One 3x3 conv.")
    yield BackboneSpec("unet", Stem, "A name the built-ins use too.")


@hookimpl
def mtcore_balancers():
    yield BalancerSpec("half", Half, "Every weight 0.5.")
'''


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_installed_plugin_shows_up_and_works(tmp_path):
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (tmp_path / "mtcore_acme_test.py").write_text(MODULE)
    r = _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        out = subprocess.run([sys.executable, "-m", "mtcore.cli.main", "plugins", "--json"],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        data = json.loads(out)
        acme = [p for p in data["plugins"] if p["name"] == "acme"]
        assert acme == [{"name": "acme", "distribution": "mtcore-acme-test", "version": "0.3.1",
                         "module": "mtcore_acme_test", "builtin": False}]
        backbones = {c["name"]: c for c in data["components"]["backbone"]}
        assert backbones["acme_stem"]["plugin"] == "acme"
        assert "half" in {c["name"] for c in data["components"]["balancer"]}
        # a non-built-in plugin can be disabled
        out = subprocess.run([sys.executable, "-m", "mtcore.cli.main", "--disable-plugin",
                              "mtcore-acme-test", "plugins", "--json"],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        data = json.loads(out)
        assert "acme_stem" not in {c["name"] for c in data["components"]["backbone"]}
        assert data["disabled"] == [{"name": "acme", "distribution": "mtcore-acme-test"}]
        # its "unet" does not take the built-in's bare name (the default config keeps meaning
        # the built-in U-Net, with a warning); "acme:unet" picks the plugin's
        code = ("import sys; from mtcore.registry import Registry; "
                "print(Registry().resolve('backbone', sys.argv[1]).plugin.name)")
        for name, want in (("unet", "backbones"), ("acme:unet", "acme")):
            r = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [want]
            shadowed = "using mtcore's built-in one; also provided by mtcore-acme-test 0.3.1"
            assert (shadowed in r.stderr) == (name == "unet"), r.stderr
    finally:
        r = _pip("uninstall", "-y", "-q", "mtcore-acme-test")
        assert r.returncode == 0, r.stderr
