"""Preplan and anchor tokens (Li et al. 2025, "Attention Illuminates LLM Reasoning: The
Preplan-and-Anchor Rhythm Enables Fine-Grained Policy Optimization", arXiv 2510.13554, §3;
no official code).

On a prompt and the model's response (generated greedily unless given), one forward over
prompt + response records three O(N) statistics per head (never an N x N pattern):

* head span (§3.1): d[l, h] = mean over response positions t of sum_{s<=t} A[t, s] (t - s)
  (the probe's ``distance``). Among the heads of ~5 evenly spaced middle-third layers, the bottom
  30% by span are *local* heads, the top 30% *global* heads. The HeadScores is d for every head.
* WAAD (§3.2, Windowed Average Attention Distance): WAAD_t = sum_{s<=t} Aloc[t, s] min(t - s, W),
  W = 10, Aloc the mean attention of the local heads (the probe's ``window_distance``, averaged
  over local heads: the statistic is linear in A, so this is exact), for response positions t.
* FAI (§3.2, Future Attention Influence): FAI_s = mean over t in [s + 10, s + 100] of Aglob[t, s]
  (the probe's ``received`` with ``received_window=(10, 100)``, i.e. ``Recorder.received_mean``,
  averaged over global heads). It is reported for response keys s only; for those every query t
  with t - s >= 10 lies in the response, so the queries are response positions as the paper asks
  (the window is cut at the end of the text). Keys in the last 10 positions have no such query:
  their FAI is NaN and they are never anchors. The mean is over every such t, also on a sliding-
  window layer whose window does not reach from t back to s (attention 0 there).
* Preplan tokens: the top 40% of |WAAD_t - WAAD_{t+1}| (t = 0 .. T-2 of the response), flagged at
  t, the token after which the local-attention rhythm breaks. Anchor tokens: the top 40% by FAI.

``Preplan.analyze`` returns a ``PreplanResult`` (tokens, WAAD, FAI, flags; ``.plot()`` plotly figure,
``.html()`` the response with preplan/anchor tokens highlighted). ``Preplan.score`` runs it on the
shipped reasoning prompts and returns the head spans.

Run: ``python experiments/preplan.py --model smollm2``.
"""
from __future__ import annotations

import html as _html
import math
import time
from dataclasses import dataclass, field, fields

import torch

from ..probe import Stats
from .base import Analyzer, register
from .common import PLAIN_TEMPLATE, end_of_turn_ids, has_chat_template, template_name, token_strings
from .data import load_reasoning_prompts


