"""Finds, loads and isolates plugins, and collects the component specs they provide.

Plugins come from the entry-point group ``mtcore`` (first-party ones too) or are registered in
process. A plugin that fails to import, misspells a hook or raises inside a hook costs one warning
naming it and its distribution; everything else still loads. ``MTCORE_STRICT_PLUGINS=1`` turns
those warnings into errors, for plugin authors.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from mtcore import hookspecs
from mtcore.errors import PluginError
from mtcore.specs import KINDS, ComponentSpec, plural

ENTRY_POINT_GROUP = "mtcore"
BUILTIN_DISTRIBUTION = "mtcore"


class PluginWarning(UserWarning):
    """A plugin was skipped (or part of it): the message says which and why."""


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from: its name, distribution and version, and whether it is built in."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    builtin: bool = False

    def describe(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin {self.name!r} ({dist})"


@dataclass(frozen=True)
class Provided:
    """A spec stamped with the plugin that gave it."""

    spec: ComponentSpec
    plugin: PluginInfo


@dataclass
class LoadReport:
    """What happened while loading: the plugins loaded, skipped (with why) and disabled, and the
    loaded ones one of whose hooks failed (``partial``: that hook's components are missing)."""

    loaded: list[PluginInfo] = field(default_factory=list)
    failed: list[tuple[PluginInfo, str]] = field(default_factory=list)
    disabled: list[PluginInfo] = field(default_factory=list)
    partial: list[tuple[PluginInfo, str]] = field(default_factory=list)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, "").split(",") if x.strip()]


class PluginManager:
    """A typed facade over pluggy: the rest of mtcore never calls ``pm.hook.*`` directly."""

    def __init__(self, *, strict: bool | None = None, disabled: Iterable[str] = ()) -> None:
        self.strict = env_flag("MTCORE_STRICT_PLUGINS") if strict is None else strict
        self.disabled = {d for d in disabled} | set(env_list("MTCORE_DISABLE_PLUGINS"))
        self._pm = pluggy.PluginManager("mtcore")
        self._pm.add_hookspecs(hookspecs)
        self._info: dict[str, PluginInfo] = {}
        self.report = LoadReport()
        self._cache: dict[str, list[Provided]] = {}

    # -- loading ------------------------------------------------------------------------------
    def load_entrypoints(self, group: str = ENTRY_POINT_GROUP) -> LoadReport:
        """Load every plugin advertised in the entry-point group, one at a time, isolated."""
        seen_disabled: set[str] = set()
        found = []
        for ep in md.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            found.append((ep, PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
                builtin=dist is not None and dist.metadata["Name"] == BUILTIN_DISTRIBUTION,
            )))
        # built-ins first: a third-party entry point reusing a built-in's name is the one skipped,
        # whatever order the environment lists them in
        for ep, info in sorted(found, key=lambda f: (not f[1].builtin, f[0].name)):
            hit = {ep.name, info.distribution} & self.disabled
            if hit:
                seen_disabled |= hit
                if info.builtin:
                    warnings.warn(
                        f"cannot disable built-in {info.describe()}: built-ins are always loaded",
                        PluginWarning, stacklevel=2,
                    )
                else:
                    self.report.disabled.append(info)
                    continue
            if ep.name in self._info:
                self._fail(info, f"another plugin is already registered as {ep.name!r}")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take mtcore down
                self._fail(info, f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}")
                continue
            self.register(plugin, info)
        unknown = self.disabled - seen_disabled
        if unknown:
            warnings.warn(
                f"MTCORE_DISABLE_PLUGINS / --disable-plugin names no installed plugin: "
                f"{', '.join(sorted(unknown))}",
                PluginWarning, stacklevel=2,
            )
        return self.report

    def register(self, plugin: Any, info: PluginInfo | str) -> bool:
        """Register a plugin object (a module or instance with hookimpls). False if it was skipped."""
        if isinstance(info, str):
            info = PluginInfo(name=info, module=getattr(plugin, "__name__", None))
        if info.name in self._info:
            raise PluginError(f"a plugin named {info.name!r} is already registered")
        try:
            self._pm.register(plugin, name=info.name)
        except Exception as exc:  # pluggy.PluginValidationError: bad hookimpl signature
            self._fail(info, f"invalid hook implementation: {exc}")
            return False
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._pm.unregister(name=info.name)
            hooks = [
                n for n in dir(plugin)
                if n.startswith("mtcore_") and n not in {h for h, _ in KINDS.values()}
            ]
            self._fail(info, f"unknown hook {', '.join(hooks) or ''} (misspelt?): {exc}; "
                       f"known hooks: {', '.join(h for h, _ in KINDS.values())}")
            return False
        self._info[info.name] = info
        self.report.loaded.append(info)
        self._cache.clear()
        return True

    def _fail(self, info: PluginInfo, why: str) -> None:
        msg = f"{info.describe()} skipped: {why}"
        if self.strict:
            raise PluginError(msg + " (MTCORE_STRICT_PLUGINS=1)")
        self.report.failed.append((info, why))
        warnings.warn(msg, PluginWarning, stacklevel=3)

    def _hook_failed(self, info: PluginInfo, kind: str, why: str) -> None:
        """One hook of a loaded plugin failed: its components of ``kind`` are left out, the rest of
        the plugin stays."""
        msg = f"{info.describe()}: {why}; its {plural(kind)} are left out (its other hooks load)"
        if self.strict:
            raise PluginError(msg + " (MTCORE_STRICT_PLUGINS=1)")
        self.report.partial.append((info, why))
        warnings.warn(msg, PluginWarning, stacklevel=3)

    # -- querying -----------------------------------------------------------------------------
    @property
    def plugins(self) -> list[PluginInfo]:
        return list(self._info.values())

    def provided(self, kind: str) -> list[Provided]:
        """Every spec of ``kind`` from every loaded plugin, each stamped with its provider."""
        if kind not in KINDS:
            raise KeyError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        if kind in self._cache:
            return self._cache[kind]
        hook_name, spec_cls = KINDS[kind]
        out: list[Provided] = []
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            info = self._info[impl.plugin_name]
            try:
                specs = list(impl.function() or ())
                for spec in specs:
                    if not isinstance(spec, spec_cls):
                        raise TypeError(f"{hook_name} must yield {spec_cls.__name__}, got {spec!r}")
            except Exception as exc:
                self._hook_failed(info, kind, f"hook {hook_name} raised {type(exc).__name__}: {exc}")
                continue
            names = [spec.name for spec in specs]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:  # not even 'plugin:name' could pick one
                self._hook_failed(info, kind, f"hook {hook_name} yields the {kind} name"
                                  f"{'s' if len(twice) > 1 else ''} {', '.join(map(repr, twice))} "
                                  "more than once")
                continue
            out.extend(Provided(spec, info) for spec in specs)
        self._cache[kind] = out
        return out


def default_manager(disabled: Iterable[str] = (), strict: bool | None = None) -> PluginManager:
    """A manager with every installed plugin loaded from entry points."""
    pm = PluginManager(disabled=disabled, strict=strict)
    pm.load_entrypoints()
    return pm
