"""Attention sinks (Gu et al. 2024) and hidden attention sinks (ACT, Yu et al. 2024).

Both read one O(N) statistic, the column sums of ``Stats(received=True)`` (``received_importance``),
never an N×N pattern:

  alpha[l, h, s] = (1 / (T - s)) * sum_{t >= s} A[l, h][t, s]        (0-based positions, causal)

The divisor is always T - s, the queries at or after s, as Gu et al.'s eq. 1 and both reference
codes have it; on sliding-window layers with T > window fewer queries see s, and its alpha is still
divided by T - s (``received_importance(divide_by="visible")`` gives the other reading).

* ``Sinks`` (Gu et al. 2024, "When Attention Sink Emerges in Language Models",
  §3.1 eq. 1; reference ``eval_sink_open_source.py`` of sail-sg/Attention-Sink): the importance of
  the k-th token (1-based; k = 1 is position 0) and Sink_k^eps = percent of (layer, head) pairs
  with alpha_k > eps, averaged over natural-text samples of T tokens (eps 0.3, T 64, 100 samples).
* ``HiddenSinks`` / ``find_hidden_sinks`` (Yu et al. 2024, "Unveiling and
  Harnessing Hidden Attention Sinks", §3, ACT; reference ``models/llama_modelling_aug.py`` of
  GATECH-EIC/ACT): per sample and head the keys with alpha_j > 0.1, except the first one found.

"First token". The reference tokenizes each sample with the tokenizer's defaults
(``tokenizer(prompt)``) and cuts it to T tokens, so the first token is the BOS for Llama-2 but a
plain text token for tokenizers that add none. We do the same: SmolLM2's tokenizer adds no BOS,
so its "first token" is the first text token of each sample; Gemma-3's adds ``<bos>``. Samples are
never padded (every sample has exactly T tokens), so position 0 is always the first token.

Run: ``python experiments/sinks.py --model smollm2``.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .base import Analyzer, register
from .common import received_importance, token_strings
from .data import natural_text_passages, text_samples  # noqa: F401  (natural_text_passages: public here too)


# ------------------------------------------------------------------------------------------------
# attention sinks, Gu et al. 2024

@register
@dataclass
class Sinks(Analyzer):
    """Attention sink on the k-th token (Gu et al. 2024, §3.1, eq. 1 and the Sink_k^eps metric).

    score[l, h] = alpha_k of head (l, h) averaged over samples, where alpha_k = mean attention the
    k-th token (1-based) receives from the T - k + 1 queries at or after it (eq. 1; the divisor stays
    T - k + 1 on sliding-window layers, as in the reference's ``compute_attention_sink``). Extra tensors:
    ``sink_rate`` [L, H] share of samples with alpha_k > eps; ``sink_metric`` (scalar) =
    Sink_k^eps in percent = 100 · mean(sink_rate) = percent of (layer, head) pairs with
    alpha_k > eps, averaged over samples; ``alpha_by_position`` [L, H, T] and
    ``sink_metric_by_position`` [T] (Sink_k^eps for every k, as the reference prints).

    Parameters: ``eps`` (sink threshold on alpha_k, also the result's ``threshold``), ``n_tokens``
    (T, tokens per sample), ``k`` (1-based token index), ``n_samples`` (paper 100), ``batch_size``
    (samples per forward), ``prepend_bos`` (tokenize with the tokenizer's special tokens, as the
    reference's ``tokenizer(prompt)``).
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
        """``data``: None (shipped natural text), a list of strings, or token ids [batch, pos]."""
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
    """One hidden sink (ACT, Yu et al. 2024 §3): in text ``sample``, head (``layer``, ``head``) gives key
    ``position`` (token ``token_id`` / ``token``) a mean received attention ``score`` = alpha_j above
    the threshold, and it is not the first such key of that head."""
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
    their alpha_j; ``tokens`` [S, T]; ``thresholds`` [S] the threshold used per sample.

    ``params``: the settings used (dataset, n_samples, n_tokens, threshold, rule, alpha, min_queries)."""

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
        """Token positions that are hidden sinks, with how many (sample, layer, head) found them, most
        common first (``top`` = None: all)."""
        return Counter(s.position for s in self.sinks).most_common(top)

    def for_head(self, layer: int, head: int) -> list[HiddenSink]:
        """The hidden sinks found in head (``layer``, ``head``), over all samples."""
        return [s for s in self.sinks if s.layer == layer and s.head == head]

    def to_frame(self):
        """pandas DataFrame, one row per hidden sink: sample, layer, head, position, token_id, token,
        score."""
        import pandas as pd
        return pd.DataFrame([s.__dict__ for s in self.sinks],
                            columns=["sample", "layer", "head", "position", "token_id", "token", "score"])


def find_hidden_sinks(model, data=None, n_samples: int = 8, n_tokens: int = 128, threshold: float = 0.1,
                      rule: str = "mean", alpha: float = 5.0, min_queries: int = 1, batch_size: int = 16,
                      prepend_bos: bool = True, progress: bool = True) -> HiddenSinkResult:
    """Hidden attention sinks (ACT, Yu et al. 2024, §3 and Algorithm 1).

    For each sample and head: a_j = column sum of key j / (N - j), the mean attention j receives
    from the N - j queries at or after it (the reference's ``sum(dim=0) / arange(N, 0, -1)``, also on
    sliding-window layers); sinks S = {j : a_j > thr}, minus the first one found
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
            strings[tid] = token_strings(model, [tid])[0]
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
    position 0. ``find_hidden_sinks`` returns which tokens they are.

    Parameters, as ``find_hidden_sinks``: ``n_samples`` natural-text samples of ``n_tokens`` tokens,
    ``sink_threshold`` (0.1, the reference's THRES), ``rule`` ("mean" or "alpha_over_n"), ``alpha``
    (for "alpha_over_n": threshold alpha / N), ``min_queries`` (ignore keys seen by fewer queries),
    ``batch_size`` (samples per forward), ``prepend_bos`` (tokenize with special tokens)."""

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
        """``find_hidden_sinks`` with this analyzer's settings: which tokens are hidden sinks, per sample
        and head (a ``HiddenSinkResult``). ``data`` as in ``score``."""
        return find_hidden_sinks(model, data, self.n_samples, self.n_tokens, self.sink_threshold, self.rule,
                                 self.alpha, self.min_queries, self.batch_size, self.prepend_bos, progress)

    def score(self, model, data=None, progress: bool = True):
        """``data``: None (shipped natural text), a list of strings, or token ids [batch, pos]."""
        t0 = time.time()
        return self.from_result(model, self.find(model, data, progress), t0)

    def from_result(self, model, r: HiddenSinkResult, started: float):
        """HeadScores from a ``find`` result (no second forward pass)."""
        t0 = started
        return self._result(model, r.count.mean(0), dataset=f"{r.params['dataset']} ({r.params['n_samples']} x "
                            f"{r.params['n_tokens']} tokens)", started=t0, mass=r.mass.mean(0),
                            first_is_pos0=(r.first == 0).float().mean(0))
