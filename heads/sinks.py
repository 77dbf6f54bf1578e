"""Attention sinks (Gu et al. 2024) and hidden attention sinks (ACT, Yu et al. 2024).

Both read one O(N) statistic, the attention each key receives from the queries that can see it
(``Stats(received=True)`` -> ``Recorder.received_mean``), never an N×N pattern:

  alpha[l, h, s] = (1 / (T - s)) * sum_{t >= s} A[l, h][t, s]        (0-based positions, causal)

* ``Sinks`` (methods.md §4; Gu et al. 2024, "When Attention Sink Emerges in Language Models",
  §3.1 eq. 1; reference ``eval_sink_open_source.py`` of sail-sg/Attention-Sink): the importance of
  the k-th token (1-based; k = 1 is position 0) and Sink_k^eps = percent of (layer, head) pairs
  with alpha_k > eps, averaged over natural-text samples of T tokens (eps 0.3, T 64, 100 samples).
* ``HiddenSinks`` / ``find_hidden_sinks`` (methods.md §5; Yu et al. 2024, "Unveiling and
  Harnessing Hidden Attention Sinks", §3, ACT; reference ``models/llama_modelling_aug.py`` of
  GATECH-EIC/ACT): per sample and head the keys with alpha_j > 0.1, except the first one found.

"First token". The reference tokenizes each sample with the tokenizer's defaults
(``tokenizer(prompt)``) and cuts it to T tokens, so the first token is the BOS for Llama-2 but a
plain text token for tokenizers that add none. We do the same: SmolLM2's tokenizer adds no BOS,
so its "first token" is the first text token of each sample; Gemma-3's adds ``<bos>``. Samples are
never padded (every sample has exactly T tokens), so position 0 is always the first token.

Run: ``python -m headscope.heads.sinks --model smollm2`` (see ``main``).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..kernels.spec import StatRequest
from .base import Analyzer, register

DATA_DIR = Path(__file__).parent / "data"
NATURAL_TEXT = DATA_DIR / "natural_text.txt"


# ------------------------------------------------------------------------------------------------
# natural-text samples (shared with heads/classic.py)

def natural_text_passages(path: str | Path | None = None, min_chars: int = 600) -> list[str]:
    """The shipped natural text cut into passages: paragraphs (blank-line separated, line breaks
    unwrapped) joined in file order until a passage has at least ``min_chars`` characters.
    Uses ``heads/data/haystack.txt`` if ``natural_text.txt`` is missing."""
    if path is None:
        path = NATURAL_TEXT if NATURAL_TEXT.exists() else DATA_DIR / "haystack.txt"
    text = Path(path).read_text(encoding="utf-8")
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if p]
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c) + 1 for c in cur) >= min_chars:
            out.append(" ".join(cur))
            cur = []
    if not out:
        raise ValueError(f"{path} holds no text passages")
    return out


def text_samples(model, data=None, n_samples: int = 20, n_tokens: int = 64,
                 prepend_bos: bool = True) -> tuple[torch.Tensor, str]:
    """Equal-length, unpadded token samples [n, n_tokens] and a dataset name.

    ``data``: None (the shipped natural text), a list of strings, or token ids [batch, pos]
    (then cut to at most ``n_samples`` x ``n_tokens``; shorter token data is used as it is). Texts are tokenized one by one with the tokenizer's
    special-token default (``prepend_bos``), texts shorter than ``n_tokens`` are skipped, and
    ``n_samples`` of the rest are taken evenly spread over the list (all of them if fewer).
    """
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be >= 2, got {n_tokens}")
    if n_tokens > model.cfg.max_ctx:
        raise ValueError(f"n_tokens={n_tokens} exceeds {model.cfg.name}'s context of {model.cfg.max_ctx}")
    if isinstance(data, torch.Tensor):
        toks = data if data.dim() == 2 else data[None]
        if toks.shape[0] == 0 or toks.shape[1] < 2:
            raise ValueError(f"token data has shape {tuple(toks.shape)}; need at least 1 sample of >= 2 tokens")
        return toks[:n_samples, :n_tokens].long(), "tokens"
    if model.tokenizer is None:
        raise ValueError(f"{model.cfg.name} has no tokenizer: pass token ids [batch, pos] as data")
    name = "natural_text" if data is None else "texts"
    texts = natural_text_passages() if data is None else ([data] if isinstance(data, str) else list(data))
    if not texts:
        raise ValueError("empty data: give at least one text")
    rows = []
    for t in texts:
        ids = model.tokenizer(t, add_special_tokens=prepend_bos)["input_ids"]
        if len(ids) >= n_tokens:
            rows.append(ids[:n_tokens])
    if not rows:
        raise ValueError(f"no text in the data has {n_tokens} tokens; give longer texts or lower n_tokens")
    if len(rows) > n_samples:
        idx = torch.linspace(0, len(rows) - 1, n_samples).round().long().tolist()
        rows = [rows[i] for i in idx]
    return torch.tensor(rows, dtype=torch.long), name


def run_quietly(model, tokens, fwd_hooks=()):
    """Forward pass for statistics only: asks the HF model for the last position's logits alone
    (``logits_to_keep=1``; Gemma-3's 262k-word head otherwise costs more than its layers)."""
    try:
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, logits_to_keep=1)
    except TypeError as e:                       # an architecture without logits_to_keep
        if "logits_to_keep" not in str(e):
            raise
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)