def middle_layers(n_layers: int, n: int = 5) -> list[int]:
    """``n`` evenly spaced layers of the middle third [L/3, 2L/3) (fewer if the third is smaller)."""
    lo, hi = n_layers // 3, max(n_layers // 3, (2 * n_layers) // 3 - 1)
    if n <= 1:
        return [(lo + hi) // 2]
    return sorted({int(math.floor(lo + (hi - lo) * i / (n - 1) + 0.5)) for i in range(n)})


def _top_frac(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool mask of the top ``frac`` of the finite entries of x (ties broken by position)."""
    ok = torch.isfinite(x)
    out = torch.zeros_like(x, dtype=torch.bool)
    n = int(ok.sum())
    k = int(round(frac * n))
    if k == 0:
        return out
    idx = torch.nonzero(ok).flatten()
    top = x[idx].topk(k).indices
    out[idx[top]] = True
    return out


@dataclass
class PreplanResult:
    """Per-token result of one prompt + response (Li et al. 2025 §3.2); T = response tokens.

    Fields: ``prompt`` (text, "" when given as ids); ``tokens`` (the T response tokens, decoded one by
    one); ``token_ids`` [T]; ``waad`` [T] (WAAD_t of the local heads, in tokens); ``fai`` [T] (FAI_s of
    the global heads, attention probability; NaN where no query lies in the FAI window); ``delta`` [T]
    (|WAAD_t - WAAD_{t+1}|, NaN for the last token); ``preplan`` / ``anchor`` [T] bool flags;
    ``local_heads`` / ``global_heads`` ((layer, head) lists); ``span`` [layer, head] head span on this
    text (tokens); ``layers`` (the middle-third layers the heads were chosen from)."""

    prompt: str
    tokens: list[str]                 # response tokens, decoded one by one
    token_ids: torch.Tensor           # [T]
    waad: torch.Tensor                # [T]
    fai: torch.Tensor                 # [T], NaN where no query lies in the window
    delta: torch.Tensor               # [T], |WAAD_t - WAAD_{t+1}|, NaN for the last token
    preplan: torch.Tensor             # [T] bool
    anchor: torch.Tensor              # [T] bool
    local_heads: list[tuple[int, int]]
    global_heads: list[tuple[int, int]]
    span: torch.Tensor                # [L, H] head span on this text
    layers: list[int] = field(default_factory=list)

    @property
    def response(self) -> str:
        """The response text (the decoded tokens joined)."""
        return "".join(self.tokens)

    def to_dict(self) -> dict:
        """JSON-able form (tensors as lists); ``from_dict`` reads it back (as stored in HeadScores.info)."""
        return {f.name: (v.tolist() if torch.is_tensor(v) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d: dict) -> "PreplanResult":
        """Rebuild a ``PreplanResult`` from ``to_dict`` output (lists back to tensors, "nan" strings to NaN,
        head lists to tuples), e.g. from a loaded ``HeadScores.info["details"]``."""
        kw = dict(d)
        for k, dt in (("token_ids", torch.long), ("waad", torch.float32), ("fai", torch.float32),
                      ("delta", torch.float32), ("preplan", torch.bool), ("anchor", torch.bool),
                      ("span", torch.float32)):
            kw[k] = torch.tensor([float(x) if isinstance(x, str) else x for x in kw[k]]   # "nan" strings in JSON
                                 if kw[k] and not isinstance(kw[k][0], list) else kw[k], dtype=dt)
        kw["local_heads"] = [tuple(x) for x in kw["local_heads"]]
        kw["global_heads"] = [tuple(x) for x in kw["global_heads"]]
        return cls(**kw)

    def to_frame(self):
        """pandas DataFrame, one row per response token: pos, token, waad, delta, fai, preplan, anchor."""
        import pandas as pd
        return pd.DataFrame({"pos": range(len(self.tokens)), "token": self.tokens, "waad": self.waad.tolist(),
                             "delta": self.delta.tolist(), "fai": self.fai.tolist(),
                             "preplan": self.preplan.tolist(), "anchor": self.anchor.tolist()})

    def coupling(self, max_gap: int = 1, preplan: bool = True) -> float:
        """Share of preplan tokens that coincide with or are followed by an anchor within ``max_gap``
        tokens (the paper's preplan -> anchor coupling). ``preplan=False`` gives the same share for
        the other tokens (the baseline to compare with). Tokens without an FAI in reach are skipped."""
        ok = torch.isfinite(self.fai)
        idx = [t for t in range(len(self.tokens)) if bool(self.preplan[t]) == preplan and bool(ok[t])]
        if not idx:
            return float("nan")
        hit = sum(bool(self.anchor[t:t + max_gap + 1].any()) for t in idx)
        return hit / len(idx)

    def plot(self, title: str | None = None):
        """Plotly figure: WAAD (preplan tokens marked) and FAI (anchor tokens marked) over the response."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
        x = list(range(len(self.tokens)))
        labels = [repr(t)[1:-1] for t in self.tokens]
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                            subplot_titles=("WAAD (local heads), preplan tokens marked",
                                            "FAI (global heads), anchor tokens marked"))
        fig.add_trace(go.Scatter(x=x, y=self.waad.tolist(), mode="lines", name="WAAD", text=labels,
                                 hovertemplate="%{x} '%{text}': WAAD %{y:.2f}<extra></extra>",
                                 line=dict(color="#636efa")), row=1, col=1)
        pp = [i for i in x if self.preplan[i]]
        fig.add_trace(go.Scatter(x=pp, y=[float(self.waad[i]) for i in pp], mode="markers", name="preplan",
                                 text=[labels[i] for i in pp], marker=dict(color="#ef553b", size=8),
                                 hovertemplate="%{x} '%{text}': preplan<extra></extra>"), row=1, col=1)
        fai = [None if not math.isfinite(v) else v for v in self.fai.tolist()]
        fig.add_trace(go.Bar(x=x, y=fai, name="FAI", text=labels, marker_color="#00cc96",
                             hovertemplate="%{x} '%{text}': FAI %{y:.4f}<extra></extra>"), row=2, col=1)
        an = [i for i in x if self.anchor[i]]
        fig.add_trace(go.Scatter(x=an, y=[float(self.fai[i]) for i in an], mode="markers", name="anchor",
                                 text=[labels[i] for i in an], marker=dict(color="#ab63fa", size=8, symbol="diamond"),
                                 hovertemplate="%{x} '%{text}': anchor<extra></extra>"), row=2, col=1)
        step = max(1, len(x) // 40)
        fig.update_xaxes(tickmode="array", tickvals=x[::step], ticktext=labels[::step], tickangle=-60, row=2, col=1)
        fig.update_yaxes(title_text="WAAD", row=1, col=1)
        fig.update_yaxes(title_text="FAI", row=2, col=1)
        fig.update_layout(title=title or "Preplan and anchor tokens (Li et al. 2025)", height=560,
                          width=max(700, 12 * len(x) + 200))
        return fig

    def html(self, full: bool = False) -> str:
        """The response with preplan tokens (orange), anchor tokens (blue) and both (purple)
        highlighted; hover shows WAAD / FAI."""
        parts = []
        for i, t in enumerate(self.tokens):
            p, a = bool(self.preplan[i]), bool(self.anchor[i])
            color = "#c9a0f0" if p and a else "#ffc58f" if p else "#9ecbff" if a else None
            fai = float(self.fai[i])
            tip = f"{i}: WAAD {float(self.waad[i]):.2f}, FAI {fai:.4f}" if math.isfinite(fai) else \
                f"{i}: WAAD {float(self.waad[i]):.2f}, FAI n/a"
            if p:
                tip += " | preplan"
            if a:
                tip += " | anchor"
            text = _html.escape(t).replace("\n", "<br>")
            style = f" style='background:{color};border-radius:3px'" if color else ""
            parts.append(f"<span title='{_html.escape(tip, quote=True)}'{style}>{text}</span>")
        legend = ("<p style='font-size:90%'><span style='background:#ffc58f'>preplan</span> "
                  "<span style='background:#9ecbff'>anchor</span> <span style='background:#c9a0f0'>both</span>"
                  "</p>")
        body = (f"<div class='preplan'><p style='color:#666'>{_html.escape(self.prompt)}</p>{legend}"
                f"<div style='font-family:monospace;white-space:pre-wrap;line-height:1.6'>{''.join(parts)}</div></div>")
        if full:
            return f"<!doctype html><html><head><meta charset='utf-8'><title>preplan</title></head><body>{body}</body></html>"
        return body


@register
@dataclass
class Preplan(Analyzer):
    """Head span, WAAD, FAI and preplan/anchor tokens (Li et al. 2025 §3).

    Quick default: the first shipped reasoning prompt, a greedy response of up to 100 tokens.
    ``Preplan.paper_config()``: every shipped prompt, up to 512 new tokens (the method's own
    hyperparameters, W = 10, FAI window [10, 100], 30% / 40% fractions and 5 middle-third layers,
    are the paper's in both).

    Parameters: ``n_prompts`` (shipped prompts used; None = all), ``max_new_tokens`` (greedy
    response length), ``chat`` (wrap prompts in the chat template; the plain "## Query:" template on a
    base model), ``n_select_layers`` (middle-third layers the heads come from; 5), ``head_frac``
    (share of those heads that are local / global; 0.3), ``window`` (WAAD's W; 10), ``fai_window``
    ((a, b): FAI averages queries with a <= t - s <= b; (10, 100)), ``token_frac`` (share of tokens
    flagged preplan / anchor; 0.4)."""

    name = "preplan"
    paper = ("Li et al. 2025, Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm "
             "(arXiv 2510.13554), §3.1 head span, §3.2 WAAD / FAI")
    description = ("head span: mean over response tokens of the attention-weighted distance sum_s A[t,s](t-s); "
                   "low = local head (phrase-level, drives WAAD), high = global head (drives FAI)")
    threshold = None

    n_prompts: int | None = 1
    max_new_tokens: int = 100
    chat: bool = True
    n_select_layers: int = 5
    head_frac: float = 0.3
    window: int = 10
    fai_window: tuple = (10, 100)
    token_frac: float = 0.4

    @classmethod
    def paper_config(cls, **kw) -> "Preplan":
        """Every shipped reasoning prompt, responses of up to 512 new tokens (the method's own
        hyperparameters are the paper's in every config; Li et al. 2025 §3)."""
        return cls(**{"n_prompts": None, "max_new_tokens": 512, **kw})

    # -------------------------------------------------------------------------------------------
    def _prompt_ids(self, model, prompt) -> tuple[str, torch.Tensor]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("empty prompt")
            if model.tokenizer is None:
                raise ValueError(f"{model.cfg.name} has no tokenizer: pass token ids")
            if self.chat and not has_chat_template(model):       # base model: the plain Query/Answer template
                ids = model.to_tokens(PLAIN_TEMPLATE.replace("{q}", prompt))[0]
            else:
                ids = model.to_tokens(prompt, chat=self.chat)[0]
            return prompt, ids.cpu()
        ids = torch.as_tensor(prompt).long().flatten()
        if ids.numel() == 0:
            raise ValueError("empty prompt")
        return "", ids

    def generate(self, model, prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy response ids (cut at the first EOS, end-of-turn or pad token) -> (prompt ids,
        response ids)."""
        _, ids = self._prompt_ids(model, prompt)
        out = model.generate(ids[None], max_new_tokens=self.max_new_tokens)[0, len(ids):].cpu()
        tok = model.tokenizer
        stops = set(end_of_turn_ids(model))
        if tok is not None and tok.pad_token_id is not None:
            stops.add(int(tok.pad_token_id))
        cut = next((i for i, t in enumerate(out.tolist()) if t in stops), len(out))
        return ids, out[:cut]

    @torch.no_grad()
    def analyze(self, model, prompt, response=None) -> PreplanResult:
        """Analyse one prompt (text or ids) and response (text, ids, or None: generate greedily)."""
        text, p_ids = self._prompt_ids(model, prompt)
        if response is None:
            p_ids, r_ids = self.generate(model, prompt)
        elif isinstance(response, str):
            r_ids = torch.tensor(model.tokenizer(response, add_special_tokens=False)["input_ids"])
        else:
            r_ids = torch.as_tensor(response).long().flatten()
        a, b = self.fai_window
        if not 0 <= a <= b:
            raise ValueError(f"fai_window must be (a, b) with 0 <= a <= b, got {self.fai_window}")
        T = len(r_ids)
        if T < a + 2:
            raise ValueError(f"the response has {T} tokens; FAI needs more than {a + 1} (window starts at t - s = {a})")
        ids = torch.cat([p_ids, r_ids])
        P, N = len(p_ids), len(ids)
        if N > model.cfg.max_ctx:
            raise ValueError(f"prompt + response is {N} tokens but {model.cfg.name} allows {model.cfg.max_ctx}")
        L, H = model.cfg.n_layers, model.cfg.n_heads
        req = Stats(distance=True, window_distance=self.window, received=True, received_window=(a, b))
        with model.record(req) as rec:
            model(ids[None])
        dist = rec.stack("distance")[:, 0, :, P:].float().cpu()                  # [L, H, T]
        span = dist.mean(-1)                                                      # [L, H]
        sel = middle_layers(L, self.n_select_layers)
        cand = [(l, h) for l in sel for h in range(H)]
        order = sorted(cand, key=lambda x: float(span[x]))
        k = max(1, int(round(self.head_frac * len(cand))))
        local, glob = order[:k], order[::-1][:k]
        waad = torch.stack([rec["window_distance", l][0, h, P:].float().cpu() for l, h in local]).mean(0)   # [T]
        # FAI's denominator: every query t in [s + a, s + b] of the text, whether or not it sees s (a
        # sliding window narrower than b gives those queries attention 0 on s; the probe's
        # received_count counts only queries that see s, so it is not used here)
        pos = torch.arange(P, N)
        c = (torch.clamp(pos + b, max=N - 1) - (pos + a) + 1).clamp_min(0).float()    # [T]
        fai_h = []
        for l, h in glob:
            s = rec["received_sum", l][0, h, P:N].float().cpu()                   # [T]
            fai_h.append(torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, float("nan"))))
        fai = torch.stack(fai_h).mean(0)                                          # [T]
        delta = torch.full((T,), float("nan"))
        delta[:-1] = (waad[:-1] - waad[1:]).abs()
        tokens = token_strings(model, r_ids)
        return PreplanResult(prompt=text, tokens=tokens, token_ids=r_ids, waad=waad, fai=fai, delta=delta,
                             preplan=_top_frac(delta, self.token_frac), anchor=_top_frac(fai, self.token_frac),
                             local_heads=local, global_heads=glob, span=span, layers=sel)

    def score(self, model, data=None, progress: bool = True):
        """Head span averaged over prompts (data: list of prompts, or of (prompt, response) pairs;
        None = the shipped reasoning prompts, responses generated greedily). The first prompt's
        per-token result is kept in ``extra``; every prompt's ``PreplanResult`` in ``info["details"]``
        (also ``.details``; as dicts after ``HeadScores.load``: ``PreplanResult.from_dict``)."""
        from tqdm.auto import tqdm
        t0 = time.time()
        items = load_reasoning_prompts() if data is None else list(data)
        if self.n_prompts is not None:
            items = items[:self.n_prompts]
        if not items:
            raise ValueError("no prompts")
        details = []
        for it in tqdm(items, desc="preplan", disable=not progress):
            prompt, resp = (it if isinstance(it, tuple) else (it, None))
            details.append(self.analyze(model, prompt, resp))
        span = torch.stack([d.span for d in details]).mean(0)
        L, H = span.shape
        lm = torch.zeros(L, H, dtype=torch.bool)
        gm = torch.zeros(L, H, dtype=torch.bool)
        d0 = details[0]
        for l, h in d0.local_heads:
            lm[l, h] = True
        for l, h in d0.global_heads:
            gm[l, h] = True
        ds = (f"{len(items)} reasoning prompt(s) ({'shipped heads/data/reasoning_prompts.txt' if data is None else 'user data'}), "
              f"greedy responses of up to {self.max_new_tokens} tokens")
        res = self._result(model, span, dataset=ds, started=t0, waad=d0.waad, fai=d0.fai, delta=d0.delta,
                           preplan=d0.preplan, anchor=d0.anchor, response_ids=d0.token_ids,
                           local_heads=lm, global_heads=gm,
                           params=dict(template_used=template_name(model, "chat" if self.chat else None)),
                           info=dict(details=details))
        return res
