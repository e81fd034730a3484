"""Experiment configs: TOML files validated against one schema, with ``--set key=value`` overrides.

Components are named as ``{name = "...", params = {...}}`` and resolved only through the
registries, never by import path, so loading a config cannot execute code. Every error names the
key path, the bad value and what was expected; unknown keys come with a suggestion.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from mtcore.errors import ConfigError
from mtcore.registry import suggest


@dataclass(frozen=True)
class Key:
    """A leaf of the schema: expected type(s), a check, and what to say when it fails."""

    types: tuple[type, ...]
    expected: str
    check: Callable[[Any], bool] | None = None
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Component:
    """A ``{name, params}`` table naming a component of ``kind``."""

    kind: str


@dataclass(frozen=True)
class TableOf:
    """A table whose keys are user-chosen names (of ``noun``s), each value following ``schema``
    and holding the keys ``required``."""

    schema: dict[str, Any]
    noun: str = "entry"
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListOf:
    """A list whose items each follow ``schema`` (order matters: applied in turn)."""

    schema: Any


def _num(lo: float | None = None, *, strict: bool = False, integer: bool = False) -> Key:
    types = (int,) if integer else (int, float)
    word = "an integer" if integer else "a number"

    def ok(v: Any) -> bool:
        return lo is None or (v > lo if strict else v >= lo)

    rel = "" if lo is None else (f" > {lo}" if strict else f" >= {lo}")
    return Key(types, word + rel, ok)


BOOL = Key((bool,), "true or false")
STR = Key((str,), "a string")
DEVICE = Key((str,), "'auto', 'cpu', 'cuda' or 'cuda:N'",
             lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None)


def _choice(*values: str) -> Key:
    return Key((str,), "one of " + ", ".join(repr(v) for v in values), choices=values)


def _pair() -> Key:
    return Key((list,), "a list of two numbers in [0, 1)",
               lambda v: len(v) == 2 and all(isinstance(x, int | float) and 0 <= x < 1 for x in v))


SCHEDULES = ("constant", "cosine", "step", "onecycle")
GROUP = {
    "lr": _num(0, strict=True), "weight_decay": _num(0), "betas": _pair(),
    "momentum": _num(0), "grad_clip": _num(0), "schedule": _choice(*SCHEDULES),
}

SCHEMA: dict[str, Any] = {
    "seed": _num(0, integer=True),
    "device": DEVICE,
    "kernels": _choice("auto", "reference", "cpp", "cuda", "triton"),
    "data": {
        "dataset": Component("dataset"),
        "batch_size": _num(1, integer=True),
        "eval_batch_size": _num(1, integer=True),
        "num_workers": _num(0, integer=True),
        "val_split": _choice("val", "test"),
        # training-time augmentations, applied in order: [{name = "...", params = {...}}, ...]
        "augment": ListOf(Component("augment")),
    },
    "model": {
        "backbone": Component("backbone"),
        "channels_last": BOOL,
    },
    "tasks": TableOf({
        "enabled": BOOL,
        "head": Component("head"),
        "loss": Component("loss"),
        "optim": GROUP,  # this head's own optimizer settings, over optim.groups.heads
    }, noun="task", required=("head",)),
    "balancer": Component("balancer"),
    "transfer": Component("transfer"),
    "optim": {
        "epochs": _num(1, integer=True),
        "optimizer": _choice("adamw", "adam", "sgd"),
        "lr": _num(0, strict=True),
        "weight_decay": _num(0),
        "betas": _pair(),
        "momentum": _num(0),
        "grad_clip": _num(0),
        "schedule": _choice(*SCHEDULES),
        "warmup_epochs": _num(0),
        "step_size": _num(1, integer=True),
        "gamma": _num(0, strict=True),
        # backbone, heads, balancer, and the heads' auxiliary groups by name (discriminator, or a
        # plugin's own): names no part of the model has are refused when the trainer is built
        "groups": TableOf(GROUP, noun="parameter group"),
    },
    # run loggers by a label of the user's: {name = "tensorboard", params = {...}} each
    "loggers": TableOf(Component("logger"), noun="logger"),
    "train": {
        "amp": _choice("none", "bf16", "fp16"),
        "eval_every": _num(1, integer=True),
        "max_steps_per_epoch": _num(0, integer=True),
        "micro_batch_size": _num(0, integer=True),
        "progress": BOOL,
        "samples_every": _num(0, integer=True),
        "num_samples": _num(1, integer=True),
        "gen_metrics": _choice("none", "final", "every"),
        "gen_metric_samples": _num(16, integer=True),
        "deterministic": BOOL,
        "monitor": STR,
        "monitor_mode": _choice("auto", "max", "min"),
        "patience": _num(0, integer=True),
    },
}


def default_config() -> dict[str, Any]:
    """The built-in default experiment (shapes; U-Net; segmentation, classification, VAE, GAN)."""
    text = resources.files("mtcore.configs").joinpath("default.toml").read_text()
    return tomllib.loads(text)


def presets() -> dict[str, dict[str, Any]]:
    """The named override sets shipped in ``mtcore/configs/presets.toml`` (``--preset NAME``)."""
    text = resources.files("mtcore.configs").joinpath("presets.toml").read_text()
    return tomllib.loads(text)


def preset_overrides(name: str | None) -> list[str]:
    """The ``--set`` overrides of preset ``name`` (none for None); a clear error naming the
    presets for an unknown one."""
    if name is None:
        return []
    known = presets()
    if name not in known:
        raise ConfigError(f"--preset {name!r}: no such preset; presets: {', '.join(known)}")
    return list(known[name]["set"])


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a config file, naming the file and the TOML error on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as TOML, else as a plain string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=0.001")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _merge_component(base: Any, over: Mapping[str, Any]) -> dict[str, Any]:
    """A component table over a default: a new ``name`` drops the default's params."""
    if not isinstance(base, Mapping):
        return copy.deepcopy(dict(over))
    out = copy.deepcopy(dict(base))
    if "name" in over and over["name"] != base.get("name"):
        out.pop("params", None)
    for k, v in over.items():
        if k == "params" and isinstance(v, Mapping) and isinstance(out.get("params"), Mapping):
            out["params"] = deep_merge(out["params"], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any], schema: Any = None) -> dict[str, Any]:
    """``over`` on top of ``base``, following component rules where the schema says so."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        sub = schema.get(k) if isinstance(schema, dict) else (
            schema.schema if isinstance(schema, TableOf) else None)
        if isinstance(sub, Component) and isinstance(v, Mapping):
            out[k] = _merge_component(out.get(k), v)
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v, sub)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_path(cfg: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """Apply one override (as a one-key config merged on top)."""
    over: Any = value
    for part in reversed(path):
        over = {part: over}
    return deep_merge(cfg, over, SCHEMA)


def resolve_config(file_config: Mapping[str, Any] | None = None, overrides: list[str] = (),
                   base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then the file (whose ``tasks`` table replaces the default tasks), then ``--set``
    (``tasks={...}`` replaces them too, ``loggers={}`` turns every logger off; ``tasks.NAME...``
    merges into that task).

    Returns the validated config with disabled tasks removed.
    """
    cfg = copy.deepcopy(dict(base)) if base is not None else default_config()
    if file_config:
        file_config = dict(file_config)
        if "tasks" in file_config:
            cfg["tasks"] = {}
        cfg = deep_merge(cfg, file_config, SCHEMA)
    for item in overrides:
        path, value = parse_override(item)
        if path in (["tasks"], ["loggers"]):  # the whole table, as a file's [tasks]: replaces
            cfg[path[0]] = {}
        cfg = set_path(cfg, path, value)
    validate(cfg)
    cfg["tasks"] = {k: v for k, v in cfg["tasks"].items() if v.get("enabled", True)}
    if not cfg["tasks"]:
        raise ConfigError("tasks: no task is enabled; define at least one [tasks.NAME] with a head")
    return cfg