def received_importance(model, tokens: torch.Tensor, batch_size: int = 16, progress: bool = True,
                        desc: str = "received") -> torch.Tensor:
    """alpha[sample, layer, head, key]: mean attention each key receives from the queries that can
    see it (Gu et al. 2024 eq. 1; ACT's a_j), from ``Stats(received=True)`` — O(N) per layer."""
    from tqdm.auto import tqdm

    L = model.cfg.n_layers
    out = []
    for b0 in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc=desc):
        toks = tokens[b0:b0 + batch_size]
        with torch.no_grad(), model.record(StatRequest(received=True)) as rec:
            run_quietly(model, toks)
        out.append(torch.stack([rec.received_mean(l).float().cpu() for l in range(L)], 1))  # [b, L, H, T]
    return torch.cat(out, 0)


# ------------------------------------------------------------------------------------------------
# attention sinks, Gu et al. 2024

@register
@dataclass
class Sinks(Analyzer):
    """Attention sink on the k-th token (Gu et al. 2024, §3.1, eq. 1 and the Sink_k^eps metric).

    score[l, h] = alpha_k of head (l, h) averaged over samples, where alpha_k = mean attention the
    k-th token (1-based) receives from the T - k + 1 queries that see it. Extra tensors:
    ``sink_rate`` [L, H] share of samples with alpha_k > eps; ``sink_metric`` (scalar) =
    Sink_k^eps in percent = 100 · mean(sink_rate) = percent of (layer, head) pairs with
    alpha_k > eps, averaged over samples; ``alpha_by_position`` [L, H, T] and
    ``sink_metric_by_position`` [T] (Sink_k^eps for every k, as the reference prints).
    """

    name = "sinks"
    paper = "Gu et al. 2024, When Attention Sink Emerges in Language Models, §3.1 eq. 1 (Sink_k^eps)"
    description = "mean attention the first token receives (alpha_1); > eps = 0.3 marks a sink head"
    threshold = 0.3

    eps: float = 0.3
    n_tokens: int = 64          # T
    k: int = 1                  # 1-based token index (k = 1: position 0)
    n_samples: int = 20         # paper: 100
    batch_size: int = 16
    prepend_bos: bool = True    # tokenizer's special tokens, as the reference's tokenizer(prompt)

    def __post_init__(self):
        self.threshold = self.eps
        if not 1 <= self.k <= self.n_tokens:
            raise ValueError(f"k must be in [1, n_tokens={self.n_tokens}], got {self.k}")

    @classmethod
    def paper_config(cls, **kw) -> "Sinks":
        """The paper's configuration: 100 samples of 64 tokens, eps 0.3, k 1."""
        return cls(**{"n_samples": 100, "n_tokens": 64, "eps": 0.3, "k": 1, **kw})

    def score(self, model, data=None, progress: bool = True):
        t0 = time.time()
        toks, ds = text_samples(model, data, self.n_samples, self.n_tokens, self.prepend_bos)
        if toks.shape[1] < self.k:
            raise ValueError(f"k={self.k} but the samples have only {toks.shape[1]} tokens")
        alpha = received_importance(model, toks, self.batch_size, progress, desc="sinks")   # [S, L, H, T]
        above = (alpha > self.eps).float()
        a_k = alpha[..., self.k - 1]
        rate = above[..., self.k - 1].mean(0)
        return self._result(model, a_k.mean(0), dataset=f"{ds} ({toks.shape[0]} samples x {toks.shape[1]} tokens)",
                            started=t0, sink_rate=rate, sink_metric=100.0 * rate.mean(),
                            alpha_by_position=alpha.mean(0),
                            sink_metric_by_position=100.0 * above.mean((0, 1, 2)),
                            n_samples=torch.tensor(toks.shape[0]))


