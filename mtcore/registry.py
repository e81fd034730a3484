"""Resolves component names to specs and builds components with validated parameters.

Names resolve only through the registries, never through import paths, so a config cannot run
arbitrary code. A name provided by two plugins is an error when it is used (not when it is
installed), and ``provider:name`` always resolves; a built-in keeps its bare name (installing a
plugin never changes what an existing config means), with a warning naming the other providers.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

from mtcore.errors import (
    ComponentClashError,
    ComponentNotFoundError,
    ConfigError,
    MtcoreError,
    PluginError,
)
from mtcore.plugin_manager import PluginManager, PluginWarning, Provided, default_manager
from mtcore.specs import ComponentSpec, plural


def _describe(p: Provided) -> str:
    """'<distribution> <version> (plugin '<name>')' for messages."""
    return f"{p.plugin.distribution or '?'} {p.plugin.version or ''} (plugin {p.plugin.name!r})".replace("  ", " ")


def suggest(name: str, choices: list[str]) -> str:
    """' Did you mean ...?' for the closest choices, or ''."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class Registry:
    """All component registries of one plugin manager (one per kind)."""

    def __init__(self, manager: PluginManager | None = None) -> None:
        self.manager = manager if manager is not None else default_manager()
        self._shadow_warned: set[tuple[str, str]] = set()  # (kind, name): warned once

    def available(self, kind: str) -> list[Provided]:
        return self.manager.provided(kind)

    def names(self, kind: str) -> list[str]:
        return sorted({p.spec.name for p in self.available(kind)})

    def resolve(self, kind: str, name: str, key: str | None = None) -> Provided:
        """The one provider of ``name`` (or ``provider:name``) in ``kind``; errors start with
        ``<key>.name`` when the config key is given."""
        try:
            return self._resolve(kind, name)
        except (ComponentNotFoundError, ComponentClashError) as exc:
            if key is None:
                raise
            raise type(exc)(f"{key}.name: {exc}") from None

    def _resolve(self, kind: str, name: str) -> Provided:
        if not isinstance(name, str) or not name:
            raise ComponentNotFoundError(f"{kind} name must be a non-empty string, got {name!r}")
        provided = self.available(kind)
        provider, _, short = name.rpartition(":")
        matches = [p for p in provided if p.spec.name == short]
        if provider:
            matches = [p for p in matches if provider in (p.plugin.name, p.plugin.distribution)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            names = self.names(kind)
            hint = suggest(short, names)
            where = f" from provider {provider!r}" if provider else ""
            raise ComponentNotFoundError(
                f"unknown {kind} {name!r}{where}.{hint} Available {plural(kind)}: "
                f"{', '.join(names) or '(none: is a plugin disabled or broken? see mtcore plugins)'}"
            )
        builtins = [p for p in matches if p.plugin.builtin]
        if not provider and len(builtins) == 1:
            # the built-in keeps its bare name: installing a plugin must not change (or break)
            # what an existing config, the default one included, means
            others = [p for p in matches if not p.plugin.builtin]
            if (kind, short) in self._shadow_warned:
                return builtins[0]
            self._shadow_warned.add((kind, short))
            warnings.warn(
                f"{kind} {short!r}: using mtcore's built-in one; also provided by "
                + " and ".join(_describe(p) for p in others) + ", which "
                + " or ".join(f"'{p.plugin.name}:{short}'" for p in others) + " picks",
                PluginWarning, stacklevel=4)
            return builtins[0]
        who = " and ".join(_describe(p) for p in matches)
        picks = " or ".join(f"'{p.plugin.name}:{short}'" for p in matches)
        raise ComponentClashError(
            f"{kind} {short!r} is provided by {who}; pick one with {picks}, or disable a plugin "
            "with MTCORE_DISABLE_PLUGINS / --disable-plugin"
        )

    def spec(self, kind: str, name: str, key: str | None = None) -> ComponentSpec:
        return self.resolve(kind, name, key).spec

    def build(self, kind: str, name: str, params: Mapping[str, Any] | None = None, *args: Any,
              key: str | None = None, **context: Any) -> Any:
        """Build component ``name`` with ``defaults | params``; ``args``/``context`` come from mtcore.

        ``key`` is the config key path used in error messages (e.g. ``tasks.seg.head``).
        """
        provided = self.resolve(kind, name, key)
        spec = provided.spec
        merged = {**spec.defaults, **dict(params or {})}
        check_factory(provided, set(context), len(args))
        check_params(spec, merged, key or kind, reserved=set(context), n_positional=len(args))
        try:
            return spec.factory(*args, **context, **merged)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, MtcoreError):
                raise
            # a component rejecting its parameters: one line naming the config key, not a
            # traceback (--debug still shows it, chained)
            raise ConfigError(f"{key or kind} ({kind} {spec.name!r}): {exc} (if that is not a "
                              "parameter problem, `mtcore --debug` shows where)") from exc


