"""Plugin manager and registry with throwaway in-process plugins and a fresh manager per test."""

from __future__ import annotations

import types
import warnings

import pytest

from mtcore.errors import ComponentClashError, ComponentNotFoundError, ConfigError, PluginError
from mtcore.plugin import BackboneSpec, DatasetSpec, hookimpl
from mtcore.plugin_manager import PluginInfo, PluginManager, PluginWarning
from mtcore.registry import Registry


def _factory(in_channels, width=8):
    return ("built", in_channels, width)


def make_plugin(name="acme", specs=("tiny",)):
    mod = types.ModuleType(name)

    @hookimpl
    def mtcore_backbones():
        return [BackboneSpec(n, _factory, f"{n} backbone", defaults={"width": 4}) for n in specs]

    mod.mtcore_backbones = mtcore_backbones
    return mod


@pytest.fixture
def pm(monkeypatch):
    monkeypatch.delenv("MTCORE_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("MTCORE_DISABLE_PLUGINS", raising=False)
    return PluginManager()


def test_components_are_stamped_with_their_plugin(pm):
    pm.register(make_plugin(), PluginInfo("acme", "acme-mt", "1.2"))
    (p,) = pm.provided("backbone")
    assert p.spec.name == "tiny" and p.plugin.distribution == "acme-mt" and p.plugin.version == "1.2"


def test_build_merges_defaults_and_params(pm):
    pm.register(make_plugin(), "acme")
    reg = Registry(pm)
    assert reg.build("backbone", "tiny", {}, 3) == ("built", 3, 4)
    assert reg.build("backbone", "tiny", {"width": 16}, 3) == ("built", 3, 16)


def test_unknown_param_names_key_and_suggests(pm):
    pm.register(make_plugin(), "acme")
    with pytest.raises(ConfigError, match=r"model\.backbone\.params\.widht.*Did you mean 'width'"):
        Registry(pm).build("backbone", "tiny", {"widht": 2}, 3, key="model.backbone")


def test_positional_argument_is_not_a_user_param(pm):
    pm.register(make_plugin(), "acme")
    with pytest.raises(ConfigError, match="in_channels"):
        Registry(pm).build("backbone", "tiny", {"in_channels": 2}, 3)


def test_unknown_name_lists_closest_and_available(pm):
    pm.register(make_plugin(specs=("tiny", "small")), "acme")
    with pytest.raises(ComponentNotFoundError) as exc:
        Registry(pm).spec("backbone", "tinny")
    msg = str(exc.value)
    assert "Did you mean 'tiny'" in msg and "Available backbones: small, tiny" in msg


def test_clash_is_reported_on_use_naming_both_providers(pm):
    pm.register(make_plugin("a"), PluginInfo("a", "pkg-a", "1.0"))
    pm.register(make_plugin("b", specs=("tiny", "other")), PluginInfo("b", "pkg-b", "2.0"))
    reg = Registry(pm)
    assert reg.spec("backbone", "other").name == "other"  # the clash does not break other names
    with pytest.raises(ComponentClashError) as exc:
        reg.spec("backbone", "tiny")
    msg = str(exc.value)
    assert "pkg-a 1.0" in msg and "pkg-b 2.0" in msg and "'a:tiny'" in msg and "'b:tiny'" in msg


def test_a_built_in_keeps_its_bare_name_with_a_warning(pm):
    """Installing a plugin that reuses a built-in's name must not break (or silently change) a
    config that names the built-in: the bare name stays the built-in's, with a warning that names
    the other provider and the qualified name that picks it; between plugins it stays a clash."""
    pm.register(make_plugin("core"), PluginInfo("core", "mtcore", "0.1", builtin=True))
    pm.register(make_plugin("acme"), PluginInfo("acme", "acme-mt", "1.0"))
    reg = Registry(pm)
    with pytest.warns(PluginWarning, match=r"backbone 'tiny': using mtcore's built-in one; also "
                      r"provided by acme-mt 1.0 \(plugin 'acme'\), which 'acme:tiny' picks"):
        assert reg.resolve("backbone", "tiny").plugin.name == "core"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a qualified name is no clash: no warning
        assert reg.resolve("backbone", "acme:tiny").plugin.name == "acme"
        assert reg.resolve("backbone", "core:tiny").plugin.name == "core"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per registry, not at every use
        assert reg.resolve("backbone", "tiny").plugin.name == "core"
    pm.register(make_plugin("b"), PluginInfo("b", "pkg-b", "2.0"))
    with pytest.warns(PluginWarning, match="acme-mt 1.0 .* and pkg-b 2.0 .*'acme:tiny' or 'b:tiny'"):
        assert Registry(pm).resolve("backbone", "tiny").plugin.name == "core"


def test_qualified_name_always_resolves(pm):
    pm.register(make_plugin("a"), PluginInfo("a", "pkg-a", "1.0"))
    pm.register(make_plugin("b"), PluginInfo("b", "pkg-b", "2.0"))
    reg = Registry(pm)
    assert reg.resolve("backbone", "b:tiny").plugin.name == "b"
    assert reg.resolve("backbone", "pkg-a:tiny").plugin.name == "a"
    with pytest.raises(ComponentNotFoundError, match="from provider 'c'"):
        reg.resolve("backbone", "c:tiny")


def test_hook_that_raises_is_isolated_with_one_warning(pm):
    bad = types.ModuleType("bad")

    @hookimpl
    def mtcore_backbones():
        raise RuntimeError("boom")

    bad.mtcore_backbones = mtcore_backbones
    pm.register(bad, PluginInfo("bad", "bad-dist", "0.1"))
    pm.register(make_plugin(), "good")
    with pytest.warns(PluginWarning, match=r"plugin 'bad' \(bad-dist 0.1\): hook mtcore_backbones "
                      r"raised RuntimeError: boom; its backbones are left out \(its other hooks"):
        names = [p.spec.name for p in pm.provided("backbone")]
    assert names == ["tiny"]
    # the plugin itself stays loaded (its other hooks work): reported as partial, not as failed
    assert [i.name for i, _ in pm.report.partial] == ["bad"] and pm.report.failed == []
    assert "bad" in {p.name for p in pm.plugins}


def test_a_name_yielded_twice_by_one_plugin_is_reported(pm):
    """Not even 'acme:tiny' could choose between the two, so the hook's specs are left out with
    a warning naming the name (it used to be a clash whose suggested fix was the same clash)."""
    pm.register(make_plugin("acme", specs=("tiny", "tiny", "small")), "acme")
    pm.register(make_plugin("other", specs=("big",)), "other")
    with pytest.warns(PluginWarning, match="yields the backbone name 'tiny' more than once"):
        names = [p.spec.name for p in pm.provided("backbone")]
    assert names == ["big"]


def test_unknown_loss_message_spells_the_plural(pm):
    pm.load_entrypoints()
    with pytest.raises(ComponentNotFoundError, match="Available losses: "):
        Registry(pm).spec("loss", "no_such_loss")


def test_unknown_name_in_a_config_names_the_key():
    import mtcore

    with pytest.raises(ComponentNotFoundError,
                       match=r"^tasks\.seg\.head\.name: unknown head 'segmentaton'.*"
                             r"Did you mean 'segmentation'"):
        mtcore.build(None, ['tasks.seg.head.name="segmentaton"'], splits=("train",))
    with pytest.raises(ComponentNotFoundError, match=r"^model\.backbone\.name: unknown backbone"):
        mtcore.build(None, ['model.backbone.name="unett"'], splits=("train",))


def test_a_factory_that_cannot_take_what_mtcore_passes_blames_the_plugin(pm):
    """A head factory without the ``loss`` keyword (or a backbone one without ``in_channels``)
    is the plugin's bug: say so, naming the plugin and the argument, before calling it."""
    from mtcore.plugin import HeadSpec

    def no_loss_head(features, info, width=4):
        raise AssertionError("not called")

    def no_channels_backbone(*, width=4):
        raise AssertionError("not called")

    mod = types.ModuleType("acme")
    mod.mtcore_heads = hookimpl(lambda: [HeadSpec("h", no_loss_head, "a head")])
    mod.mtcore_backbones = hookimpl(lambda: [BackboneSpec("b", no_channels_backbone, "a backbone")])
    pm.register(mod, PluginInfo("acme", "acme-mt", "0.3"))
    reg = Registry(pm)
    with pytest.raises(PluginError, match=r"head 'h' of plugin 'acme' \(acme-mt 0.3\): its factory "
                                          r"'.*no_loss_head'\(features, info, width=4\) does not "
                                          r"take the keyword argument 'loss'"):
        reg.build("head", "h", {}, key="tasks.t.head", features={}, info=None, loss=None)
    with pytest.raises(PluginError, match="does not take 1 positional argument"):
        reg.build("backbone", "b", {}, 3, key="model.backbone")


def test_hook_returning_wrong_spec_type_is_reported(pm):
    bad = types.ModuleType("bad")

    @hookimpl
    def mtcore_backbones():
        return [DatasetSpec("d", _factory, "a dataset")]

    bad.mtcore_backbones = mtcore_backbones
    pm.register(bad, "bad")
    with pytest.warns(PluginWarning, match="must yield BackboneSpec"):
        assert pm.provided("backbone") == []


def test_misspelt_hook_is_reported_not_ignored(pm):
    bad = types.ModuleType("typo")

    @hookimpl
    def mtcore_backbone():  # missing the trailing s
        return []

    bad.mtcore_backbone = mtcore_backbone
    with pytest.warns(PluginWarning, match=r"unknown hook mtcore_backbone .*misspelt"):
        assert pm.register(bad, "typo") is False
    assert [p.name for p in pm.plugins] == []


def test_strict_mode_turns_plugin_problems_into_errors(monkeypatch):
    monkeypatch.setenv("MTCORE_STRICT_PLUGINS", "1")
    pm = PluginManager()
    bad = types.ModuleType("typo")

    @hookimpl
    def mtcore_dataset():
        return []

    bad.mtcore_dataset = mtcore_dataset
    with pytest.raises(PluginError, match="MTCORE_STRICT_PLUGINS=1"):
        pm.register(bad, "typo")


def test_entry_points_load_first_party_plugins(pm):
    pm.load_entrypoints()
    builtins = {p.name for p in pm.plugins if p.builtin}
    assert {"backbones", "tasks", "balancers", "transfer", "datasets"} <= builtins
    reg = Registry(pm)
    for kind, name in [("backbone", "unet"), ("head", "segmentation"), ("loss", "dice"),
                       ("balancer", "uncertainty"), ("transfer", "scratch"), ("dataset", "shapes")]:
        assert reg.spec(kind, name).name == name


def test_builtins_cannot_be_disabled(monkeypatch):
    monkeypatch.setenv("MTCORE_DISABLE_PLUGINS", "tasks")
    pm = PluginManager()
    with pytest.warns(PluginWarning, match="cannot disable built-in plugin 'tasks'"):
        pm.load_entrypoints()
    assert "tasks" in {p.name for p in pm.plugins}


def test_disabling_an_unknown_plugin_warns(monkeypatch):
    monkeypatch.setenv("MTCORE_DISABLE_PLUGINS", "nosuchplugin")
    with pytest.warns(PluginWarning, match="names no installed plugin: nosuchplugin"):
        PluginManager().load_entrypoints()


def test_duplicate_registration_is_an_error(pm):
    pm.register(make_plugin(), "acme")
    with pytest.raises(PluginError, match="already registered"):
        pm.register(make_plugin(), "acme")


def test_spec_validation():
    with pytest.raises(ValueError, match="reserved"):
        BackboneSpec("a:b", _factory, "x")
    with pytest.raises(ValueError, match="one non-empty line"):
        BackboneSpec("ok", _factory, "two\nlines")
    with pytest.raises(TypeError, match="callable"):
        BackboneSpec("ok", 3, "x")
    spec = BackboneSpec("ok", _factory, "x", defaults={"a": 1})
    with pytest.raises(TypeError):
        spec.defaults["a"] = 2  # frozen


def test_no_warnings_from_a_clean_install(pm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.load_entrypoints()
        for kind in ("backbone", "head", "loss", "balancer", "transfer", "dataset"):
            assert pm.provided(kind)


class _FakeDist:
    metadata = {"Name": "broken-dist"}
    version = "9.9"


class _FakeEntryPoint:
    name = "broken"
    value = "broken_pkg.plugin"
    dist = _FakeDist()

    def load(self):
        raise ImportError("No module named 'broken_pkg'")


def test_an_entry_point_reusing_a_builtin_name_is_the_one_skipped(pm, monkeypatch):
    """Whatever order the environment lists entry points in, the built-in 'tasks' loads and a
    third-party entry point of that name is skipped (it could hide the built-in heads before)."""
    import importlib.metadata as md

    class Impostor(_FakeEntryPoint):
        name = "tasks"
        value = "impostor.plugin"

        def load(self):
            return make_plugin("impostor", specs=("x",))

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points",
                        lambda group: [Impostor(), *reversed(list(real(group=group)))])
    with pytest.warns(PluginWarning, match=r"plugin 'tasks' \(broken-dist 9.9\) skipped: another "
                                           "plugin is already registered as 'tasks'"):
        pm.load_entrypoints()
    tasks = next(p for p in pm.plugins if p.name == "tasks")
    assert tasks.builtin
    assert Registry(pm).spec("head", "segmentation").name == "segmentation"


def test_plugin_that_fails_to_import_is_skipped_with_one_warning(pm, monkeypatch):
    import importlib.metadata as md

    real = md.entry_points

    def fake(group):
        return [*real(group=group), _FakeEntryPoint()]

    monkeypatch.setattr(md, "entry_points", fake)
    with pytest.warns(PluginWarning) as record:
        pm.load_entrypoints()
    msgs = [str(w.message) for w in record]
    assert msgs == ["plugin 'broken' (broken-dist 9.9) skipped: failed to import "
                    "'broken_pkg.plugin': ImportError: No module named 'broken_pkg'"]
    assert "unet" in {p.spec.name for p in pm.provided("backbone")}  # the rest still loads
    assert pm.report.failed[0][0].name == "broken"


def test_first_party_plugins_import_only_the_public_api():
    """plugins/ uses mtcore.plugin (and mtcore.kernels, the fused ops) only, as a third-party
    package would: everything a plugin needs must be exported there."""
    import ast
    from pathlib import Path

    allowed = {"mtcore.plugin", "mtcore.kernels"}
    root = Path(__file__).resolve().parents[2] / "plugins"
    bad = []
    files = sorted(root.rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = ([f"mtcore.{a.name}" for a in node.names] if node.module == "mtcore"
                        else [node.module])
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            bad += [f"{path.relative_to(root)}:{node.lineno} {m}" for m in mods
                    if (m == "mtcore" or m.startswith("mtcore.")) and m not in allowed
                    and not any(m.startswith(a + ".") for a in allowed)]
    assert bad == []


@pytest.mark.parametrize("override,match", [
    ('balancer.name="fixed"', r"^balancer\.params\.weights: required by balancer 'fixed' \(it "
                              "has no default\\)"),
    ('transfer={name="features"}', r"^transfer\.params\.checkpoint: required by transfer"),
    ('model.backbone.params.width="8"', r"^model\.backbone \(backbone 'unet'\): .*width must be "
                                        "an int >= 1, got '8'"),
])
def test_a_components_own_parameter_error_names_the_config_key(override, match):
    """A missing required parameter, or a value the component itself rejects (ValueError or
    TypeError), is a one-line ConfigError naming the key; they printed a traceback."""
    import mtcore

    with pytest.raises(ConfigError, match=match) as exc:
        mtcore.build(None, ["data.dataset.params.num_samples=16", override], splits=("train",))
    assert "\n" not in str(exc.value)