def validate(cfg: Mapping[str, Any], schema: Any = SCHEMA, path: str = "") -> None:
    """Check every key against the schema; raise ConfigError naming the key path."""
    if isinstance(schema, TableOf):
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{path}: expected a table of named entries, got {cfg!r}")
        for name, entry in cfg.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
                raise ConfigError(f"{path}.{name}: {schema.noun} names use letters, digits, '_' "
                                  "and '-'")
            validate(entry, schema.schema, f"{path}.{name}")
            for key in schema.required:
                if key not in entry:
                    raise ConfigError(f"{path}.{name}.{key}: missing; every {schema.noun} needs "
                                      f"a {key} = {{name = ...}}")
        return
    if isinstance(schema, ListOf):
        if not isinstance(cfg, list):
            raise ConfigError(f"{path}: expected a list, e.g. [{{name = \"...\"}}], got {cfg!r}")
        for i, item in enumerate(cfg):
            validate(item, schema.schema, f"{path}[{i}]")
        return
    if isinstance(schema, Component):
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{path}: expected a table {{name = \"...\", params = {{...}}}} "
                              f"naming a {schema.kind}, got {cfg!r}")
        for k in cfg:
            if k not in ("name", "params"):
                raise ConfigError(f"{path}.{k}: unknown key; a component table has only 'name' "
                                  "and 'params'." + suggest(k, ["name", "params"]))
        if not isinstance(cfg.get("name"), str) or not cfg["name"]:
            raise ConfigError(f"{path}.name: expected the name of a {schema.kind} (a string), "
                              f"got {cfg.get('name')!r}")
        if not isinstance(cfg.get("params", {}), Mapping):
            raise ConfigError(f"{path}.params: expected a table of parameters, got {cfg['params']!r}")
        return
    if isinstance(schema, Key):
        ok = isinstance(cfg, schema.types) and not (isinstance(cfg, bool) and bool not in schema.types)
        if ok and schema.choices is not None:
            ok = cfg in schema.choices
        if ok and schema.check is not None:
            ok = bool(schema.check(cfg))
        if not ok:
            raise ConfigError(f"{path}: expected {schema.expected}, got {cfg!r}")
        return
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a table, got {cfg!r}")
    for k, v in cfg.items():
        key = f"{path}.{k}" if path else k
        if k not in schema:
            known = sorted(schema)
            close = suggest(k, known).replace("'", "'" + (path + "." if path else ""), 1) \
                if suggest(k, known) else ""
            raise ConfigError(f"config key {key!r} is unknown.{close} Known keys"
                              f"{' in [' + path + ']' if path else ''}: {', '.join(known)}")
        validate(v, schema[k], key)


def dumps(cfg: Mapping[str, Any]) -> str:
    """The config as TOML text (what ``config.toml`` in a run directory holds)."""
    return tomli_w.dumps(_plain(cfg))


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items() if x is not None}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v