def sink_metric(scores) -> float:
    """Sink_k^eps in percent from a ``Sinks`` result."""
    return float(scores.extra["sink_metric"])


# ------------------------------------------------------------------------------------------------
# hidden sinks, ACT (Yu et al. 2024)

@dataclass
class HiddenSink:
    sample: int
    layer: int
    head: int
    position: int
    token_id: int
    token: str
    score: float            # alpha_j: mean attention received


@dataclass
class HiddenSinkResult:
    """What ``find_hidden_sinks`` found. ``sinks``: every hidden sink (the first-found sink of each
    (sample, layer, head) excluded, as ACT does); ``first`` [S, L, H] the excluded first-found
    position (-1 if none); ``count`` / ``mass`` [S, L, H]: number of hidden sinks and the sum of
    their alpha_j; ``tokens`` [S, T]; ``thresholds`` [S] the threshold used per sample."""

    sinks: list[HiddenSink]
    first: torch.Tensor
    count: torch.Tensor
    mass: torch.Tensor
    tokens: torch.Tensor
    thresholds: torch.Tensor
    params: dict = field(default_factory=dict)

    def by_token(self, top: int | None = 20) -> list[tuple[str, int]]:
        """Token strings that are hidden sinks, with how many (sample, layer, head) found them."""
        return Counter(s.token for s in self.sinks).most_common(top)

    def by_position(self, top: int | None = 20) -> list[tuple[int, int]]:
        return Counter(s.position for s in self.sinks).most_common(top)

    def for_head(self, layer: int, head: int) -> list[HiddenSink]:
        return [s for s in self.sinks if s.layer == layer and s.head == head]

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame([s.__dict__ for s in self.sinks],
                            columns=["sample", "layer", "head", "position", "token_id", "token", "score"])


def _token_strings(model, ids: list[int]) -> list[str]:
    if model.tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]


def find_hidden_sinks(model, data=None, n_samples: int = 8, n_tokens: int = 128, threshold: float = 0.1,
                      rule: str = "mean", alpha: float = 5.0, min_queries: int = 1, batch_size: int = 16,
                      prepend_bos: bool = True, progress: bool = True) -> HiddenSinkResult:
    """Hidden attention sinks (ACT, Yu et al. 2024, §3 and Algorithm 1; methods.md §5).

    For each sample and head: a_j = mean attention key j receives from the queries that can see it
    (the reference's column sum / (N - j)); sinks S = {j : a_j > thr}, minus the first one found
    (the smallest such j, normally the first token), as ``indices[1:]`` in the reference code.
    ``rule="mean"``: thr = ``threshold`` (0.1, the reference's THRES); ``rule="alpha_over_n"``:
    thr = ``alpha`` / N, the paper's phrasing (alpha = 5 is our default, not the paper's: it gives
    0.1 at N = 50). ``min_queries`` > 1 ignores keys seen by fewer queries (the last keys, whose
    a_j is the attention of a handful of queries; 1 = the reference).
    """
    if rule not in ("mean", "alpha_over_n"):
        raise ValueError(f"rule must be 'mean' or 'alpha_over_n', got {rule!r}")
    toks, ds = text_samples(model, data, n_samples, n_tokens, prepend_bos)
    a = received_importance(model, toks, batch_size, progress, desc="hidden sinks")     # [S, L, H, T]
    return hidden_sinks_from_importance(model, toks, a, threshold, rule, alpha, min_queries, dataset=ds)


