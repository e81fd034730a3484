"""Registers the first-party run loggers (entry point ``mtcore = loggers``)."""

from mtcore.plugin import LoggerSpec, hookimpl

from .tensorboard import TensorBoardLogger


@hookimpl
def mtcore_loggers():
    yield LoggerSpec("tensorboard", TensorBoardLogger,
                     "Metrics and sample grids as TensorBoard event files (needs tensorboard).")
