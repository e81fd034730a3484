"""Exceptions a user can act on. The CLI prints their message in one line (traceback with --debug)."""

from __future__ import annotations


class MtcoreError(Exception):
    """Base of every error mtcore raises on purpose for bad input or a bad setup."""


class PluginError(MtcoreError):
    """A plugin failed to load, broke a hook, or misspelt a hook (strict mode)."""


class ContractError(PluginError, TypeError):
    """A component broke its contract at run time (a backbone returning other feature maps than it
    declares, a head returning no dict, a loss that is no scalar): a bug in that component."""


class ComponentNotFoundError(MtcoreError, KeyError):
    """A component name that no enabled plugin provides."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ComponentClashError(MtcoreError):
    """Two plugins provide the same component name in one kind; the user must qualify it."""


class ConfigError(MtcoreError, ValueError):
    """An invalid experiment config: names the key path, the bad value and what was expected."""


class IncompatibleComponentsError(MtcoreError, ValueError):
    """Components that cannot work together (e.g. a head needs a feature map the backbone lacks)."""


class CheckpointError(MtcoreError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class DataError(MtcoreError, ValueError):
    """A dataset file or value that is missing, unreadable or out of range."""
