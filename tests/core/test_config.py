"""Config resolution, overrides and validation errors (each names the key, value and expectation)."""

from __future__ import annotations

import pytest

from mtcore.config import (
    default_config,
    dumps,
    load_toml,
    parse_override,
    resolve_config,
    tomllib,
)
from mtcore.errors import ConfigError


def test_defaults_resolve_and_round_trip(tmp_path):
    cfg = resolve_config()
    assert set(cfg["tasks"]) == {"seg", "cls", "vae", "gan"}
    p = tmp_path / "c.toml"
    p.write_text(dumps(cfg))
    assert resolve_config(load_toml(p)) == cfg


@pytest.mark.parametrize(("item", "path", "value"), [
    ("optim.lr=1e-3", ["optim", "lr"], 1e-3),
    ("data.dataset.name=digits", ["data", "dataset", "name"], "digits"),
    ("optim.betas=[0.5, 0.9]", ["optim", "betas"], [0.5, 0.9]),
    ("train.progress=false", ["train", "progress"], False),
])
def test_parse_override(item, path, value):
    assert parse_override(item) == (path, value)


def test_override_changes_value_and_new_component_name_drops_default_params():
    cfg = resolve_config(None, ["optim.lr=0.01", "model.backbone.name=resnet"])
    assert cfg["optim"]["lr"] == 0.01
    assert cfg["model"]["backbone"] == {"name": "resnet"}
    cfg = resolve_config(None, ["model.backbone.params.width=8"])
    assert cfg["model"]["backbone"]["params"] == {**default_config()["model"]["backbone"]["params"],
                                                  "width": 8}


def test_file_tasks_replace_default_tasks_and_set_can_disable():
    cfg = resolve_config({"tasks": {"only": {"head": {"name": "classification"}}}})
    assert list(cfg["tasks"]) == ["only"]
    cfg = resolve_config(None, ["tasks.gan.enabled=false"])
    assert "gan" not in cfg["tasks"]
    # --set of the whole table replaces the task set as a file's [tasks] does; a later
    # --set tasks.NAME... adds or changes a task on top
    cfg = resolve_config(None, ['tasks={only={head={name="classification"}}}',
                                'tasks.seg={head={name="segmentation"}}'])
    assert list(cfg["tasks"]) == ["only", "seg"]
    assert cfg["tasks"]["only"]["head"]["name"] == "classification"


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lrr=1"], "config key 'optim.lrr' is unknown. Did you mean 'optim.lr'?"),
    (["optim.lr=-1"], "optim.lr: expected a number > 0, got -1"),
    (["optim.epochs=1.5"], "optim.epochs: expected an integer >= 1, got 1.5"),
    (["train.amp=fp8"], "train.amp: expected one of 'none', 'bf16', 'fp16', got 'fp8'"),
    (["seed=true"], "seed: expected an integer >= 0, got True"),
    (["device=gpu"], "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["tasks.seg.head.nam=x"], "tasks.seg.head.nam: unknown key; a component table has only"),
    (["tasks.seg.head.name=3"], "tasks.seg.head.name: expected the name of a head"),
    (["optim.betas=[0.5]"], "optim.betas: expected a list of two numbers"),
    (["tasks.x.loss.name=dice"], "tasks.x.head: missing"),
    (["optim"], "--set 'optim': expected KEY=VALUE"),
])
def test_validation_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as exc:
        resolve_config(None, overrides)
    assert message in str(exc.value)


def test_all_tasks_disabled_is_an_error():
    sets = [f"tasks.{t}.enabled=false" for t in ("seg", "cls", "vae", "gan")]
    with pytest.raises(ConfigError, match="no task is enabled"):
        resolve_config(None, sets)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [")
    with pytest.raises(ConfigError, match=r"bad\.toml.*not valid TOML"):
        load_toml(bad)


def test_config_cannot_name_an_import_path():
    from mtcore.errors import ComponentNotFoundError
    from mtcore.experiment import build_experiment

    with pytest.raises(ComponentNotFoundError, match="unknown backbone 'os.system'"):
        build_experiment({"model": {"backbone": {"name": "os.system"}}}, splits=())


def test_a_preset_is_its_overrides_before_the_users(capsys):
    """`--preset quality` resolves as its listed overrides would, and --set still wins."""
    from mtcore.cli.main import main
    from mtcore.config import preset_overrides, presets

    assert "quality" in presets()
    want = resolve_config(None, preset_overrides("quality"))
    assert want["optim"]["epochs"] == 40  # the preset trains 4x the default's 10 epochs
    assert main(["config", "--preset", "quality"]) == 0
    assert tomllib.loads(capsys.readouterr().out) == want
    assert main(["config", "--preset", "quality", "--set", "optim.epochs=3"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["optim"]["epochs"] == 3
    with pytest.raises(ConfigError, match="--preset 'nope': no such preset; presets: quality"):
        preset_overrides("nope")
