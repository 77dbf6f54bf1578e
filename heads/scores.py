"""``HeadScores``: the one result type of every head analyzer.

A ``[layer, head]`` float tensor plus metadata (method, paper, hyperparameters, model, dataset,
time) and optional extra tensors (e.g. per-length scores). Saved as ``NAME.json`` (metadata and
scores as lists) + ``NAME.safetensors`` (all tensors), both written to temporary files and renamed.
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


def _atomic_write(path: Path, write) -> None:
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


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=1, default=str)))
    return path


@dataclass
class HeadScores:
    scores: torch.Tensor                      # [layer, head]
    method: str
    paper: str = ""
    params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # ModelInfo.to_dict()
    dataset: str = ""
    description: str = ""                      # what a high score means
    threshold: float | None = None             # the paper's cut-off, if it has one
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
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

    @property
    def shape(self):
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
        return float(self.classify(threshold).float().mean())

    def to_frame(self):
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

    # ------------------------------------------------------------------ persistence
    def meta(self) -> dict:
        return {"method": self.method, "paper": self.paper, "params": self.params, "model": self.model,
                "dataset": self.dataset, "description": self.description, "threshold": self.threshold,
                "created": self.created, "seconds": self.seconds, "scores": self.scores.tolist(),
                "extra": sorted(self.extra)}

    def save(self, path) -> Path:
        """Write PATH.json and PATH.safetensors (PATH without suffix); returns the json path."""
        from safetensors.torch import save_file
        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        tensors = {"scores": self.scores.contiguous(),
                   **{f"extra.{k}": torch.as_tensor(v).detach().cpu().contiguous() for k, v in self.extra.items()}}
        _atomic_write(base.with_suffix(".safetensors"), lambda p: save_file(tensors, p))
        _atomic_write(base.with_suffix(".json"),
                      lambda p: Path(p).write_text(json.dumps(self.meta(), indent=1, default=str)))
        return base.with_suffix(".json")

    @classmethod
    def load(cls, path) -> "HeadScores":
        from safetensors.torch import load_file
        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        meta = json.loads(base.with_suffix(".json").read_text())
        tensors = load_file(str(base.with_suffix(".safetensors")))
        extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(scores=tensors["scores"], method=meta["method"], paper=meta["paper"], params=meta["params"],
                   model=meta["model"], dataset=meta["dataset"], description=meta.get("description", ""),
                   threshold=meta.get("threshold"), extra=extra, created=meta["created"],
                   seconds=meta.get("seconds", 0.0))
