"""Head analyzers: one file per method, all returning ``HeadScores``."""
from .base import ANALYZERS, Analyzer, register
from .scores import HeadScores

__all__ = ["ANALYZERS", "Analyzer", "HeadScores", "register"]
