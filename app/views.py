"""What the Streamlit explorer shows, as plain functions (no Streamlit here, so they are testable):
saved reports and their head map, live per-head statistics, one head's attention pattern (short
text) and per-token statistics (any length), saved circuits, and the intervention playground
(next-token distribution and greedy text before and after an edit).

All model work goes through the probe (``record``, ``run_with_cache``, ``edit``, ``generate``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..heads import HeadScores

LIVE_STATS = {
    "sink_mass": "attention on the first token (Gu et al. 2024's sink mass, k = 1)",
    "entropy": "entropy of the attention row, nats (high = spread out)",
    "distance": "mean attention distance t - s, tokens (high = looks far back)",
    "max_prob": "weight of the most-attended key (high = focused)",
}


class ReportError(ValueError):
    """A report folder that cannot be shown (the message says what is wrong and what to do)."""


def report_signature(folder) -> tuple:
    """(path, mtime_ns, size) of the folder's scores.json, or () when it has none: a cache key that
    changes when the report is written again (``headscope report`` replaces the folder whole)."""
    p = Path(folder).expanduser() / "scores.json"
    try:
        st = p.stat()
    except OSError:
        return ()
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def load_report(folder) -> tuple[dict, dict[str, HeadScores]]:
    """A folder written by ``headscope report`` -> (scores.json summary, {analyzer: HeadScores}).
    A malformed folder (no scores.json, bad JSON, a missing or unreadable analyzer file) raises
    ``ReportError`` (a ValueError; FileNotFoundError for a missing scores.json) saying which file."""
    folder = Path(folder).expanduser()
    summary_path = folder / "scores.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{folder} has no scores.json: make one with "
                                f"`headscope report --model smollm2 --out {folder}`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{summary_path} is not valid JSON ({e}); re-run `headscope report`") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("analyzers", {}), dict) \
            or not isinstance(summary.get("errors", {}), dict):
        raise ReportError(f"{summary_path} is not a headscope report summary (expected an object with "
                          "'analyzers' and 'errors'); re-run `headscope report`")
    results = {}
    for name in summary.get("analyzers", {}):
        path = folder / "raw" / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (scores.json lists {name!r}); re-run `headscope report`")
        try:
            results[name] = HeadScores.load(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file becomes one message naming it
            raise ReportError(f"cannot read {name!r} from {path.with_suffix('')}.{{json,safetensors}}: "
                              f"{type(e).__name__}: {e}; re-run `headscope report`") from None
    return summary, results


def parse_heads(text: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """"L12H4, L3H0" (or "12.4 3.0") -> [(12, 4), (3, 0)], checked against the model's size."""
    out = []
    for item in text.replace(",", " ").split():
        s = item.upper().replace("L", " ").replace("H", " ").replace(".", " ").split()
        if len(s) != 2 or not all(x.isdigit() for x in s):
            raise ValueError(f"cannot read head {item!r}: write heads as L12H4 (layer 12, head 4)")
        l, h = int(s[0]), int(s[1])
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ValueError(f"head {item} is out of range: layers 0..{n_layers - 1}, heads 0..{n_heads - 1}")
        out.append((l, h))
    return out


