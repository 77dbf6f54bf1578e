"""The head report: run analyzers on a model and write report.html, scores.json and raw tensors.

The whole report is written into a temporary folder beside the output folder and renamed into
place at the end (``app/atomic.py``): an interrupted run or a full disk leaves the earlier report
untouched and nothing half-written, and a re-run replaces the earlier report whole.
"""
from __future__ import annotations

import html
import json
import time
import traceback
from pathlib import Path

import torch

from ..heads import ANALYZERS, HeadScores
from .atomic import check_out_folder, staged_files, staged_folder


def run_analyzers(model, names=None, params: dict | None = None, progress: bool = True, log=print):
    """Run the named analyzers (default: all registered) with their quick defaults (``quick()``
    where an analyzer has one, e.g. the DuoAttention gates).
    Returns ({name: HeadScores}, {name: error message})."""
    names = list(ANALYZERS) if not names else list(names)
    unknown = [n for n in names if n not in ANALYZERS]
    if unknown:
        raise ValueError(f"unknown analyzer(s) {unknown}; available: {sorted(ANALYZERS)}")
    results, errors = {}, {}
    for i, name in enumerate(names):
        t0 = time.time()
        log(f"[{i + 1}/{len(names)}] {name} …")
        try:
            cls = ANALYZERS[name]
            kw = (params or {}).get(name, {})
            # analyzers whose defaults train or sweep for minutes offer a quick() preset for reports
            an = cls.quick(**kw) if hasattr(cls, "quick") else cls(**kw)
            results[name] = an.score(model, progress=progress)
            log(f"[{i + 1}/{len(names)}] {name} done in {time.time() - t0:.1f}s")
        except Exception as e:  # one failing analyzer must not sink the whole report
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"[{i + 1}/{len(names)}] {name} FAILED: {errors[name]}")
            log(traceback.format_exc(limit=3))
    return results, errors


def combined_map(results: dict[str, HeadScores]):
    """One layer × head map: each head coloured by the analyzer where it stands out most (the
    largest z-score of its score among that analyzer's heads, so a score most heads share counts
    for little); hover lists every analyzer's score."""
    import plotly.graph_objects as go
    names = list(results)
    if not names:
        return None
    S = torch.stack([r.scores for r in results.values()])                    # [M, L, H]
    flat = S.flatten(1)
    rel = (S - flat.mean(-1)[:, None, None]) / flat.std(-1).clamp_min(1e-12)[:, None, None]
    best = rel.argmax(0)                                                      # [L, H]
    L, H = best.shape
    text = [[("<br>".join(f"{n}: {float(S[m, l, h]):.3f}" for m, n in enumerate(names)))
             for h in range(H)] for l in range(L)]
    fig = go.Figure(go.Heatmap(
        z=best.numpy(), text=text, hovertemplate="L%{y} H%{x}<br>%{text}<extra></extra>",
        colorscale=[[i / max(1, len(names) - 1), c] for i, c in
                    enumerate(["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3",
                               "#ff6692", "#b6e880", "#ff97ff", "#fecb52"][:len(names)])] if len(names) > 1
        else "Viridis",
        colorbar=dict(tickvals=list(range(len(names))), ticktext=names, title="stands out in"),
        zmin=0, zmax=max(1, len(names) - 1)))
    fig.update_layout(title="Combined head map", xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed", height=max(320, 18 * L + 140))
    return fig


def _section(r: HeadScores) -> str:
    top = r.top(8)
    rows = "".join(f"<tr><td>L{l}</td><td>H{h}</td><td>{s:.4f}</td></tr>" for l, h, s in top)
    frac = ""
    if r.threshold is not None:
        frac = (f"<p>{int(r.classify().sum())} of {r.scores.numel()} heads ({100 * r.fraction():.1f}%) score "
                f"above the paper's threshold {r.threshold}.</p>")
    params = html.escape(json.dumps(r.params, default=str))
    fig = r.plot().to_html(full_html=False, include_plotlyjs=False)
    return (f"<section id='{r.method}'><h2>{html.escape(r.method)}</h2>"
            f"<p><b>Follows:</b> {html.escape(r.paper)}</p><p><b>What the score means:</b> "
            f"{html.escape(r.description)}</p>{frac}<p><b>Data:</b> {html.escape(r.dataset)}; "
            f"<b>parameters:</b> <code>{params}</code>; {r.seconds:.1f}s</p>"
            f"<table><tr><th>layer</th><th>head</th><th>score</th></tr>{rows}</table>{fig}</section>")


def write_report(model, results: dict[str, HeadScores], errors: dict[str, str], out: Path) -> Path:
    """Write report.html, scores.json and raw/NAME.{json,safetensors} into the folder ``out``, whole
    or not at all: ``out`` must be new, empty, or an earlier report (which is replaced whole).
    Analyzers in ``errors`` are listed as failed in report.html and scores.json."""
    import plotly.offline
    out = check_out_folder(out)
    summary = {"model": model.cfg.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "analyzers": {n: r.meta() for n, r in results.items()}, "errors": errors}
    cm = combined_map(results)
    parts = [f"<h1>headscope report — {html.escape(model.cfg.name)}</h1>",
             f"<p>{model.cfg.n_layers} layers × {model.cfg.n_heads} heads ({model.cfg.n_kv_heads} KV heads), "
             f"d_head {model.cfg.d_head}, context {model.cfg.max_ctx}. Generated {summary['created']}.</p>",
             "<ul>" + "".join(f"<li><a href='#{n}'>{n}</a></li>" for n in results)
             + "".join(f"<li>{html.escape(n)} — FAILED</li>" for n in errors) + "</ul>"]
    if errors:
        parts.append("<h2 id='failed'>Failed analyzers</h2><ul>" + "".join(
            f"<li>{html.escape(n)}: {html.escape(e)}</li>" for n, e in errors.items()) + "</ul>")
    if cm is not None:
        parts.append(cm.to_html(full_html=False, include_plotlyjs=False))
    parts += [_section(r) for r in results.values()]
    js = plotly.offline.get_plotlyjs()
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>headscope report</title>"
           f"<script>{js}</script><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>"
           + "\n".join(parts) + "</body></html>")
    with staged_folder(out) as tmp:
        for name, r in results.items():
            r.save(tmp / "raw" / name)
        (tmp / "scores.json").write_text(json.dumps(summary, indent=1, default=str))
        (tmp / "report.html").write_text(doc, encoding="utf-8")
    return out / "report.html"


def score_paths(path) -> tuple[Path, Path]:
    """Where ``HeadScores.save(path)`` writes: (PATH.json, PATH.safetensors)."""
    base = Path(path).expanduser().absolute()
    base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
    return base.with_suffix(".json"), base.with_suffix(".safetensors")


def save_scores(result: HeadScores, path) -> Path:
    """``result.save(path)`` written whole: PATH.json and PATH.safetensors both appear (renamed from
    a temporary folder beside them, after both were written) or neither changes. Returns the json path."""
    js, st = score_paths(path)
    with staged_files([st, js]) as tmp:
        result.save(tmp / js.name)
    return js
