"""``HeadScores``: the one result type of every head analyzer.

A ``[layer, head]`` float tensor plus metadata (method, paper, hyperparameters, model, dataset,
time), optional extra tensors (e.g. per-length scores) and ``info``, JSON-able results that are not
tensors (the model's outputs, the queries, a chosen head set). Everything is given at construction
and survives ``save``/``load``. Saved as ``NAME.json`` (metadata and scores as lists) +
``NAME.safetensors`` (all tensors), both written to temporary files and renamed. Scores must be
finite; non-finite floats in the metadata are written as the strings "inf", "-inf", "nan" (never
JSON's non-standard ``Infinity``/``NaN``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)




def _default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-able")


def finite_json(obj):
    """``obj`` with non-finite floats replaced by the strings "inf", "-inf", "nan" (valid JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj, indent: int | None = 1, strict: bool = True) -> str:
    """Standard JSON text (no Infinity/NaN); objects with ``to_dict()`` and tensors are converted;
    anything else raises TypeError (``strict=False``: written as its ``str``)."""
    default = _default if strict else (lambda o: _default(o) if hasattr(o, "to_dict") or torch.is_tensor(o) else str(o))
    return json.dumps(finite_json(json.loads(json.dumps(obj, default=default))), indent=indent, allow_nan=False)


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    atomic_write(path, lambda p: Path(p).write_text(dumps(obj, strict=False)))
    return path