def live_stats(model, text: str, chat: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One forward pass with O(N) statistics on every layer -> ({stat: [layer, head] mean over
    query positions}, tokens as strings)."""
    import headscope as hs
    toks = model.to_tokens(text, chat=chat)                                     # [1, N]
    if toks.shape[1] > model.cfg.max_ctx:
        raise ValueError(f"the prompt is {toks.shape[1]} tokens; {model.cfg.name} takes at most {model.cfg.max_ctx}")
    with torch.no_grad(), model.record(hs.Stats(sink_k=1, entropy=True, distance=True, argmax=True)) as rec:
        model(toks)
    out = {name: rec.stack(name)[:, 0].float().mean(-1) for name in LIVE_STATS}  # [layer, head]
    words = [model.tokenizer.decode([int(t)]) for t in toks[0]]
    return out, words


def stat_figure(values: torch.Tensor, name: str, model_name: str = ""):
    """[layer, head] -> plotly heatmap."""
    hs_ = HeadScores(scores=values, method=name, model={"name": model_name}, description=LIVE_STATS.get(name, ""))
    return hs_.plot(title=f"{name} — {LIVE_STATS.get(name, '')}")


def pattern_figure(model, text: str, layer: int, head: int, chat: bool = True, max_tokens: int = 256,
                   hide_first: bool = False, log: bool = False):
    """The attention pattern of one head on a short prompt (full [query, key] matrix: refused
    beyond ``max_tokens``; use ``token_stats`` for long inputs). ``hide_first`` drops the first key
    column (the attention sink that swamps the colour scale); ``log`` colours by log10(p)."""
    import plotly.graph_objects as go
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= layer < L and 0 <= head < H):
        raise ValueError(f"L{layer}H{head} is out of range: layers 0..{L - 1}, heads 0..{H - 1}")
    toks = model.to_tokens(text, chat=chat)
    n = toks.shape[1]
    if n > max_tokens:
        raise ValueError(f"the prompt is {n} tokens; the pattern view shows at most {max_tokens} "
                         "(the per-head statistics work at any length)")
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=name)
    p = cache[name][0, head].float()                                             # [query, key]
    words = [f"{i}:{model.tokenizer.decode([int(t)])!r}" for i, t in enumerate(toks[0])]
    keys = words
    if hide_first and n > 1:
        p, keys = p[:, 1:], words[1:]                                            # [query, key - 1]
    if log:
        z = torch.log10(p.clamp_min(1e-6))
        z = torch.where(torch.tril(torch.ones(n, n, dtype=torch.bool))[:, -p.shape[1]:], z, torch.full_like(z, float("nan")))
        hm = go.Heatmap(z=z.numpy(), x=keys, y=words, colorscale="Blues", zmin=-6, zmax=0, customdata=p.numpy(),
                        colorbar=dict(title="log10 p"),
                        hovertemplate="query %{y}<br>key %{x}<br>p = %{customdata:.2e}<extra></extra>")
    else:
        hm = go.Heatmap(z=p.numpy(), x=keys, y=words, colorscale="Blues", zmin=0, zmax=float(p.max()) if hide_first else 1,
                        hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.3f}<extra></extra>")
    fig = go.Figure(hm)
    extra = ", first token hidden" if hide_first else ""
    fig.update_layout(title=f"attention pattern L{layer} H{head}{extra}{', log scale' if log else ''}",
                      xaxis_title="key", yaxis_title="query",
                      yaxis_autorange="reversed", height=max(400, 12 * n + 150))
    return fig


def ablation_compare(model, text: str, heads: list[tuple[int, int]], how: str = "zero",
                     max_new_tokens: int = 32, chat: bool = True) -> tuple[str, str]:
    """Greedy continuation without and with ``heads`` ablated -> (baseline, ablated)."""
    import headscope as hs
    toks = model.to_tokens(text, chat=chat)
    n = toks.shape[1]

    def gen():
        with torch.no_grad():
            out = model.generate(toks, max_new_tokens=max_new_tokens)
        return model.tokenizer.decode(out[0, n:], skip_special_tokens=True)

    base = gen()
    with model.edit([hs.Ablate(l, h, how=how) for l, h in heads]):
        edited = gen()
    return base, edited


# ------------------------------------------------------------------ head map (saved report)
def head_map(results: dict[str, HeadScores], z: float | None = None):
    """Scatter version of the report's combined map (one square per head, one qualitative colour per
    class, grey "none"), so a click selects a head: each point's ``customdata`` is [layer, head].
    Returns (figure, classes [layer, head] as analyzer names or "none")."""
    import plotly.graph_objects as go

    from .report import NONE_COLOUR, STAND_OUT_Z, head_classes, palette, zscores
    z = STAND_OUT_Z if z is None else z
    cls, names = head_classes(results, z)
    Z = zscores(results)
    L, H = cls.shape
    colours = dict(zip(names, palette(len(names))))
    labels = [[names[int(cls[l, h])] if cls[l, h] >= 0 else "none" for h in range(H)] for l in range(L)]
    fig = go.Figure()
    for name in ["none", *names]:
        pts = [(l, h) for l in range(L) for h in range(H) if labels[l][h] == name]
        if not pts:
            continue
        text = ["<br>".join(f"{n}: {float(results[n].scores[l, h]):.3g} (z {float(Z[m, l, h]):+.1f})"
                            for m, n in enumerate(names)) for l, h in pts]
        fig.add_trace(go.Scatter(
            x=[h for _, h in pts], y=[l for l, _ in pts], mode="markers", name=name,
            marker=dict(symbol="square", size=max(8, min(22, 600 // max(L, H))),
                        color=NONE_COLOUR if name == "none" else colours[name]),
            customdata=[[l, h] for l, h in pts], text=text,
            hovertemplate="L%{y} H%{x}<br>" + f"class: {name}<br>" + "%{text}<extra></extra>"))
    fig.update_layout(title="Head map (click a head to open it)", xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed", height=max(360, 20 * L + 160), legend_title="stands out in",
                      xaxis=dict(dtick=1), yaxis=dict(dtick=1),
                      clickmode="event+select")
    return fig, labels


def heads_of_class(labels: list[list[str]], name: str) -> list[tuple[int, int]]:
    """The heads whose head-map class is ``name``."""
    return [(l, h) for l, row in enumerate(labels) for h, c in enumerate(row) if c == name]


# ------------------------------------------------------------------ head view, long text
TOKEN_STATS = {
    "received": "attention this token receives: mean over the later queries that see it",
    "sink_mass": "attention this query puts on the first token",
    "distance": "mean distance (tokens) from this query to what it attends to",
}


def token_stats(model, text: str, layer: int, head: int, chat: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-token statistics of one head in one O(N)-memory pass (no [N, N] pattern, any length up
    to the model's context): {"received": [N], "sink_mass": [N], "distance": [N]}, and the tokens."""
    import headscope as hs
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= layer < L and 0 <= head < H):
        raise ValueError(f"L{layer}H{head} is out of range: layers 0..{L - 1}, heads 0..{H - 1}")
    toks = model.to_tokens(text, chat=chat)                                       # [1, N]
    if toks.shape[1] > model.cfg.max_ctx:
        raise ValueError(f"the text is {toks.shape[1]} tokens; {model.cfg.name} takes at most {model.cfg.max_ctx}")
    with torch.no_grad(), model.record(hs.Stats(sink_k=1, distance=True, received=True), layers=[layer]) as rec:
        model(toks)
    out = {"received": rec.received_mean(layer)[0, head].float(),                  # [N]
           "sink_mass": rec["sink_mass", layer][0, head].float(),                   # [N]
           "distance": rec["distance", layer][0, head].float()}                     # [N]
    words = [model.tokenizer.decode([int(t)]) for t in toks[0]]
    return out, words