def _signature(spec: ComponentSpec) -> inspect.Signature | None:
    """The factory's signature, or None for a callable Python cannot inspect (a builtin)."""
    try:
        return inspect.signature(spec.factory)
    except (TypeError, ValueError):
        return None


def _keyword_params(sig: inspect.Signature, n_positional: int) -> list[inspect.Parameter]:
    """The parameters a config can set: keyword-capable ones after mtcore's positional ones."""
    return [p for i, p in enumerate(sig.parameters.values())
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and i >= n_positional)]


def accepted_params(spec: ComponentSpec, n_positional: int = 0) -> tuple[set[str], bool]:
    """The keyword parameters a spec's factory accepts (after the ``n_positional`` arguments
    mtcore passes itself), and whether it takes ``**kwargs``."""
    sig = _signature(spec)
    if sig is None:
        return set(spec.defaults), True
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return {p.name for p in _keyword_params(sig, n_positional)} | set(spec.defaults), var_kw


def required_params(spec: ComponentSpec, n_positional: int = 0) -> set[str]:
    """The factory's parameters after the ``n_positional`` mtcore passes that have no default."""
    sig = _signature(spec)
    return set() if sig is None else {
        p.name for p in _keyword_params(sig, n_positional) if p.default is p.empty}


def check_factory(provided: Provided, passed: set[str], n_positional: int) -> None:
    """A factory must take what mtcore passes it (``n_positional`` arguments, then the keywords
    ``passed``): else a clear error that blames the plugin, not a TypeError from inside the build."""
    spec = provided.spec
    sig = _signature(spec)
    if sig is None:
        return
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        positional = n_positional
    else:
        positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    accepted, var_kw = accepted_params(spec, n_positional)
    missing = [] if var_kw else sorted(passed - accepted)
    if positional < n_positional or missing:
        takes = []
        if positional < n_positional:
            takes.append(f"{n_positional} positional argument{'s' if n_positional > 1 else ''}")
        if missing:
            takes.append(f"the keyword argument{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))}")
        raise PluginError(
            f"{spec.kind} {spec.name!r} of {provided.plugin.describe()}: its factory "
            f"{getattr(spec.factory, '__qualname__', spec.factory)!r}{sig} does not take "
            f"{' and '.join(takes)}, which mtcore passes every {spec.kind} factory "
            "(docs/plugins.md gives each kind's factory signature)")


def check_params(spec: ComponentSpec, params: Mapping[str, Any], key: str,
                 reserved: set[str] = frozenset(), n_positional: int = 0) -> None:
    """Reject parameters the factory does not take, naming the key and the accepted ones, and
    require those it has no default for."""
    accepted, var_kw = accepted_params(spec, n_positional)
    accepted -= set(reserved)
    for p in [] if var_kw else params:  # unknown names first: a typo gets its suggestion
        if p not in accepted:
            raise ConfigError(
                f"{key}.params.{p}: {spec.kind} {spec.name!r} has no parameter {p!r}."
                f"{suggest(p, sorted(accepted))} Accepted: {', '.join(sorted(accepted)) or '(none)'}"
            )
    missing = sorted(required_params(spec, n_positional) - set(reserved) - set(params))
    if missing:
        raise ConfigError(
            f"{key}.params.{missing[0]}: required by {spec.kind} {spec.name!r} (it has no "
            f"default){'; also missing: ' + ', '.join(missing[1:]) if missing[1:] else ''}")
