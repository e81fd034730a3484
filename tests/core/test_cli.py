"""The command line: version, help on every command, plugin listing, one-line user errors."""

from __future__ import annotations

import json

import pytest

from mtcore import __version__
from mtcore.cli.main import COMMANDS, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtcore {__version__}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: mtcore {command}" in capsys.readouterr().out


def test_plugins_json_lists_a_component_of_every_kind(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for kind, name in [("backbone", "unet"), ("head", "gan"), ("loss", "focal"),
                       ("balancer", "equal"), ("transfer", "finetune"), ("dataset", "shapes")]:
        entry = next(c for c in data["components"][kind] if c["name"] == name)
        assert entry["summary"] and entry["plugin"]
    assert all(p["distribution"] == "mtcore" for p in data["plugins"] if p["builtin"])


def test_plugins_text(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "losses:" in out and "unet" in out and "[built-in]" in out


def test_config_prints_resolved_toml(capsys):
    assert main(["config", "--set", "optim.lr=0.5"]) == 0
    assert "lr = 0.5" in capsys.readouterr().out


def test_user_error_is_one_line_and_exits_2(capsys):
    assert main(["config", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtcore: error: config key 'optim.lrr' is unknown")
    assert "\n" not in err and "Traceback" not in err


def test_debug_shows_the_exception(capsys):
    from mtcore.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "config", "--set", "optim.lrr=1"])


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_foreign_checkpoint_is_refused(tmp_path, capsys):
    import torch

    p = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, p)
    assert main(["sample", "--checkpoint", str(p)]) == 2
    assert "is not an mtcore checkpoint" in capsys.readouterr().err


def test_a_checkpoint_without_a_runs_records_is_named(tmp_path, capsys):
    """Pre-trained weights saved as an mtcore checkpoint serve finetune, not eval or resume."""
    import torch

    p = tmp_path / "weights.pt"
    torch.save({"format": "mtcore", "version": 1, "model": {}, "config": {}}, p)
    assert main(["eval", "--checkpoint", str(p)]) == 2
    assert "lacks epoch, global_step, history, rng" in capsys.readouterr().err


def test_bad_out_paths_fail_before_any_work(tmp_path, capsys, monkeypatch):
    import mtcore.api

    def no_work(*args, **kwargs):
        raise AssertionError("the command worked before checking --out")

    monkeypatch.setattr(mtcore.api, "evaluate", no_work)
    monkeypatch.setattr(mtcore.api, "sample", no_work)
    (tmp_path / "afile").write_text("")
    ckpt = str(tmp_path / "c.pt")
    cases = [(["train", "--out", str(tmp_path / "afile" / "run")], "afile is a file; give a folder"),
             (["eval", "--checkpoint", ckpt, "--out", str(tmp_path)], "is a folder; give a file"),
             (["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "afile" / "m.json")],
              "afile is a file; give a folder"),
             (["sample", "--checkpoint", ckpt, "--out", str(tmp_path / "g.jpgx")],
              "not an image file name Pillow can write")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_checkpoints_are_readable_as_the_umask_says(tmp_path):
    import os

    from mtcore.checkpoint import save_atomic

    old = os.umask(0o022)
    try:
        path = save_atomic({"x": 1}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # as torch.save's own file would be
    os.umask(0o077)
    try:
        path = save_atomic({"x": 2}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    from mtcore.checkpoint import save_atomic

    path = save_atomic({"epoch": 1}, tmp_path / "last.pt")
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_atomic({"epoch": 2, "bad": lambda: None}, path)
    import torch

    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_build_ext_fails_when_the_build_fails(monkeypatch, capsys):
    """The build warns and falls back inside a run; as a command a failed build must fail (it
    printed "built: None" and exited 0, so gpu_check.sh's build step could never fail)."""
    from mtcore import kernels
    from mtcore.kernels import _build

    monkeypatch.setattr(kernels, "build_extensions", lambda verbose=False: None)
    monkeypatch.setattr(_build, "build_error", lambda: "CalledProcessError: g++ exited with 1")
    assert main(["build-ext"]) == 2
    err = capsys.readouterr().err
    assert "kernel build failed: CalledProcessError: g++ exited with 1" in err
    assert "mtcore build-ext --verbose" in err


def test_mtcore_kernels_variable_applies_under_the_default_config(monkeypatch):
    """`kernels = "auto"` (the default) is no choice, so $MTCORE_KERNELS decides; it used to be
    overridden by the config's "auto" (and a bad value was never noticed)."""
    import mtcore
    from mtcore import kernels
    from mtcore.errors import ConfigError

    tiny = ["data.dataset.params.num_samples=16", "data.dataset.params.size=16"]
    try:
        monkeypatch.setenv("MTCORE_KERNELS", "reference")
        mtcore.build(None, tiny, splits=("train",))
        assert kernels.get_backend() == "reference"
        mtcore.build(None, [*tiny, 'kernels="cpp"'], splits=("train",))
        assert kernels.get_backend() == "cpp"  # the config key outranks the variable
        monkeypatch.setenv("MTCORE_KERNELS", "bogus")
        with pytest.raises(ConfigError, match="environment variable MTCORE_KERNELS"):
            mtcore.build(None, tiny, splits=("train",))  # one line from the CLI, no traceback
    finally:
        kernels.set_backend(None)


@pytest.mark.parametrize("argv, prog", [(["bench", "--json"], "mtcore bench"),
                                        (["train", "--epochs", "3"], "mtcore train"),
                                        (["--nope"], "mtcore")])
def test_an_unknown_option_is_reported_by_its_command(argv, prog, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"{prog}: error: unrecognized arguments: {' '.join(argv[1:] or argv)}"
    assert err.startswith(f"usage: {prog} ")
