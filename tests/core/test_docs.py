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
