"""Head analyzers: one file per method, all returning ``HeadScores``.

Every module in this package is imported here, so an analyzer file that uses ``@register`` is
available by name in ``ANALYZERS`` (and so in the CLI and the report) without further wiring.
"""
import importlib
import pkgutil

from .base import ANALYZERS, Analyzer, register
from .scores import HeadScores

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "scores") and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["ANALYZERS", "Analyzer", "HeadScores", "register"]
