"""Controls for head interventions: random head sets of the same size, bootstrap confidence
intervals, and a before/after table.

An intervention that selects heads is only informative against the same intervention on heads
chosen without the selection rule: Wu et al. 2024 (Retrieval Head, §3.3) mask as many random heads
as retrieval heads; Yin et al. 2024 (LoFiT, §5.2) compare task-selected heads with random heads and
with heads selected for another task. Every condition here is evaluated on the same held-out
examples, so differences to the base model are paired.

Confidence intervals are percentile bootstrap 95% intervals (Efron & Tibshirani 1993, ch. 13) over
examples; for a family of random head sets the resampling is two-level (sets, then examples), so the
interval covers the spread between random draws as well as the test sample.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


def random_head_sets(n_layers: int, n_heads: int, k: int, n_sets: int = 10, seed: int = 0,
                     layers=None, exclude=()) -> list[list[tuple[int, int]]]:
    """``n_sets`` sets of ``k`` distinct (layer, head) pairs drawn uniformly from ``layers``
    (default all), never containing a head of ``exclude``."""
    layers = range(n_layers) if layers is None else layers
    excl = {(int(l), int(h)) for l, h in exclude}
    pool = [(l, h) for l in layers for h in range(n_heads) if (l, h) not in excl]
    if not 0 < k <= len(pool):
        raise ValueError(f"cannot draw {k} heads from {len(pool)} candidates")
    rng = random.Random(f"random-heads-{seed}-{k}")
    return [sorted(rng.sample(pool, k)) for _ in range(n_sets)]


def bootstrap_ci(values: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """values [n] (one condition) or [sets, n] (a family of random sets, resampled on both axes)
    -> (mean, low, high)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() == 1:
        v = v[None]
    S, n = v.shape
    if n == 0:
        raise ValueError("no values to bootstrap")
    g = torch.Generator().manual_seed(seed)
    si = torch.randint(0, S, (n_boot, S), generator=g) if S > 1 else torch.zeros(n_boot, 1, dtype=torch.long)
    ei = torch.randint(0, n, (n_boot, n), generator=g)
    # mean over resampled sets and examples: [n_boot]
    means = torch.stack([v[si[b]][:, ei[b]].mean() for b in range(n_boot)])
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return float(v.mean()), lo, hi


@dataclass
class Row:
    """One condition of a before/after table. ``correct``: [n] or [sets, n] per-example 0/1."""
    name: str
    correct: torch.Tensor
    loss: torch.Tensor | None = None
    n_params: int = 0
    n_heads: int = 0
    heads: list = field(default_factory=list)

    def summary(self, base: "Row | None" = None, n_boot: int = 2000, seed: int = 0) -> dict:
        """A JSON-ready dict: condition, accuracy (fraction) and its 95% bootstrap CI ``ci95`` [lo, hi],
        n_heads, trained_params, sets, n_examples; mean ``loss`` when given; against ``base`` (paired per
        example) ``delta_vs_base`` and ``delta_ci95``; the ``heads`` as lists of ints when set."""
        acc, lo, hi = bootstrap_ci(self.correct.float(), n_boot, seed)
        out = {"condition": self.name, "accuracy": acc, "ci95": [lo, hi], "n_heads": self.n_heads,
               "trained_params": self.n_params,
               "sets": int(self.correct.shape[0]) if self.correct.dim() == 2 else 1,
               "n_examples": int(self.correct.shape[-1])}
        if self.loss is not None:
            out["loss"] = float(self.loss.float().mean())
        if base is not None and base is not self:
            d = self.correct.float() - base.correct.float()          # paired with the base model
            m, dlo, dhi = bootstrap_ci(d, n_boot, seed + 1)
            out["delta_vs_base"] = m
            out["delta_ci95"] = [dlo, dhi]
        if self.heads:
            out["heads"] = [list(map(int, h)) for h in self.heads] if not isinstance(self.heads[0][0], (list, tuple)) \
                else [[list(map(int, h)) for h in s] for s in self.heads]
        return out


def table(rows: list[Row], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Summaries of ``rows``; the first row is the base every delta is paired against."""
    if not rows:
        raise ValueError("no rows")
    return [r.summary(rows[0], n_boot, seed) for r in rows]


def format_table(summaries: list[dict]) -> str:
    """A Markdown before/after table."""
    lines = ["| condition | heads | trained params | held-out accuracy [95% CI] | Δ vs base [95% CI] | loss |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        lo, hi = s["ci95"]
        sets = f" ({s['sets']} sets)" if s["sets"] > 1 else ""
        delta = "—"
        if "delta_vs_base" in s:
            dlo, dhi = s["delta_ci95"]
            delta = f"{s['delta_vs_base']:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
        loss = f"{s['loss']:.3f}" if "loss" in s else "—"
        lines.append(f"| {s['condition']}{sets} | {s['n_heads']} | {s['trained_params']} | "
                     f"{s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {delta} | {loss} |")
    return "\n".join(lines)
