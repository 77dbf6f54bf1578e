"""The head report: run analyzers on a model and write report.html, scores.json and raw tensors.

The whole report is written into a temporary folder beside the output folder and renamed into
place at the end (``app/atomic.py``): an interrupted run or a full disk leaves the earlier report
untouched and nothing half-written, and a re-run replaces the earlier report whole.

Two presets: ``quick`` (each analyzer's ``quick()`` settings, minutes on a CPU) and ``paper`` (each
analyzer's ``paper_config()``, the papers' settings: hours on a CPU, the run to make on a GPU).
``estimate_seconds`` says roughly how long a preset takes before it starts.

Which heads "stand out": per analyzer, a head's z-score (its score minus the mean over all heads,
over their standard deviation) is at least ``STAND_OUT_Z``. The combined map gives each head the
analyzer where its z-score is largest among those, or "none".
"""
from __future__ import annotations

import html
import json
import math
import time
import traceback
from pathlib import Path

import torch

from ..heads import ANALYZERS, HeadScores
from .atomic import check_out_folder, staged_files, staged_folder

PRESETS = ("quick", "paper")
STAND_OUT_Z = 3.0            # a head stands out in an analyzer when its z-score is at least this
NONE_COLOUR = "#d9d9d9"

# analyzers left out of the quick (default) report, and why (they stay available through --only)
QUICK_SKIPPED = {
    "duo": ("DuoAttention's gates need thousands of optimisation steps on long passkey contexts; the "
            "quick setting (12 steps) leaves every gate near its start value, so its top heads are ties "
            "and rank nothing. Run it with `headscope report --preset paper --only duo` on a GPU, or use "
            "the training-free `streaming` proxy of the same paper (in this report)."),
}

# Quick-setting timings on SmolLM2-135M (CPU, one thread of a shared 2-core machine, 2026-11-23..12-01,
# from REPORTS.md), seconds; the base of estimate_seconds.
QUICK_SECONDS_SMOLLM2 = {
    "sinks": 8.4, "hidden_sinks": 9.6, "induction": 13.7, "echo": 9.6, "previous_token": 6.0,
    "duplicate_token": 6.4, "ships": 57.8, "sahara": 55.1, "preplan": 11.9, "retrieval": 85.0,
    "streaming": 17.0, "duo": 34.6,
}
_SMOLLM2 = dict(n_layers=30, d_model=576, max_ctx=8192, n_heads=9)