def hidden_sinks_from_importance(model, toks: torch.Tensor, a: torch.Tensor, threshold: float = 0.1,
                                 rule: str = "mean", alpha: float = 5.0, min_queries: int = 1,
                                 dataset: str = "tokens") -> HiddenSinkResult:
    """``find_hidden_sinks`` on an already computed importance a [S, L, H, T] of tokens [S, T]."""
    if rule not in ("mean", "alpha_over_n"):
        raise ValueError(f"rule must be 'mean' or 'alpha_over_n', got {rule!r}")
    ds = dataset
    S, L, H, T = a.shape
    thr = threshold if rule == "mean" else alpha / T
    seen_by = torch.arange(T, 0, -1)                                                     # queries per key
    above = (a > thr) & (seen_by >= min_queries)
    pos = torch.arange(T)
    first = torch.where(above, pos, T).min(-1).values                                    # [S, L, H]
    hidden = above & (pos != first[..., None])
    count = hidden.sum(-1).float()
    mass = (a * hidden).sum(-1)
    sinks = []
    idx = hidden.nonzero().tolist()
    strings = {}
    for s, l, h, j in idx:
        tid = int(toks[s, j])
        if tid not in strings:
            strings[tid] = _token_strings(model, [tid])[0]
        sinks.append(HiddenSink(s, l, h, j, tid, strings[tid], float(a[s, l, h, j])))
    first = torch.where(first == T, -1, first)
    return HiddenSinkResult(sinks, first, count, mass, toks, torch.full((S,), float(thr)),
                            params=dict(dataset=ds, n_samples=S, n_tokens=T, threshold=thr, rule=rule,
                                        alpha=alpha, min_queries=min_queries))


@register
@dataclass
class HiddenSinks(Analyzer):
    """Hidden attention sinks per head (ACT, Yu et al. 2024, §3): score = mean number of hidden
    sinks (keys other than the first-found sink with a_j > 0.1) per sample; extra ``mass`` = mean
    summed a_j of those keys, ``first_is_pos0`` = share of samples whose first-found sink is
    position 0. ``find_hidden_sinks`` returns which tokens they are."""

    name = "hidden_sinks"
    paper = "Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks (ACT), §3"
    description = "mean number of hidden sinks (a_j > 0.1 beyond the first sink) per sample"
    threshold = None

    n_samples: int = 8
    n_tokens: int = 128
    sink_threshold: float = 0.1
    rule: str = "mean"
    alpha: float = 5.0
    min_queries: int = 1
    batch_size: int = 16
    prepend_bos: bool = True

    def find(self, model, data=None, progress: bool = True) -> HiddenSinkResult:
        return find_hidden_sinks(model, data, self.n_samples, self.n_tokens, self.sink_threshold, self.rule,
                                 self.alpha, self.min_queries, self.batch_size, self.prepend_bos, progress)

    def score(self, model, data=None, progress: bool = True):
        t0 = time.time()
        return self.from_result(model, self.find(model, data, progress), t0)

    def from_result(self, model, r: HiddenSinkResult, started: float):
        """HeadScores from a ``find`` result (no second forward pass)."""
        t0 = started
        return self._result(model, r.count.mean(0), dataset=f"{r.params['dataset']} ({r.params['n_samples']} x "
                            f"{r.params['n_tokens']} tokens)", started=t0, mass=r.mass.mean(0),
                            first_is_pos0=(r.first == 0).float().mean(0))


