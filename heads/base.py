"""The analyzer protocol: hyperparameters in ``__init__``, ``score(model, data=None) -> HeadScores``.

Like a scikit-learn estimator: construct with the paper's defaults (overridable), call ``score`` on a
``HookedModel``; ``data=None`` uses the data shipped in ``heads/data``. Adding an analyzer is adding
one file that defines a subclass and decorates it with ``@register``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, is_dataclass

from .scores import HeadScores

ANALYZERS: dict[str, type] = {}


def register(cls):
    """Class decorator: make the analyzer available by ``cls.name`` (CLI, report, app)."""
    ANALYZERS[cls.name] = cls
    return cls


class Analyzer:
    name: str = ""          # CLI name, e.g. "retrieval"
    paper: str = ""         # citation, e.g. "Wu et al. 2024, Retrieval Head ... §2"
    description: str = ""   # what a high score means
    threshold: float | None = None

    def params(self) -> dict:
        if is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def score(self, model, data=None, progress: bool = True) -> HeadScores:  # pragma: no cover - protocol
        raise NotImplementedError

    def _result(self, model, scores, dataset: str, started: float, **extra) -> HeadScores:
        """Build the HeadScores with this analyzer's metadata."""
        return HeadScores(scores=scores, method=self.name, paper=self.paper, params=_jsonable(self.params()),
                          model=model.cfg.to_dict(), dataset=dataset, description=self.description,
                          threshold=self.threshold, extra=extra, seconds=time.time() - started)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out[k] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple, dict)) else repr(v)
    return out
