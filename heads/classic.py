"""Echo, induction, previous-token and duplicate-token heads.

RazorAttention's probe (Tang et al. 2024, "RazorAttention: Efficient KV Cache
Compression Through Retrieval Heads", §3.2 and Fig. 3; no official repository): BOS + a random
block of L token ids repeated R = 4 times (paper L = 2500). For queries t in repeats 2..R and the
earlier positions j < t holding the same token as t,

  induction(t) = sum_j A[t, j + 1]        echo(t) = sum_j A[t, j]

and a head's score is the mean over those queries (the attention mass a query puts on all its
induction / echo targets; with R = 2 this is TransformerLens' classic induction score). The paper's
"mean attention on j + 1 for earlier positions j" can also be read as the mean over (t, j) pairs:
a query in repeat r has r - 1 copies, so that mean is exactly 2/R times this score (half at R = 4;
tests/test_heads_classic.py computes it from the patterns). Rankings, and so the retrieval set
below, are the same under either reading; only absolute thresholds move. Under
GQA the paper takes the max over the query heads of a KV head: ``extra["kv_max"]`` [L, G]; the
HeadScores themselves are per query head. ``razor_retrieval_set`` gives the paper's retrieval
set: top 14% by induction ∪ top 1% by echo.

How it is computed, exactly and without N×N patterns. The block is drawn *without replacement*
(no token repeats inside a block; special tokens excluded), so the earlier same-token positions of
query t are exactly t - m·L for m = 1..(its repeat index - 1): every target lies on a fixed
diagonal t - s = D of the attention matrix (D = m·L - 1 for induction, m·L for echo). The
probe's column statistic with a distance window, ``Stats(received=True, received_window=(D, D))``,
returns received_sum[b, h, s] = A[s + D, s]: one forward per diagonal gives every target exactly
in O(N) memory (``method="stats"``: 2(R-1) forwards for induction + echo). For short probes
``method="pattern"`` instead reads the diagonals off each layer's pattern inside a
``hook_pattern`` hook (one forward; one layer's [B, H, N, N] alive at a time, checked against free
memory like ``run_with_cache``). ``method="auto"`` picks "pattern" when N <= 2048 and it fits.
Both give the same numbers (tests/test_heads_classic.py holds them to each other).

Classic detectors on short probes (Wang et al. 2022 IOI §3; Olsson et
al. 2022): previous-token score = mean over t >= 1 of A[t, t - 1] (again one diagonal, O(N));
duplicate-token score = mean over queries t that have an earlier copy of their token of
sum_{j < t, tok_j = tok_t} A[t, j] — token equality is not a diagonal on natural text, so this one
reads patterns (short inputs only).

Run: ``python experiments/classic.py --model smollm2``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..probe import Stats
from .base import Analyzer, register
from .scores import HeadScores
from .common import kv_group_max, run_quietly
from .data import text_samples

PATTERN_MAX_TOKENS = 2048


# ------------------------------------------------------------------------------------------------
# the probe

def repeated_random_tokens(model, block_len: int = 200, n_repeats: int = 4, n_samples: int = 1, seed: int = 0,
                           bos_id: int | None = None) -> torch.Tensor:
    """RazorAttention's probe: [n_samples, 1 + n_repeats·block_len] = BOS + a random block repeated.

    The block is drawn without replacement from the vocabulary minus the tokenizer's special ids,
    so no token repeats inside a block. ``bos_id``: default the tokenizer's BOS (SmolLM2:
    ``<|im_start|>``), else its EOS, else 0.
    """
    V = model.cfg.vocab_size
    special = set()
    tok = model.tokenizer
    if tok is not None:
        special = set(getattr(tok, "all_special_ids", []) or [])
        if bos_id is None:
            bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos_id is None:
        bos_id = 0
    special.add(int(bos_id))
    allowed = torch.tensor([i for i in range(V) if i not in special])
    if block_len < 2 or block_len > len(allowed):
        raise ValueError(f"block_len must be in [2, {len(allowed)}] (distinct non-special tokens of the "
                         f"vocabulary), got {block_len}")
    if n_repeats < 2:
        raise ValueError(f"n_repeats must be >= 2 (queries in repeats 2..R are scored), got {n_repeats}")
    N = 1 + n_repeats * block_len
    if N > model.cfg.max_ctx:
        raise ValueError(f"the probe has 1 + {n_repeats} x {block_len} = {N} tokens but {model.cfg.name} allows "
                         f"{model.cfg.max_ctx}; lower block_len (at most {(model.cfg.max_ctx - 1) // n_repeats})")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_samples):
        block = allowed[torch.randperm(len(allowed), generator=g)[:block_len]]
        rows.append(torch.cat([torch.tensor([bos_id]), block.repeat(n_repeats)]))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------
# exact diagonal masses: Σ_b Σ_{s in [lo, hi)} A[l, h][s + D, s]


def pattern_fits(model, batch: int, n_tokens: int) -> bool:
    """Whether one layer's attention pattern (and the reference path's few temporaries of that
    size) fits in half the free memory."""
    return model.patterns_fit(batch, n_tokens, 6)


def _pick_method(model, method: str, batch: int, n_tokens: int) -> str:
    if method == "auto":
        return "pattern" if n_tokens <= PATTERN_MAX_TOKENS and pattern_fits(model, batch, n_tokens) else "stats"
    if method == "pattern" and not pattern_fits(model, batch, n_tokens):
        raise MemoryError(f"method='pattern' needs ~{model.pattern_bytes(batch, n_tokens, 6) / 2**30:.1f} GiB for "
                          f"{batch} x {n_tokens} tokens; use method='stats' (O(N), one forward per diagonal)")
    if method not in ("pattern", "stats"):
        raise ValueError(f"method must be 'auto', 'pattern' or 'stats', got {method!r}")
    return method


def diagonal_mass(model, tokens: torch.Tensor, diagonals: dict[int, tuple[int, int]], method: str = "auto",
                  progress: bool = True) -> dict[int, torch.Tensor]:
    """{D: [L, H]} = sum over the batch and over keys s in [lo, hi) of A[s + D, s] (unpadded tokens).

    "stats": one forward per D with ``Stats(received=True, received_window=(D, D))``, whose
    received_sum[b, h, s] is exactly A[s + D, s]; "pattern": one forward reading the diagonals of
    each layer's pattern in a ``hook_pattern`` hook.
    """
    from tqdm.auto import tqdm

    B, N = tokens.shape
    L = model.cfg.n_layers
    for D, (lo, hi) in diagonals.items():
        if D < 0 or D >= N:
            raise ValueError(f"diagonal {D} outside [0, {N})")
    method = _pick_method(model, method, B, N)
    out = {}
    if method == "stats":
        for D, (lo, hi) in tqdm(sorted(diagonals.items()), disable=not progress, desc="diagonals"):
            with torch.no_grad(), model.record(Stats(received=True, received_window=(D, D))) as rec:
                run_quietly(model, tokens)
            out[D] = torch.stack([rec["received_sum", l].float()[:, :, lo:hi].sum((0, 2)).cpu() for l in range(L)])
        return out
    acc = {D: torch.zeros(L, model.cfg.n_heads) for D in diagonals}

    def hook(p, hook):
        l = hook.layer()
        for D, (lo, hi) in diagonals.items():
            d = p.detach().diagonal(offset=-D, dim1=-2, dim2=-1)          # [B, H, N - D]: s = index
            acc[D][l] = d[..., lo:hi].float().sum((0, 2)).cpu()

    with torch.no_grad():
        run_quietly(model, tokens, fwd_hooks=[(lambda n: n.endswith("attn.hook_pattern"), hook)])
    return acc


# ------------------------------------------------------------------------------------------------
# RazorAttention: induction and echo on the repeated random block

def razor_scores(model, tokens: torch.Tensor, block_len: int, method: str = "auto", which=("induction", "echo"),
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """{"induction": [L, H], "echo": [L, H]} on a probe from ``repeated_random_tokens``
    (RazorAttention §3.2): mean over queries in repeats 2..R of the mass on j + 1 (induction) or
    on j (echo) over the earlier same-token positions j = t - m·block_len."""
    B, N = tokens.shape
    R = (N - 1) // block_len
    if N != 1 + R * block_len or R < 2:
        raise ValueError(f"tokens of length {N} are not BOS + R >= 2 repeats of a block of {block_len}")
    blocks = tokens[:, 1:].view(B, R, block_len)
    if not bool((blocks == blocks[:, :1]).all()):
        raise ValueError("tokens are not a repeated block (use repeated_random_tokens)")
    if any(len(set(b[0].tolist())) != block_len for b in blocks):
        raise ValueError("a block repeats a token inside itself; the diagonal method needs distinct tokens")
    diag = {}
    for m in range(1, R):
        # query t = s + D must sit in repeat >= m + 1 (1-based), i.e. t >= 1 + m·L
        if "induction" in which:
            diag[m * block_len - 1] = (2, N - (m * block_len - 1))      # s = j + 1 with j >= 1
        if "echo" in which:
            diag[m * block_len] = (1, N - m * block_len)                # s = j >= 1
    mass = diagonal_mass(model, tokens, diag, method, progress)
    n_q = B * (R - 1) * block_len
    out = {}
    if "induction" in which:
        out["induction"] = sum(mass[m * block_len - 1] for m in range(1, R)) / n_q
    if "echo" in which:
        out["echo"] = sum(mass[m * block_len] for m in range(1, R)) / n_q
    return out


@dataclass
class _RazorBase(Analyzer):
    block_len: int = 200        # paper: 2500
    n_repeats: int = 4
    n_samples: int = 1
    seed: int = 0
    method: str = "auto"        # "pattern" (one forward, N×N per layer), "stats" (O(N)), "auto"

    _which = "induction"

    @classmethod
    def paper_config(cls, **kw):
        """RazorAttention's probe: BOS + 2500 random tokens x 4 (10001 tokens: more than SmolLM2's 8192
        context; the O(N) "stats" method)."""
        return cls(**{"block_len": 2500, "n_repeats": 4, "method": "stats", **kw})

    def probe(self, model, data=None) -> tuple[torch.Tensor, str]:
        """The probe tokens [B, N] (``data``: None = a fresh repeated random block, or given repeated
        tokens) and a dataset name."""
        if data is None:
            tokens = repeated_random_tokens(model, self.block_len, self.n_repeats, self.n_samples, self.seed)
            return tokens, f"BOS + random block of {self.block_len} x {self.n_repeats} ({self.n_samples} sample(s))"
        tokens = torch.as_tensor(data)
        tokens = tokens if tokens.dim() == 2 else tokens[None]
        return tokens, f"given repeated tokens {tuple(tokens.shape)}"

    def _scores(self, model, s: torch.Tensor, dataset: str, started: float) -> HeadScores:
        return self._result(model, s, dataset=dataset, started=started, kv_max=kv_group_max(s, model.cfg.n_kv_heads))

    def score(self, model, data=None, progress: bool = True) -> HeadScores:
        """``data``: None (the seeded random probe) or repeated-block token ids [B, N] / [N]."""
        t0 = time.time()
        tokens, ds = self.probe(model, data)
        s = razor_scores(model, tokens, self.block_len, self.method, (self._which,), progress)[self._which]
        return self._scores(model, s, ds, t0)


@register
@dataclass
class Induction(_RazorBase):
    """Induction heads (RazorAttention §3.2; Olsson et al. 2022): mean attention mass that queries in
    repeats 2..4 put on the token after each earlier occurrence of their own token.

    Parameters: ``block_len`` (random block length in tokens; paper 2500), ``n_repeats`` (repeats of
    the block, 4), ``n_samples`` (probes, each BOS + a fresh block), ``seed`` (for the blocks),
    ``method`` ("pattern": one forward reading N x N patterns; "stats": O(N), one forward per
    diagonal; "auto": patterns when they fit)."""

    name = "induction"
    paper = "Tang et al. 2024, RazorAttention §3.2 (induction heads; probe of repeated random tokens)"
    description = "mean attention on j+1 for earlier same-token positions j (repeated random block)"
    threshold = None
    _which = "induction"


@register
@dataclass
class Echo(_RazorBase):
    """Echo heads (RazorAttention §3.2): mean attention mass that queries in repeats 2..4 put on the
    earlier occurrences of their own token.

    Parameters: ``block_len`` (random block length in tokens; paper 2500), ``n_repeats`` (repeats of
    the block, 4), ``n_samples`` (probes, each BOS + a fresh block), ``seed`` (for the blocks),
    ``method`` ("pattern": one forward reading N x N patterns; "stats": O(N), one forward per
    diagonal; "auto": patterns when they fit)."""

    name = "echo"
    paper = "Tang et al. 2024, RazorAttention §3.2 (echo heads; probe of repeated random tokens)"
    description = "mean attention on earlier positions j holding the same token (repeated random block)"
    threshold = None
    _which = "echo"


def razor_heads(model, data=None, progress: bool = True, **params) -> dict[str, HeadScores]:
    """{"induction": HeadScores, "echo": HeadScores} from one probe and one set of passes
    (``params``: the analyzers' hyperparameters, e.g. block_len, n_repeats, method)."""
    t0 = time.time()
    ind, echo = Induction(**params), Echo(**params)
    tokens, ds = ind.probe(model, data)
    s = razor_scores(model, tokens, ind.block_len, ind.method, ("induction", "echo"), progress)
    return {"induction": ind._scores(model, s["induction"], ds, t0), "echo": echo._scores(model, s["echo"], ds, t0)}


def razor_retrieval_set(induction, echo, induction_frac: float = 0.14, echo_frac: float = 0.01,
                        level: str = "kv") -> list[tuple[int, int]]:
    """RazorAttention's retrieval heads (§3.2): top ``induction_frac`` by induction ∪ top
    ``echo_frac`` by echo, as sorted (layer, head) pairs. ``level="kv"`` ranks KV heads by the max
    over their query heads (the paper's GQA rule; compression is per KV head), "query" ranks query
    heads. Counts are ceil(frac · number of heads), at least 1."""
    if level not in ("kv", "query"):
        raise ValueError(f"level must be 'kv' or 'query', got {level!r}")

    def top(hs_, frac):
        s = hs_.extra["kv_max"] if level == "kv" else hs_.scores
        s = torch.as_tensor(s)
        k = max(1, math.ceil(frac * s.numel() - 1e-9))
        idx = s.flatten().topk(k).indices
        return {(int(i) // s.shape[1], int(i) % s.shape[1]) for i in idx}

    return sorted(top(induction, induction_frac) | top(echo, echo_frac))


# ------------------------------------------------------------------------------------------------
# previous-token and duplicate-token heads on short probes

@register
@dataclass
class PreviousToken(Analyzer):
    """Previous-token heads (Wang et al. 2022 IOI §3; Olsson et al. 2022): mean over queries t >= 1
    of A[t, t - 1]. Exact and O(N): one forward with ``Stats(received=True,
    received_window=(1, 1))`` (the diagonal t - s = 1), or the pattern's diagonal for short inputs.
    Default data: natural text.

    Parameters: ``n_samples`` natural-text samples of ``n_tokens`` tokens (used when ``data`` is None
    or text); ``method`` ("stats": O(N), one forward with the column sums of the t - s = 1 diagonal;
    "pattern": the pattern's diagonal, short inputs only; "auto": patterns when they fit)."""

    name = "previous_token"
    paper = "Wang et al. 2022, Interpretability in the Wild (IOI) §3; RazorAttention §3 (classic detectors)"
    description = "mean attention on the previous token"
    threshold = None

    n_samples: int = 8
    n_tokens: int = 128
    method: str = "stats"

    def score(self, model, data=None, progress: bool = True):
        """``data``: None (shipped natural text), a list of strings, or token ids [batch, pos]."""
        t0 = time.time()
        toks, ds = text_samples(model, data, self.n_samples, self.n_tokens)
        B, N = toks.shape
        s = diagonal_mass(model, toks, {1: (0, N - 1)}, self.method, progress)[1] / (B * (N - 1))
        return self._result(model, s, dataset=f"{ds} ({B} x {N} tokens)", started=t0,
                            kv_max=kv_group_max(s, model.cfg.n_kv_heads))


def duplicate_token_scores(model, tokens: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """[L, H]: mean over queries t with an earlier copy of their token of the attention mass on all
    those copies, sum_{j < t, tok_j = tok_t} A[t, j] (reads each layer's pattern in a hook)."""
    B, N = tokens.shape
    if not pattern_fits(model, B, N):
        raise MemoryError(f"duplicate-token scores read patterns: {B} x {N} tokens do not fit; use shorter inputs")
    same = (tokens[:, :, None] == tokens[:, None, :]) & torch.ones(N, N, dtype=torch.bool).tril(-1)  # [B, t, j]
    has = same.any(-1)                                                                               # [B, t]
    n_q = int(has.sum())
    if n_q == 0:
        raise ValueError("no token repeats in the data: duplicate-token scores need repeated tokens")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    acc = torch.zeros(L, H)
    same_d = same.to(model.device)

    def hook(p, hook):
        acc[hook.layer()] = (p.detach().float() * same_d[:, None]).sum((0, 2, 3)).cpu()

    with torch.no_grad():
        run_quietly(model, tokens, fwd_hooks=[(lambda n: n.endswith("attn.hook_pattern"), hook)])
    return acc / n_q


@register
@dataclass
class DuplicateToken(Analyzer):
    """Duplicate-token heads (Wang et al. 2022 IOI §3): mean over queries that have an earlier copy
    of their token of the attention mass on those copies (the short-probe version of echo heads).
    Default data: natural text (short samples; patterns are read layer by layer).

    Parameters: ``n_samples`` natural-text samples of ``n_tokens`` tokens (used when ``data`` is None
    or text; patterns are read, so keep them short)."""

    name = "duplicate_token"
    paper = "Wang et al. 2022, Interpretability in the Wild (IOI) §3; RazorAttention §3 (classic detectors)"
    description = "mean attention on earlier occurrences of the current token"
    threshold = None

    n_samples: int = 8
    n_tokens: int = 128

    def score(self, model, data=None, progress: bool = True):
        """``data``: None (shipped natural text), a list of strings, or token ids [batch, pos] with repeats."""
        t0 = time.time()
        toks, ds = text_samples(model, data, self.n_samples, self.n_tokens)
        s = duplicate_token_scores(model, toks, progress)
        return self._result(model, s, dataset=f"{ds} ({toks.shape[0]} x {toks.shape[1]} tokens)", started=t0,
                            kv_max=kv_group_max(s, model.cfg.n_kv_heads))