def token_stats_figure(stats: dict[str, torch.Tensor], words: list[str], title: str = ""):
    """The per-token statistics as lines over token positions (hover shows the token)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    names = list(stats)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, subplot_titles=[TOKEN_STATS.get(n, n) for n in names])
    for i, n in enumerate(names, 1):
        fig.add_trace(go.Scatter(x=list(range(len(words))), y=stats[n].tolist(), mode="lines", name=n,
                                 text=[repr(w) for w in words], hovertemplate="%{x}: %{text}<br>%{y:.3g}<extra></extra>"),
                      row=i, col=1)
    fig.update_layout(title=title, height=180 * len(names) + 80, showlegend=False)
    return fig


def token_html(words: list[str], values: torch.Tensor, skip_first: bool = True) -> str:
    """The text with each token's background shaded by ``values`` (darker = larger; scaled to the
    largest value, leaving out the first token when ``skip_first``, which usually dwarfs the rest)."""
    import html as _html
    v = values.float()
    ref = v[1:] if skip_first and v.numel() > 1 else v
    top = float(ref.max()) if ref.numel() else 1.0
    top = top if top > 0 else 1.0
    spans = []
    for i, (w, x) in enumerate(zip(words, v.tolist())):
        a = min(1.0, max(0.0, x / top))
        spans.append(f"<span title='{i}: {x:.3g}' style='background: rgba(214, 39, 40, {a:.2f})'>"
                     f"{_html.escape(w).replace(chr(10), '↵<br>')}</span>")
    return "<div style='line-height: 1.9; font-family: monospace'>" + "".join(spans) + "</div>"


# ------------------------------------------------------------------ circuits
def load_circuit(folder):
    """A folder written by ``Circuit.save`` (``headscope circuit ... --out DIR``) -> Circuit; a clear
    FileNotFoundError / ValueError otherwise."""
    from ..circuits.circuit import Circuit
    folder = Path(folder).expanduser()
    if not (folder / "circuit.json").is_file():
        raise FileNotFoundError(f"{folder} has no circuit.json: make one with "
                                f"`headscope circuit ioi --model smollm2 --method eap-ig --out {folder}`")
    try:
        return Circuit.load(folder)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one message naming it
        raise ValueError(f"cannot read the circuit in {folder}: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------ intervention playground
ABLATIONS = ("zero", "mean", "uniform")


def make_edits(model, heads: list[tuple[int, int]], how: str, mean_text: str | None = None):
    """Ablate edits for ``heads``: "zero", "uniform", or "mean" (each head's output replaced by its
    mean z over ``mean_text`` or, by default, the shipped natural text)."""
    import headscope as hs
    if how not in ABLATIONS:
        raise ValueError(f"unknown ablation {how!r}; use one of {', '.join(ABLATIONS)}")
    if how != "mean":
        return [hs.Ablate(l, h, how=how) for l, h in heads]
    if mean_text:
        toks = model.to_tokens(mean_text)
    else:
        from ..heads.data import text_samples
        toks, _ = text_samples(model, n_samples=4, n_tokens=64)
    means = {l: model.mean_z(toks, l) for l in sorted({l for l, _ in heads})}       # [head, d_head]
    return [hs.Ablate(l, h, how="mean", mean=means[l][h]) for l, h in heads]


PLAYGROUND_EDITS = {
    "ablate": "ablate heads (zero / mean / uniform)",
    "act": "ACT: calibrate the heads' hidden sinks",
    "var": "VAR: move attention from sink tokens to a token group",
    "file": "LoFiT or another saved edit file",
    "kv": "KV compression: streaming heads keep sink + recent tokens",
}


def prompt_tokens(model, text: str, chat: bool = True) -> torch.Tensor:
    """The playground's prompt -> token ids [1, N]. A model without a tokenizer (the tiny test
    models) takes the prompt as token ids separated by spaces. Checked against the context length."""
    if model.tokenizer is None:
        V = model.cfg.vocab_size
        items = text.replace(",", " ").split()
        if not items or not all(x.isdigit() for x in items):
            raise ValueError(f"{model.cfg.name} has no tokenizer: type the prompt as token ids separated by "
                             f"spaces (0..{V - 1}), e.g. 5 17 42 9")
        ids = [int(x) for x in items]
        if max(ids) >= V:
            raise ValueError(f"token id {max(ids)} is out of range: {model.cfg.name} has {V} tokens (0..{V - 1})")
        toks = torch.tensor([ids])                                                  # [1, N]
    else:
        toks = model.to_tokens(text, chat=chat)                                      # [1, N]
    if toks.shape[1] > model.cfg.max_ctx:
        raise ValueError(f"the prompt is {toks.shape[1]} tokens; {model.cfg.name} takes at most {model.cfg.max_ctx}")
    return toks


def detokenize(model, ids) -> str:
    """Token ids -> text (ids joined by spaces when the model has no tokenizer)."""
    ids = [int(t) for t in ids]
    if model.tokenizer is None:
        return " ".join(map(str, ids))
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def target_spans(model, toks: torch.Tensor, target: str) -> list[tuple[int, int]]:
    """The VAR token group: "" -> the whole prompt; "a:b" -> token positions a..b-1; any other
    text -> the tokens that overlap its first occurrence in the (decoded) prompt."""
    N = toks.shape[1]
    t = target.strip()
    if not t:
        return [(0, N)]
    parts = t.split(":")
    if len(parts) == 2 and all(x.strip().isdigit() for x in parts):
        a, b = (int(x) for x in parts)
        if not 0 <= a < b <= N:
            raise ValueError(f"token positions {a}:{b} do not fit the prompt: it has {N} tokens (use a:b with "
                             f"0 <= a < b <= {N})")
        return [(a, b)]
    if model.tokenizer is None:
        raise ValueError(f"{model.cfg.name} has no tokenizer: give the token group as positions a:b")
    ends = [len(model.tokenizer.decode(toks[0, :i])) for i in range(N + 1)]      # character end of each prefix
    full = model.tokenizer.decode(toks[0])
    c0 = full.find(t)
    if c0 < 0:
        raise ValueError(f"{t!r} is not in the prompt: type a part of the prompt, or token positions a:b")
    c1 = c0 + len(t)
    inside = [i for i in range(N) if ends[i] < c1 and ends[i + 1] > c0]
    return [(inside[0], inside[-1] + 1)]


def act_playground_edits(model, toks: torch.Tensor, heads: list[tuple[int, int]], beta: float = 0.4,
                         threshold: float = 0.1) -> tuple[list, str]:
    """ACT (Yu et al. 2024, §3.2 eq. 4) on ``heads`` for this prompt: find each head's hidden sinks
    (keys whose mean received attention exceeds ``threshold``, the first sink excluded, §3.1) and
    scale the attention on them by ``beta``. -> (edits, a line saying which keys)."""
    from ..interventions.act import act_edits, hidden_sinks
    sinks = hidden_sinks(model, toks[0], threshold)
    edits = act_edits(sinks, heads, beta)
    if not edits:
        raise ValueError(f"none of {', '.join(f'L{l}H{h}' for l, h in heads)} has a hidden sink on this prompt "
                         f"(a key other than the first sink whose mean received attention exceeds {threshold}): "
                         "pick other heads or lower the threshold")
    found = [f"L{l}H{h}: {sinks[(l, h)]}" for l, h in heads if sinks.get((l, h))]
    missing = [f"L{l}H{h}" for l, h in heads if not sinks.get((l, h))]
    note = f"hidden sinks (token positions) scaled by {beta}: " + "; ".join(found)
    if missing:
        note += f". No hidden sink, left alone: {', '.join(missing)}"
    return edits, note


def var_playground_edits(model, toks: torch.Tensor, target: str = "", p: float = 0.6, rho: float = 0.5,
                         tau: float = 20.0) -> tuple[list, str]:
    """VAR (Kang et al. 2025, §3-4) for this prompt: sink tokens (massive activations above ``tau``)
    inside the token group ``target`` (see ``target_spans``) keep ``p`` of their attention, the rest
    goes to the group's other tokens, in the target-centric heads' rows, on every query row (the
    reference edits only the queries after the group; here the group may be the whole prompt, so the
    playground shows every row: ``var_edits(queries="all")``). -> (edits, a line)."""
    from ..interventions.var import massive_dims, sink_tokens, var_edits
    L = model.cfg.n_layers
    if L < 4:
        raise ValueError(f"VAR edits layers 2..L-2 (the first two and the last are left alone, Kang et al. 2025 §4); "
                         f"{model.cfg.name} has {L} layers, so there is nothing to edit")
    spans = target_spans(model, toks, target)
    dims = massive_dims(model, toks[0], tau)
    if not dims:
        raise ValueError(f"{model.cfg.name} shows no massive-activation dimension above tau = {tau} on this prompt, "
                         "so VAR finds no sink tokens: lower tau")
    sinks = sink_tokens(model, toks[0], dims, tau)
    edits = var_edits(model, sinks, spans, p=p, rho=rho, queries="all")
    if not edits:
        raise ValueError(f"no sink token lies inside the token group {spans} at layers 2..{L - 2} "
                         f"(sinks per layer: {sinks}); widen the group (an empty group is the whole prompt)")
    pos = sorted({k for e in edits for k, _ in e.keys})
    return edits, (f"massive dimensions {dims}; sink tokens {pos} inside the group {spans} keep {p} of their "
                   f"attention on {len(edits)} layers (rows with sink share <= {rho}; every query row, where the "
                   "reference edits only those after the group)")


def kv_stream(model, heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Query heads -> the KV heads that hold them, {layer: [kv heads]} (under grouped-query
    attention a KV head is shared by n_heads / n_kv_heads query heads: all of them go streaming)."""
    rep = model.cfg.n_heads // model.cfg.n_kv_heads
    out: dict[int, list[int]] = {}
    for l, h in heads:
        g = h // rep
        if g not in out.setdefault(l, []):
            out[l].append(g)
    return {l: sorted(g) for l, g in sorted(out.items())}