@dataclass
class HeadScores:
    """The result of every head analyzer: ``scores`` [layer, head] float32 (finite; NaN or inf raise
    ValueError) plus metadata, all given at construction and kept by ``save`` / ``load``.

    Fields: ``method`` (analyzer name); ``paper`` (citation); ``params`` (hyperparameters, JSON-able);
    ``model`` (``ModelInfo.to_dict()``); ``dataset`` (what the scores were computed on, in words);
    ``description`` (what a high score means); ``threshold`` (the paper's cut-off, or None);
    ``extra`` ({name: tensor}, e.g. per-test scores); ``info`` (JSON-able non-tensor results, also
    readable as attributes: ``r.queries``); ``created`` (Unix time); ``seconds`` (run time)."""
    scores: torch.Tensor                      # [layer, head]
    method: str
    paper: str = ""
    params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # ModelInfo.to_dict()
    dataset: str = ""
    description: str = ""                      # what a high score means
    threshold: float | None = None             # the paper's cut-off, if it has one
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)   # JSON-able non-tensor results; also readable as attributes
    created: float = field(default_factory=time.time)
    seconds: float = 0.0

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.scores.dim() != 2:
            raise ValueError(f"HeadScores.scores must be [layer, head], got shape {tuple(self.scores.shape)}")
        if torch.isnan(self.scores).any():
            bad = torch.nonzero(torch.isnan(self.scores))[:5].tolist()
            raise ValueError(f"{self.method}: NaN scores at (layer, head) {bad}; the analyzer saw no valid "
                             "data for these heads (too short inputs? all tests gated out?)")
        if torch.isinf(self.scores).any():
            bad = torch.nonzero(torch.isinf(self.scores))[:5].tolist()
            raise ValueError(f"{self.method}: infinite scores at (layer, head) {bad}; scores must be finite "
                             "(an overflow or a division by zero in the analyzer: check its inputs)")
        for name in ("params", "model", "info"):
            try:
                dumps(getattr(self, name), indent=None)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{self.method}: HeadScores.{name} must be JSON-able (plain values, lists, "
                                 f"dicts, tensors or objects with to_dict()): {e}") from None

    def __getattr__(self, name):
        # info entries read as attributes (r.greedy, r.queries); only called when normal lookup fails
        if name.startswith("__") or name == "info":
            raise AttributeError(name)
        info = self.__dict__.get("info") or {}
        if name in info:
            return info[name]
        raise AttributeError(f"HeadScores has no attribute or info entry {name!r}")

    @property
    def shape(self):
        """(n_layers, n_heads) of ``scores``."""
        return tuple(self.scores.shape)

    def top(self, k: int = 10, largest: bool = True) -> list[tuple[int, int, float]]:
        """The k best heads as (layer, head, score), best first."""
        flat = self.scores.flatten()
        k = min(k, flat.numel())
        vals, idx = flat.topk(k, largest=largest)
        H = self.scores.shape[1]
        return [(int(i) // H, int(i) % H, float(v)) for v, i in zip(vals, idx)]

    def classify(self, threshold: float | None = None) -> torch.Tensor:
        """[layer, head] bool: score > threshold (default: the paper's threshold)."""
        t = self.threshold if threshold is None else threshold
        if t is None:
            raise ValueError(f"{self.method} has no default threshold; pass one")
        return self.scores > t

    def fraction(self, threshold: float | None = None) -> float:
        """Share of heads (in [0, 1]) scoring above ``threshold`` (default: the paper's); raises
        ValueError when there is neither."""
        return float(self.classify(threshold).float().mean())

    def to_frame(self):
        """pandas DataFrame, one row per head: layer, head, score, method."""
        import pandas as pd
        L, H = self.scores.shape
        return pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)],
                             "head": [h for _ in range(L) for h in range(H)],
                             "score": self.scores.flatten().tolist(), "method": self.method})

    def plot(self, title: str | None = None):
        """Plotly heatmap, layer × head."""
        import plotly.graph_objects as go
        L, H = self.scores.shape
        fig = go.Figure(go.Heatmap(z=self.scores.numpy(), x=[f"H{h}" for h in range(H)],
                                   y=[f"L{l}" for l in range(L)], colorscale="Viridis",
                                   colorbar=dict(title="score"),
                                   hovertemplate="layer %{y} head %{x}: %{z:.3f}<extra></extra>"))
        fig.update_layout(title=title or f"{self.method} — {self.model.get('name', '')}",
                          xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
                          height=max(300, 18 * L + 120), width=max(420, 40 * H + 200))
        return fig

    # ------------------------------------------------------------------ export for KV-compression code
    def export(self, path, format: str = "retrieval_head", sink: int | None = None,
               recent: int | None = None) -> Path:
        """Write the scores in a format that KV-cache compression code reads; returns the file written.

        ``format="retrieval_head"``: Retrieval_Head's head-score file (Wu et al. 2024, repo
        nightdessert/Retrieval_Head, ``head_score/MODEL.json``): one line of JSON
        ``{"layer-head": [score, ...]}``, the list holding one score per counted needle test when the
        result has them (``extra["test_scores"]``), else ``[score]``; readers take ``np.mean`` of it.

        ``format="duo"``: DuoAttention's pattern folder (Xiao et al. 2024, repo mit-han-lab/duo-attention,
        ``duo_attn.utils.load_attn_pattern``): ``full_attention_heads.tsv`` (tab-separated, one row per
        layer, one column per KV head, values in [0, 1], 1 = keeps the full KV cache) and ``config.json``
        with ``sink_size`` and ``recent_size``. ``path`` is that folder (or the .tsv inside it). Per-KV-head
        values come from ``extra["alpha_kv"]`` (trained gates) or ``extra["kv_scores"]``, else the max
        over the query heads of each KV head; scores outside [0, 1] are min-max scaled to [0, 1] (a
        warning says so). ``sink``/``recent`` default to the result's parameters, else 64 / 256."""
        import logging

        path = Path(path)
        L, H = self.scores.shape
        if format == "retrieval_head":
            per_test = self.extra.get("test_scores")
            counted = self.extra.get("test_counted")
            out = {}
            for l in range(L):
                for h in range(H):
                    if per_test is not None and per_test.dim() == 3 and tuple(per_test.shape[1:]) == (L, H):
                        keep = per_test[:, l, h] if counted is None else per_test[counted.bool(), l, h]
                        vals = [float(v) for v in keep] or [float(self.scores[l, h])]
                    else:
                        vals = [float(self.scores[l, h])]
                    out[f"{l}-{h}"] = vals
            atomic_write(path, lambda p: Path(p).write_text(json.dumps(out) + "\n"))
            return path
        if format != "duo":
            raise ValueError(f"unknown export format {format!r}; use 'retrieval_head' or 'duo'")
        folder = path.parent if path.suffix == ".tsv" else path
        G = int(self.model.get("n_kv_heads") or H)
        if H % G:
            raise ValueError(f"{H} heads do not split into {G} KV heads; the result's model info is wrong")
        kv = self.extra.get("alpha_kv", self.extra.get("kv_scores"))
        if kv is None or tuple(kv.shape) != (L, G):
            kv = self.scores.reshape(L, G, H // G).amax(-1)                       # [layer, kv_head]
        kv = kv.float()
        lo, hi = float(kv.min()), float(kv.max())
        if lo < 0 or hi > 1:
            logging.getLogger("headscope").warning(
                "%s scores span [%.3g, %.3g]; DuoAttention reads values in [0, 1]: min-max scaled", self.method, lo, hi)
            kv = (kv - lo) / max(hi - lo, 1e-12)
        sink = int(sink if sink is not None else self.params.get("sink", 64))
        recent = int(recent if recent is not None else self.params.get("recent", 256))
        text = "\n".join("\t".join(f"{float(v):.18e}" for v in row) for row in kv) + "\n"
        atomic_write(folder / "full_attention_heads.tsv", lambda p: Path(p).write_text(text))
        atomic_write(folder / "config.json", lambda p: Path(p).write_text(
            json.dumps({"sink_size": sink, "recent_size": recent, "exported_from": self.method,
                        "model": self.model.get("name", "")}, indent=1)))
        return folder / "full_attention_heads.tsv"

    # ------------------------------------------------------------------ persistence
    def meta(self) -> dict:
        """The JSON part of ``save``: the metadata, ``scores`` as nested lists and the names of the
        ``extra`` tensors."""
        return {"method": self.method, "paper": self.paper, "params": self.params, "model": self.model,
                "dataset": self.dataset, "description": self.description, "threshold": self.threshold,
                "created": self.created, "seconds": self.seconds, "scores": self.scores.tolist(),
                "extra": sorted(self.extra), "info": self.info}

    def save(self, path) -> Path:
        """Write PATH.json and PATH.safetensors (PATH without suffix); returns the json path."""
        from safetensors.torch import save_file
        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        json_path, st_path = _paths(base)
        tensors = {"scores": self.scores.contiguous(),
                   **{f"extra.{k}": torch.as_tensor(v).detach().cpu().contiguous() for k, v in self.extra.items()}}
        atomic_write(st_path, lambda p: save_file(tensors, p))
        atomic_write(json_path, lambda p: Path(p).write_text(dumps(self.meta())))
        return json_path

    @classmethod
    def load(cls, path) -> "HeadScores":
        """Read a result written by ``save`` (PATH, PATH.json or PATH.safetensors); raises OSError when a
        file is missing and ValueError when the scores are not a finite [layer, head] map."""
        from safetensors.torch import load_file
        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        json_path, st_path = _paths(base)
        meta = json.loads(json_path.read_text())
        tensors = load_file(str(st_path))
        extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(scores=tensors["scores"], method=meta["method"], paper=meta["paper"], params=meta["params"],
                   model=meta["model"], dataset=meta["dataset"], description=meta.get("description", ""),
                   threshold=_float(meta.get("threshold")), extra=extra, info=meta.get("info", {}),
                   created=meta["created"], seconds=meta.get("seconds", 0.0))


def _paths(base: Path) -> tuple[Path, Path]:
    """PATH -> (PATH.json, PATH.safetensors), keeping dots in the name ("retrieval.v2.json")."""
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")


def _float(x):
    return float(x) if isinstance(x, str) else x
