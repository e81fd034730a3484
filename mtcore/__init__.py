"""mtcore: multi-task vision learning on one shared backbone, built from pluggy plugins."""

__version__ = "0.1.0"

from mtcore.api import build, evaluate, export, fit, load, predict, sample  # noqa: E402

__all__ = ["__version__", "build", "evaluate", "export", "fit", "load", "predict", "sample"]