def kv_playground(model, heads: list[tuple[int, int]], sink: int = 4, recent: int = 16):
    """KV compression (DuoAttention, Xiao et al. 2024, §3.3): the KV heads of ``heads`` keep only the
    first ``sink`` and the last ``recent`` tokens while generating. -> (edits, a function that makes a
    fresh ``HeadClassCache``, a line)."""
    from ..interventions.kv_compress import HeadClassCache, streaming_edits
    stream = kv_stream(model, heads)
    edits = streaming_edits(model, stream, sink, recent)
    rep = model.cfg.n_heads // model.cfg.n_kv_heads
    note = (f"streaming KV heads {', '.join(f'L{l}KV{g}' for l, gs in stream.items() for g in gs)} keep the first "
            f"{sink} and the last {recent} tokens")
    if rep > 1:
        note += f" (each KV head serves {rep} query heads, which all stream)"
    return edits, (lambda: HeadClassCache(stream, model.cfg.n_layers, sink, recent)), note


EDIT_FILES = ("edits.json", "edits.safetensors")


def edit_folder(path) -> Path:
    """The folder of a saved edit file from what a user typed: the folder itself, or one of its two
    files (``edits.json`` / ``edits.safetensors``). A clear FileNotFoundError when neither fits."""
    if not str(path).strip():
        raise FileNotFoundError("give the folder of a saved edit file (written by `headscope intervene ... --out DIR` "
                                "or save_edits), or upload its two files")
    p = Path(str(path).strip()).expanduser()
    if p.is_file() and p.name in EDIT_FILES:
        p = p.parent
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: give the folder of a saved edit file")
    return p


