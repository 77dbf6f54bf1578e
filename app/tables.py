"""Saved reports as tables: ``headscope show`` (top heads per analyzer, CSV export) and
``headscope compare`` (two reports: two runs of one model, or two models).

Pure functions over ``views.load_report`` output (no model is loaded); the CLI prints them with rich.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from ..heads import HeadScores
from ..heads.scores import atomic_write
from .report import fmt_num, tie_note, zscores


def top_rows(results: dict[str, HeadScores], k: int = 10) -> dict[str, list[tuple[int, int, float, float]]]:
    """{analyzer: [(layer, head, score, z), ...] best first}."""
    out = {}
    for n, r in results.items():
        Z = zscores({n: r})[0]
        out[n] = [(l, h, v, float(Z[l, h])) for l, h, v in r.top(k)]
    return out


def csv_text(results: dict[str, HeadScores]) -> str:
    """Every head of every analyzer, long form: analyzer, layer, head, score, z, rank (1 = best)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["analyzer", "layer", "head", "score", "z", "rank"])
    for n, r in results.items():
        Z = zscores({n: r})[0]
        for rank, (l, h, v) in enumerate(r.top(r.scores.numel()), 1):
            w.writerow([n, l, h, f"{v:.6g}", f"{float(Z[l, h]):.4g}", rank])
    return buf.getvalue()


def write_csv(results: dict[str, HeadScores], path) -> Path:
    """Write ``csv_text(results)`` (every head of every analyzer: score, z-score, rank) to ``path``
    atomically; returns the path."""
    path = Path(path)
    atomic_write(path, lambda p: Path(p).write_text(csv_text(results)))
    return path


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equal-shape score maps (average ranks for ties); nan when
    either is constant."""
    from scipy.stats import spearmanr
    x, y = a.flatten().double().numpy(), b.flatten().double().numpy()
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def top_overlap(a: HeadScores, b: HeadScores, k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k."""
    ta = {(l, h) for l, h, _ in a.top(k)}
    tb = {(l, h) for l, h, _ in b.top(k)}
    return len(ta & tb) / max(1, min(k, len(ta)))


def same_model(sa: dict, sb: dict, ra: dict, rb: dict) -> bool:
    """Two reports of one model: same model name and the same [layer, head] shape."""
    ma, mb = sa.get("model") or {}, sb.get("model") or {}
    shapes = {tuple(r.scores.shape) for r in [*ra.values(), *rb.values()]}
    return ma.get("name") == mb.get("name") and len(shapes) <= 1


def stats(r: HeadScores, k: int) -> dict:
    """Summary statistics of one analyzer's map: mean, max, share above its threshold, mean relative
    depth (layer / (layers - 1)) of its top k heads."""
    L = r.scores.shape[0]
    top = r.top(k)
    return {"mean": float(r.scores.mean()), "max": float(r.scores.max()),
            "above_threshold": None if r.threshold is None else float(r.fraction()),
            "top_depth": sum(l for l, _, _ in top) / len(top) / max(1, L - 1)}


def compare(a: tuple[dict, dict], b: tuple[dict, dict], k: int = 10, same: bool | None = None) -> dict:
    """Compare two loaded reports ((summary, results) each). Returns {"mode": "runs"|"models",
    "analyzers": {name: {...}}, "only_a": [...], "only_b": [...]}. Runs of one model: per analyzer
    Spearman's rho over all heads, the top-k overlap, the largest |score difference| and that over
    the largest |score| (``max_rel_diff``). Two models: per analyzer both top-k lists side by side
    and ``stats`` of each. ``same``: None decides by ``same_model``; True compares as runs of one
    model whatever the names (the same model loaded from another folder, on another device)."""
    (sa, ra), (sb, rb) = a, b
    common = [n for n in ra if n in rb]
    if same and len({tuple(r.scores.shape) for r in [*ra.values(), *rb.values()]}) > 1:
        raise ValueError("the two reports' [layer, head] shapes differ: they are not of one model")
    mode = "runs" if (same_model(sa, sb, ra, rb) if same is None else same) else "models"
    out = {"mode": mode, "analyzers": {}, "only_a": [n for n in ra if n not in rb],
           "only_b": [n for n in rb if n not in ra]}
    for n in common:
        x, y = ra[n], rb[n]
        d = {"top_a": x.top(k), "top_b": y.top(k), "tie_a": tie_note(x), "tie_b": tie_note(y)}
        if mode == "runs":
            diff = float((x.scores - y.scores).abs().max())
            scale = float(torch.maximum(x.scores.abs(), y.scores.abs()).max())
            d.update(spearman=spearman(x.scores, y.scores), overlap=top_overlap(x, y, k), max_abs_diff=diff,
                     max_rel_diff=diff / scale if scale > 0 else 0.0)
        else:
            d.update(stats_a=stats(x, k), stats_b=stats(y, k))
        out["analyzers"][n] = d
    return out


def fmt_rho(x: float) -> str:
    """A Spearman rho for a table: three decimals, or "— (constant scores)" when it is None or NaN
    (one map is constant, so there is no rank correlation)."""
    return "— (constant scores)" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


__all__ = ["top_rows", "csv_text", "write_csv", "spearman", "top_overlap", "compare", "stats", "fmt_num"]