def make_analyzer(name: str, preset: str = "quick", **kw):
    """The analyzer ``name`` with the preset's settings: ``quick()`` or ``paper_config()``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    cls = ANALYZERS[name]
    return cls.paper_config(**kw) if preset == "paper" else cls.quick(**kw)


def default_names(preset: str = "quick") -> list[str]:
    """The analyzers a report runs when none are named: all of them, less ``QUICK_SKIPPED`` in quick."""
    return [n for n in ANALYZERS if preset == "paper" or n not in QUICK_SKIPPED]


def run_analyzers(model, names=None, params: dict | None = None, progress: bool = True, log=print,
                  preset: str = "quick", pool=None):
    """Run the named analyzers (default: ``default_names(preset)``) with the preset's settings
    (``quick()`` or ``paper_config()``). With a ``distributed.ModelPool`` as ``pool``, analyzers whose
    work splits into items run on its workers (same results). Returns ({name: HeadScores}, {name:
    error message})."""
    names = default_names(preset) if not names else list(names)
    unknown = [n for n in names if n not in ANALYZERS]
    if unknown:
        raise ValueError(f"unknown analyzer(s) {unknown}; available: {sorted(ANALYZERS)}")
    results, errors = {}, {}
    for i, name in enumerate(names):
        t0 = time.time()
        log(f"[{i + 1}/{len(names)}] {name} …")
        try:
            an = make_analyzer(name, preset, **(params or {}).get(name, {}))
            if pool is not None:
                from .distributed import score
                results[name] = score(pool, model, an, progress=progress)
            else:
                results[name] = an.score(model, progress=progress)
            log(f"[{i + 1}/{len(names)}] {name} done in {time.time() - t0:.1f}s")
        except Exception as e:  # one failing analyzer must not sink the whole report
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"[{i + 1}/{len(names)}] {name} FAILED: {errors[name]}")
            log(traceback.format_exc(limit=3))
    return results, errors


# ------------------------------------------------------------------ run-time estimate
def _tok_cost(n: float, ctx: int = 8192) -> float:
    """Relative cost of a forward over n tokens: linear (MLP, projections) + quadratic attention."""
    return n * (1 + n / ctx)


def _work(name: str, an, cfg: dict) -> float:
    """Relative amount of work of analyzer ``an`` on a model with config ``cfg`` (same units within
    one analyzer only: estimate_seconds uses paper/quick ratios)."""
    p = an.params()
    L, H, ctx = cfg.get("n_layers", 30), cfg.get("n_heads", 9), cfg.get("max_ctx", 8192) or 8192
    if name in ("induction", "echo"):
        return _tok_cost(4 * p["block_len"] + 1)
    if name == "sinks":
        return p["n_samples"] * _tok_cost(p["n_tokens"])
    if name == "streaming":
        n = p["length"] or min(ctx, 8192)
        return p["n_texts"] * _tok_cost(n)
    if name == "preplan":
        from ..heads.data import load_reasoning_prompts
        k = len(load_reasoning_prompts()) if p["n_prompts"] is None else p["n_prompts"]
        return k * p["max_new_tokens"]
    if name == "retrieval":
        from ..heads.data import load_needles
        lengths = p["lengths"] or [float(x) for x in torch.linspace(min(1000, ctx - 200), ctx - 200, p["n_lengths"])]
        k = len(load_needles()) if p["needles"] is None else p["needles"]
        return k * len(p["depths"]) * sum(_tok_cost(n) + p["max_new_tokens"] * n / 64 for n in lengths)
    if name in ("ships", "sahara"):
        from ..heads.data import load_requests
        q = len(load_requests("harmful")) if p["n_queries"] is None else p["n_queries"]
        s = p["screen_layers"]
        heads = L * H if s is None or s >= L else L + s * H
        return q * heads * p.get("rounds", 1)
    if name == "duo":
        return p["steps"] * p["n_samples"] ** 0 * _tok_cost((p["length_min"] + p["length_max"]) / 2)
    return 1.0


def estimate_seconds(model_cfg: dict, names, preset: str = "quick") -> dict[str, float]:
    """A rough run-time estimate per analyzer, in seconds on one CPU thread: the quick timings measured
    on SmolLM2 (``QUICK_SECONDS_SMOLLM2``), scaled by the preset's work (tokens, prompts, heads) over the
    quick setting's and by the model's size (layers × d_model²). An estimate, not a measurement: the
    attention cost, the decode length and a GPU change it a lot."""
    size = (model_cfg.get("n_layers", 30) * model_cfg.get("d_model", 576) ** 2) / \
        (_SMOLLM2["n_layers"] * _SMOLLM2["d_model"] ** 2)
    out = {}
    for n in names:
        base = QUICK_SECONDS_SMOLLM2.get(n, 30.0)
        try:
            q = _work(n, make_analyzer(n, "quick"), _SMOLLM2)
            w = _work(n, make_analyzer(n, preset), model_cfg)
            ratio = w / q if q > 0 else 1.0
        except Exception:  # noqa: BLE001 - an analyzer whose parameters we do not know: no scaling
            ratio = 1.0
        out[n] = base * ratio * max(size, 0.05)
    return out


def format_duration(s: float) -> str:
    """Seconds as a short duration for run-time estimates: "45 s" below 90 s, minutes below 1.5 h,
    hours (one decimal) below 2 days, else days."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


