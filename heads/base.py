"""The analyzer protocol: hyperparameters in ``__init__``, ``score(model, data=None) -> HeadScores``.

Like a scikit-learn estimator: construct with defaults that run in a report on a CPU (overridable),
or with ``quick()`` (smoke runs, reports) / ``paper_config()`` (the paper's settings); call ``score``
on a ``HookedModel``; ``data=None`` uses the data shipped in ``heads/data``. Adding an analyzer is
adding one file that defines a subclass and decorates it with ``@register``;
tests/test_analyzer_conformance.py checks every registered analyzer against this protocol.
"""
from __future__ import annotations

import time
from dataclasses import fields, is_dataclass

from .scores import HeadScores

ANALYZERS: dict[str, type] = {}
_UNSET = object()


def register(cls):
    """Class decorator: make the analyzer available by ``cls.name`` (CLI, report, app)."""
    ANALYZERS[cls.name] = cls
    return cls


class Analyzer:
    """Base class of the head analyzers (one per file in ``heads/``, registered with ``@register``).

    Class attributes: ``name`` (the CLI name), ``paper`` (citation with section), ``description``
    (what a high score means), ``threshold`` (the paper's cut-off, or None). Hyperparameters are the
    subclass's dataclass fields; ``quick()`` / ``paper_config()`` build the report and paper settings;
    ``score(model, data=None)`` returns ``HeadScores`` [layer, head]."""
    name: str = ""          # CLI name, e.g. "retrieval"
    paper: str = ""         # citation, e.g. "Wu et al. 2024, Retrieval Head ... §2"
    description: str = ""   # what a high score means
    threshold: float | None = None

    @classmethod
    def quick(cls, **kw) -> "Analyzer":
        """Small settings for smoke runs and the HTML report (default: the analyzer's defaults)."""
        return cls(**kw)

    @classmethod
    def paper_config(cls, **kw) -> "Analyzer":
        """The paper's settings (default: the analyzer's defaults)."""
        return cls(**kw)

    def params(self) -> dict:
        """The hyperparameters as {name: value}: the dataclass fields, else the public instance
        attributes (recorded in each result's ``params``)."""
        if is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def score(self, model, data=None, progress: bool = True) -> HeadScores:  # pragma: no cover - protocol
        """Score every head of ``model`` -> ``HeadScores`` [layer, head]. ``data=None`` uses the shipped
        data; each analyzer's docstring says which type ``data`` takes."""
        raise NotImplementedError

    def _result(self, model, scores, dataset: str, started: float, *, threshold=_UNSET, params: dict | None = None,
                info: dict | None = None, **extra) -> HeadScores:
        """Build the complete HeadScores with this analyzer's metadata: ``threshold`` overrides the
        class's, ``params`` adds result-dependent parameters (e.g. the split threshold, the template
        used), ``info`` holds JSON-able non-tensor results, ``extra`` tensors."""
        return HeadScores(scores=scores, method=self.name, paper=self.paper,
                          params=_jsonable({**self.params(), **(params or {})}), model=model.cfg.to_dict(),
                          dataset=dataset, description=self.description,
                          threshold=self.threshold if threshold is _UNSET else threshold, extra=extra,
                          info=dict(info or {}), seconds=time.time() - started)


def _jsonable(d):
    """Plain JSON values kept (recursively); anything else as its repr."""
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(_jsonable(v) for v in d)
    return d if isinstance(d, (int, float, str, bool, type(None))) else repr(d)
