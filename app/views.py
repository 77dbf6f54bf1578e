"""What the Streamlit explorer shows, as plain functions (no Streamlit here, so they are testable):
saved reports, live per-head statistics, one head's attention pattern, and an ablation comparison.

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


def pattern_figure(model, text: str, layer: int, head: int, chat: bool = True, max_tokens: int = 256):
    """The attention pattern of one head on a short prompt (full [query, key] matrix: refused
    beyond ``max_tokens``; use the statistics for long inputs)."""
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
    fig = go.Figure(go.Heatmap(z=p.numpy(), x=words, y=words, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"attention pattern L{layer} H{head}", xaxis_title="key", yaxis_title="query",
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