# ------------------------------------------------------------------ which heads stand out
def zscores(results: dict[str, HeadScores]) -> torch.Tensor:
    """[analyzer, layer, head] z-scores of each analyzer's scores over its own heads (0 where an
    analyzer gives every head the same score). Raises ValueError if the maps differ in shape."""
    shapes = {n: tuple(r.scores.shape) for n, r in results.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the analyzers' score maps differ in shape: {shapes}")
    S = torch.stack([r.scores.float() for r in results.values()])               # [M, L, H]
    flat = S.flatten(1)
    sd = flat.std(-1)
    z = (S - flat.mean(-1)[:, None, None]) / sd.clamp_min(1e-12)[:, None, None]
    return torch.where(sd[:, None, None] > 1e-9, z, torch.zeros_like(z))


def head_classes(results: dict[str, HeadScores], z: float = STAND_OUT_Z) -> tuple[torch.Tensor, list[str]]:
    """[layer, head] class index: the analyzer (index into ``list(results)``) where the head's z-score
    is largest among those where it is at least ``z``; -1 ("none") where it stands out nowhere."""
    names = list(results)
    Z = zscores(results)                                                         # [M, L, H]
    best = Z.argmax(0)
    return torch.where(Z.max(0).values >= z, best, torch.full_like(best, -1)), names


def palette(n: int) -> list[str]:
    """n distinct categorical colours (plotly's qualitative palettes)."""
    import plotly.colors as pc
    base = pc.qualitative.Plotly if n <= 10 else pc.qualitative.Dark24 + pc.qualitative.Light24
    return [base[i % len(base)] for i in range(n)]


def combined_map(results: dict[str, HeadScores], z: float = STAND_OUT_Z):
    """One layer × head map, one qualitative colour per analyzer: each head takes the analyzer where
    it stands out most (z-score ≥ ``z``), grey "none" where it stands out nowhere; hover lists every
    analyzer's score and z-score."""
    import plotly.graph_objects as go
    if not results:
        return None
    cls, names = head_classes(results, z)
    Z = zscores(results)
    S = torch.stack([r.scores for r in results.values()])
    L, H = cls.shape
    K = len(names) + 1                                                            # "none" + analyzers
    colours = [NONE_COLOUR] + palette(len(names))
    scale = []
    for i, c in enumerate(colours):
        scale += [[i / K, c], [(i + 1) / K, c]]
    labels = ["none"] + names
    text = [[f"class: {labels[int(cls[l, h]) + 1]}<br>" + "<br>".join(
        f"{n}: {float(S[m, l, h]):.3g} (z {float(Z[m, l, h]):+.1f})" for m, n in enumerate(names))
        for h in range(H)] for l in range(L)]
    fig = go.Figure(go.Heatmap(
        z=(cls + 1).numpy(), x=list(range(H)), y=list(range(L)), text=text, colorscale=scale,
        zmin=-0.5, zmax=K - 0.5, xgap=1, ygap=1,
        hovertemplate="L%{y} H%{x}<br>%{text}<extra></extra>",
        colorbar=dict(tickvals=list(range(K)), ticktext=labels, title="stands out in")))
    fig.update_layout(title="Combined head map", xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed", height=max(320, 18 * L + 140))
    return fig


def combined_caption(z: float = STAND_OUT_Z) -> str:
    """The sentence under the combined head map: how a head's class is chosen (z-score at least ``z``
    and the largest among the analyzers where it stands out; grey when none)."""
    return (f"Each head is coloured by the analyzer in which it stands out most: its z-score there (score "
            f"minus the mean over all heads, over their standard deviation) is at least {z:g}, and larger "
            "than in any other analyzer where it stands out. Grey: the head stands out in no analyzer. "
            "Hover a head for every analyzer's score and z-score.")


def _head(l, h) -> str:
    return f"L{l} H{h}"


def summary_lines(results: dict[str, HeadScores], z: float = STAND_OUT_Z, max_heads: int = 15) -> list[str]:
    """The cross-analyzer summary, in sentences: heads that stand out in several analyzers, then one
    line per analyzer (how many heads stand out, the top one, ties)."""
    if not results:
        return ["No analyzer produced a result."]
    try:
        Z = zscores(results)
    except ValueError as e:
        return [f"No cross-analyzer summary: {e}."]
    names = list(results)
    hit = Z >= z                                                                  # [M, L, H]
    count = hit.sum(0)                                                            # [L, H]
    lines = []
    multi = torch.nonzero(count >= 2).tolist()
    multi.sort(key=lambda lh: (-int(count[lh[0], lh[1]]), -float(Z[:, lh[0], lh[1]].max())))
    if multi:
        lines.append(f"{len(multi)} head(s) stand out (z ≥ {z:g}) in two or more analyzers:")
        for l, h in multi[:max_heads]:
            parts = [f"{names[m]} ({float(results[names[m]].scores[l, h]):.3g}, z {float(Z[m, l, h]):.1f})"
                     for m in torch.nonzero(hit[:, l, h]).flatten().tolist()]
            lines.append(f"{_head(l, h)} stands out in {', '.join(parts[:-1])} and {parts[-1]}.")
        if len(multi) > max_heads:
            lines.append(f"… and {len(multi) - max_heads} more (scores.json holds every score).")
    else:
        lines.append(f"No head stands out (z ≥ {z:g}) in more than one analyzer.")
    for m, n in enumerate(names):
        r = results[n]
        k = int(hit[m].sum())
        (l, h, v), = r.top(1)
        tie = tie_note(r)
        if tie:
            lines.append(f"{n}: {tie}")
        elif k:
            lines.append(f"{n}: {k} head(s) stand out; the top one is {_head(l, h)} ({v:.3g}).")
        else:
            lines.append(f"{n}: no head stands out from the others (median {float(r.scores.median()):.3g}, "
                         f"top {_head(l, h)} {v:.3g}): a z-score finds outliers, not a property most heads share.")
    return lines


def tie_note(r: HeadScores, k: int = 8) -> str:
    """A sentence when the top ``k`` heads all tie (the table would rank nothing), else ''."""
    top = r.top(k)
    if len(top) > 1 and max(v for *_, v in top) - min(v for *_, v in top) <= 1e-6 * max(1.0, abs(top[0][2])):
        n_tied = int((r.scores - top[0][2]).abs().le(1e-6 * max(1.0, abs(top[0][2]))).sum())
        return (f"{n_tied} heads tie at the top score {top[0][2]:.4g}: this run does not separate heads "
                "(too few steps or samples for this analyzer); read its ranking as no result.")
    return ""


def fmt_num(x) -> str:
    """A threshold or score for people: 3 significant digits."""
    if x is None:
        return "—"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def threshold_line(r: HeadScores) -> str:
    """'N of M heads (x%) score above …' with the threshold's origin, or ''."""
    if r.threshold is None:
        return ""
    n = int(r.classify().sum())
    origin = "the split threshold at sparsity " + fmt_num(r.params["sparsity"]) if "split_threshold" in r.params \
        and "sparsity" in r.params else "the paper's threshold"
    return (f"{n} of {r.scores.numel()} heads ({100 * n / r.scores.numel():.1f}%) score above {origin} "
            f"({fmt_num(r.threshold)}).")


def _short(v, limit: int = 80) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _section(r: HeadScores) -> str:
    top = r.top(8)
    rows = "".join(f"<tr><td>L{l}</td><td>H{h}</td><td>{s:.4f}</td></tr>" for l, h, s in top)
    tie = tie_note(r)
    note = f"<p class='warn'><b>No ranking:</b> {html.escape(tie)}</p>" if tie else ""
    frac = f"<p>{html.escape(threshold_line(r))}</p>" if r.threshold is not None else ""
    params = "; ".join(f"{html.escape(str(k))}={html.escape(_short(v))}" for k, v in r.params.items())
    info = ""
    if r.info:
        info = ("<details><summary>model outputs and other results kept with the scores (HeadScores.info): "
                + html.escape(", ".join(map(str, r.info))) + "</summary><ul>" + "".join(
                    f"<li><code>{html.escape(str(k))}</code>: {html.escape(_short(v, 300))}</li>"
                    for k, v in r.info.items()) + "</ul></details>")
    fig = r.plot().to_html(full_html=False, include_plotlyjs=False)
    table = "" if tie else (f"<table><tr><th>layer</th><th>head</th><th>score</th></tr>{rows}</table>")
    return (f"<section id='{html.escape(r.method)}'><h2>{html.escape(r.method)}</h2>"
            f"<p><b>Follows:</b> {html.escape(r.paper)}</p><p><b>What the score means:</b> "
            f"{html.escape(r.description)}</p>{note}{frac}<p><b>Data:</b> {html.escape(r.dataset)}; "
            f"{r.seconds:.1f}s</p><p><b>Parameters:</b> <code>{params}</code></p>{info}"
            f"{table}{fig}</section>")


def write_report(model, results: dict[str, HeadScores], errors: dict[str, str], out: Path,
                 preset: str = "quick", skipped: dict[str, str] | None = None) -> Path:
    """Write report.html, scores.json and raw/NAME.{json,safetensors} into the folder ``out``, whole
    or not at all: ``out`` must be new, empty, or an earlier report (which is replaced whole).
    Analyzers in ``errors`` are listed as failed, those in ``skipped`` ({name: why}) as left out."""
    import plotly.offline
    out = check_out_folder(out)
    skipped = dict(skipped or {})
    summary = {"model": model.cfg.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": preset,
               "analyzers": {n: r.meta() for n, r in results.items()}, "errors": errors, "skipped": skipped}
    try:
        cm = combined_map(results)
    except ValueError:
        cm = None
    lines = summary_lines(results)
    parts = [f"<h1>headscope report — {html.escape(model.cfg.name)}</h1>",
             f"<p>{model.cfg.n_layers} layers × {model.cfg.n_heads} heads ({model.cfg.n_kv_heads} KV heads), "
             f"d_head {model.cfg.d_head}, context {model.cfg.max_ctx}. Preset <b>{html.escape(preset)}</b> "
             f"({'each analyzer’s quick settings: a CPU smoke run' if preset == 'quick' else 'the papers’ settings'}). "
             f"Generated {summary['created']}.</p>",
             "<h2 id='summary'>Summary</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>",
             "<ul>" + "".join(f"<li><a href='#{html.escape(n)}'>{html.escape(n)}</a></li>" for n in results)
             + "".join(f"<li>{html.escape(n)} — FAILED</li>" for n in errors)
             + "".join(f"<li>{html.escape(n)} — not run (see below)</li>" for n in skipped) + "</ul>"]
    if skipped:
        parts.append("<h2 id='skipped'>Not in this report</h2><ul>" + "".join(
            f"<li><b>{html.escape(n)}</b>: {html.escape(w)}</li>" for n, w in skipped.items()) + "</ul>")
    if errors:
        parts.append("<h2 id='failed'>Failed analyzers</h2><ul>" + "".join(
            f"<li>{html.escape(n)}: {html.escape(e)}</li>" for n, e in errors.items()) + "</ul>")
    if cm is not None:
        parts.append(cm.to_html(full_html=False, include_plotlyjs=False))
        parts.append(f"<p class='caption'>{html.escape(combined_caption())}</p>")
    parts += [_section(r) for r in results.values()]
    js = plotly.offline.get_plotlyjs()
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>headscope report</title>"
           f"<script>{js}</script><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
           ".warn{background:#fff3cd;padding:4px}.caption{color:#555;font-size:90%}</style></head><body>"
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