# ------------------------------------------------------------------------------------------------
# command line: python -m headscope.heads.sinks --model smollm2

def main(argv=None):
    import argparse
    import os

    import headscope as hs

    p = argparse.ArgumentParser(description="Attention sinks (Gu et al. 2024) and hidden sinks (ACT).")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=20, help="natural-text samples (paper: 100)")
    p.add_argument("--tokens", type=int, default=64, help="T (paper: 64)")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--hidden-samples", type=int, default=8)
    p.add_argument("--hidden-tokens", type=int, default=128)
    p.add_argument("--min-queries", type=int, default=16,
                   help="also report hidden sinks among keys seen by >= this many queries (1 = ACT's rule)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=None, help="folder to save the HeadScores in")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    m = hs.load(a.model)
    sk = Sinks(eps=a.eps, n_tokens=a.tokens, n_samples=a.samples).score(m, progress=False)
    print(f"## {a.model}: Sink_1^{a.eps} = {sink_metric(sk):.2f}% of (layer, head) pairs "
          f"({int(sk.extra['n_samples'])} samples x {a.tokens} tokens, {sk.seconds:.1f} s)")
    by_k = sk.extra["sink_metric_by_position"]
    print("Sink_k for k = 1..5: " + ", ".join(f"{float(v):.2f}%" for v in by_k[:5]))
    L = sk.scores.shape[0]
    per_layer = (sk.extra["sink_rate"]).mean(1) * 100
    print("per-layer share of heads with alpha_1 > eps (%): " + " ".join(f"{float(v):.0f}" for v in per_layer))
    print(f"top {a.top} heads by alpha_1: " + ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in sk.top(a.top)))
    print(f"bottom {min(a.top, 5)} heads by alpha_1: " + ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in
                                                                sk.top(min(a.top, 5), largest=False)))
    hsk = HiddenSinks(n_samples=a.hidden_samples, n_tokens=a.hidden_tokens, min_queries=a.min_queries)
    htoks, hds = text_samples(m, None, a.hidden_samples, a.hidden_tokens)
    imp = received_importance(m, htoks, progress=False)
    for mq in sorted({1, a.min_queries}):
        r = hidden_sinks_from_importance(m, htoks, imp, min_queries=mq, dataset=hds)
        _print_hidden(m, r, a, mq)
    sc = hsk.from_result(m, r, time.time())
    print("heads with most hidden sinks: " + ", ".join(f"L{l}H{h} {v:.2f}" for l, h, v in sc.top(a.top)))
    if a.out:
        sk.save(Path(a.out) / f"sinks_{a.model}")
        sc.save(Path(a.out) / f"hidden_sinks_{a.model}")
    return sk, r


def _print_hidden(m, r, a, mq):
    S = r.count.shape[0]
    print(f"\n## hidden sinks (ACT, a_j > {r.params['threshold']:.3g}, min_queries {mq}, "
          f"{S} samples x {a.hidden_tokens} tokens)")
    print(f"first-found sink is position 0 in {100 * float((r.first == 0).float().mean()):.1f}% of (sample, head); "
          f"heads with >= 1 hidden sink: {100 * float((r.count > 0).float().mean()):.1f}%; "
          f"mean hidden sinks per head: {float(r.count.mean()):.2f}")
    print("most frequent hidden-sink tokens: " + ", ".join(f"{t!r} x{c}" for t, c in r.by_token(12)))
    print("most frequent positions: " + ", ".join(f"{pos} x{c}" for pos, c in r.by_position(10)))
    top = sorted(r.sinks, key=lambda s: -s.score)[:a.top]
    for s in top:
        ctx = m.to_string(r.tokens[s.sample, max(0, s.position - 6):s.position + 1]) if m.tokenizer else ""
        print(f"  sample {s.sample} L{s.layer}H{s.head} pos {s.position} token {s.token!r} a={s.score:.3f} "
              f"context …{ctx!r}")


if __name__ == "__main__":
    main()