def load_edit_file(path) -> list:
    """``headscope.interventions.load_edits`` with every failure as one message naming the path:
    FileNotFoundError (nothing there) or ValueError (unreadable or not a headscope edit file)."""
    from ..interventions import load_edits
    folder = edit_folder(path)
    try:
        edits = load_edits(folder)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - bad JSON, a missing tensor, a foreign file: one message
        raise ValueError(f"cannot read the edit file in {folder}: {type(e).__name__}: {e}") from None
    if not edits:
        raise ValueError(f"{folder} holds an empty edit list: nothing to apply")
    return edits


def unpack_upload(files: list[tuple[str, bytes]], dest) -> Path:
    """Uploaded files -> a folder under ``dest`` holding ``edits.json`` + ``edits.safetensors``
    (given as the two files or as one .zip of the folder), named by a hash of the contents and
    written to a temporary folder renamed into place. ValueError when the upload is not that."""
    import hashlib
    import io
    import os
    import tempfile
    import zipfile
    got: dict[str, bytes] = {}
    for name, data in files:
        if name.lower().endswith(".zip"):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    for info in z.infolist():
                        base = Path(info.filename).name                      # folder paths inside the zip: ignored
                        if base in EDIT_FILES:
                            got[base] = z.read(info)
            except zipfile.BadZipFile:
                raise ValueError(f"{name} is not a readable zip file") from None
        elif Path(name).name in EDIT_FILES:
            got[Path(name).name] = data
        else:
            raise ValueError(f"{name} is not part of a saved edit file: upload edits.json and edits.safetensors "
                             "(or a .zip of their folder)")
    missing = [n for n in EDIT_FILES if n not in got]
    if missing:
        raise ValueError(f"the upload lacks {', '.join(missing)}: a saved edit file is the pair edits.json + "
                         "edits.safetensors (or a .zip of their folder)")
    digest = hashlib.sha256(b"".join(got[n] for n in EDIT_FILES)).hexdigest()[:16]
    dest = Path(dest)
    final = dest / digest
    if not final.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=dest))
        for n in EDIT_FILES:
            (tmp / n).write_bytes(got[n])
        try:
            os.rename(tmp, final)
        except OSError:                                   # the same upload landed meanwhile
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def next_token_top(model, toks: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
    """The k most likely next tokens after ``toks`` [1, N], with probabilities."""
    with torch.no_grad():
        logits = model(toks)[0, -1].float()                                          # [vocab]
    p = logits.softmax(-1)
    v, i = p.topk(min(k, p.numel()))
    name = (lambda t: str(t)) if model.tokenizer is None else (lambda t: model.tokenizer.decode([t]))
    return [(name(int(t)), float(x)) for t, x in zip(i, v)]


def full_cache_bytes(model, n_tokens: int) -> int:
    """Bytes of an uncompressed KV cache holding ``n_tokens`` (keys + values, every layer)."""
    item = next(model.model.parameters()).element_size()
    return 2 * model.cfg.n_layers * model.cfg.n_kv_heads * n_tokens * model.cfg.d_head * item


def edit_side(model, toks: torch.Tensor, edits: list, max_new_tokens: int = 24, k: int = 10,
              make_cache=None) -> dict:
    """The top-k next tokens and the greedy continuation of ``toks`` [1, N] under ``edits``
    (``make_cache``: a function giving the KV cache to generate with, e.g. a compressed one) ->
    {"top": [(token, p)] * k, "text": str, "cache_bytes": bytes the KV cache holds at the end}."""
    n = toks.shape[1]
    with model.edit(list(edits)):
        top = next_token_top(model, toks, k)
        cache = make_cache() if make_cache is not None else None
        with torch.no_grad():
            out = model.generate(toks, max_new_tokens=max_new_tokens, **({"cache": cache} if cache is not None else {}))
    held = cache.nbytes() if cache is not None else full_cache_bytes(model, out.shape[1] - 1)
    return {"top": top, "text": detokenize(model, out[0, n:]), "cache_bytes": int(held)}


def edit_compare(model, text, edits: list, max_new_tokens: int = 24, chat: bool = True, k: int = 10,
                 make_cache=None) -> dict:
    """Before/after an edit list on ``text`` (or token ids [1, N]):
    {"before": {"top": [(token, p)] * k, "text": greedy, "cache_bytes"}, "after": ...}."""
    toks = text if isinstance(text, torch.Tensor) else prompt_tokens(model, text, chat)
    return {"before": edit_side(model, toks, [], max_new_tokens, k),
            "after": edit_side(model, toks, edits, max_new_tokens, k, make_cache)}


def next_token_figure(result: dict):
    """Side-by-side bars of the top next tokens before and after the edit."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=["before", "after"], horizontal_spacing=0.15)
    for c, key in enumerate(("before", "after"), 1):
        top = result[key]["top"][::-1]
        fig.add_trace(go.Bar(x=[p for _, p in top], y=[f"{repr(t)} " for t, _ in top], orientation="h",
                             name=key, hovertemplate="%{y}: %{x:.3f}<extra></extra>"), row=1, col=c)
    top = max((p for key in ("before", "after") for _, p in result[key]["top"]), default=1.0)
    fig.update_layout(title="next-token probabilities (top 10)", showlegend=False, height=420)
    fig.update_xaxes(range=[0, min(1.0, 1.15 * top)])               # one scale for both sides
    fig.update_yaxes(type="category")                                # token ids stay labels, not numbers
    return fig
