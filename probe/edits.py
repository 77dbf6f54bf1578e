"""Head edits: small objects that say what to change in one head; a list of them composes.

Each edit names a layer and one or more query heads and adds itself to that layer's
``kernels.LayerEdits`` (``add_to``). ``compile_edits`` gathers a list into per-layer kernel
arguments. The attention function applies them in the order ``LayerEdits`` documents.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kernels.spec import LayerEdits, Redistribution, Span


def _heads(h) -> tuple[int, ...]:
    return (int(h),) if isinstance(h, int) else tuple(int(x) for x in h)


@dataclass(frozen=True)
class Ablate:
    """Knock out heads. ``how``:
    - "zero": the head's output z is zero;
    - "mean": z is replaced by ``mean`` ([d_head] or [n_heads_given, d_head]), e.g. its mean over a
      dataset (``HookedModel.mean_z``);
    - "uniform": the query is multiplied by ``eps`` so attention becomes ~uniform over the visible
      keys ("undifferentiated attention": Zhou et al. 2025, Ships/Sahara §3; Wu et al. 2024's
      retrieval-head masking).
    """

    layer: int
    head: int | Sequence[int]
    how: str = "zero"
    mean: torch.Tensor | None = None
    eps: float = 1e-4

    def add_to(self, e: LayerEdits, n_heads: int, d_head: int) -> None:
        heads = list(_heads(self.head))
        if self.how == "uniform":
            qs = e.q_scale if e.q_scale is not None else torch.ones(n_heads)
            e.q_scale = qs.index_fill(0, torch.tensor(heads), self.eps)
        elif self.how in ("zero", "mean"):
            mask = e.replace_mask if e.replace_mask is not None else torch.zeros(n_heads, dtype=torch.bool)
            val = e.replace_value if e.replace_value is not None else torch.zeros(n_heads, d_head)
            if self.how == "mean":
                if self.mean is None:
                    raise ValueError("Ablate(how='mean') needs mean=tensor [d_head] (see HookedModel.mean_z)")
                rows = self.mean.float().reshape(-1, d_head).expand(len(heads), d_head)
                val = val.index_put((torch.tensor(heads),), rows.to(val))
            else:
                val = val.index_fill(0, torch.tensor(heads), 0.0)
            e.replace_mask = mask.index_fill(0, torch.tensor(heads), True)
            e.replace_value = val
        else:
            raise ValueError(f"Ablate(how={self.how!r}): use 'zero', 'mean' or 'uniform'")


@dataclass(frozen=True)
class ScaleKeys:
    """Multiply a head's attention on ``keys`` (token-position spans) by ``factor`` and give the
    freed mass to ``target`` keys (default: all other keys) in proportion to their attention.

    ACT (Yu et al. 2024, §3.2 eq. 4): keys = the hidden sinks, factor beta = 0.4, target None.
    VAR (Kang et al. 2025, §4.2): keys = sink tokens, factor p = 0.6, target = the token group,
    max_ratio rho = 0.5, min_target 0.2 (only rows that look at the group but not mostly at sinks).
    """

    layer: int
    head: int | Sequence[int]
    keys: Sequence[Span]
    factor: float
    target: Sequence[Span] | None = None
    max_ratio: float | None = None
    min_target: float = 0.0

    def add_to(self, e: LayerEdits, n_heads: int, d_head: int) -> None:
        if not 0.0 <= self.factor:
            raise ValueError(f"ScaleKeys factor must be >= 0, got {self.factor}")
        e.redistributions = e.redistributions + (Redistribution(
            heads=_heads(self.head), factor=float(self.factor),
            source=tuple((int(a), int(b)) for a, b in self.keys),
            target=None if self.target is None else tuple((int(a), int(b)) for a, b in self.target),
            max_ratio=self.max_ratio, min_target=self.min_target),)


@dataclass(frozen=True)
class HeadAffine:
    """LoFiT (Yin et al. 2024, eq. 2): z <- (1 + scale) * z + bias before o_proj. ``scale`` and
    ``bias`` are [d_head] or [n_heads_given, d_head] and may require grad."""

    layer: int
    head: int | Sequence[int]
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def add_to(self, e: LayerEdits, n_heads: int, d_head: int) -> None:
        idx = torch.tensor(_heads(self.head))
        n = len(idx)
        a_old = e.out_scale if e.out_scale is not None else torch.zeros(n_heads, d_head)
        v_old = e.out_bias if e.out_bias is not None else torch.zeros(n_heads, d_head)
        a = torch.zeros(n_heads, d_head)
        v = torch.zeros(n_heads, d_head)
        if self.scale is not None:
            a = a.index_put((idx,), self.scale.float().reshape(-1, d_head).expand(n, d_head))
        if self.bias is not None:
            v = v.index_put((idx,), self.bias.float().reshape(-1, d_head).expand(n, d_head))
        # compose with an earlier affine: (1+a)((1+a0) z + v0) + v
        e.out_scale = (1 + a) * (1 + a_old) - 1
        e.out_bias = (1 + a) * v_old + v


@dataclass(frozen=True)
class StreamingGate:
    """DuoAttention (Xiao et al. 2024, eq. 1): out = (1 - alpha) * streaming + alpha * full, where
    streaming attention sees the first ``sink`` positions and the last ``recent`` ones. ``alpha``
    holds one gate per query head listed (may require grad)."""

    layer: int
    head: int | Sequence[int]
    alpha: torch.Tensor
    sink: int = 64
    recent: int = 256

    def add_to(self, e: LayerEdits, n_heads: int, d_head: int) -> None:
        if e.gate is not None and (e.gate_sink, e.gate_recent) != (self.sink, self.recent):
            raise ValueError("two StreamingGates on one layer need the same sink and recent sizes")
        g = e.gate if e.gate is not None else torch.ones(n_heads)
        idx = torch.tensor(_heads(self.head))
        e.gate = g.index_put((idx,), self.alpha.float().reshape(-1).expand(len(idx)))
        e.gate_sink, e.gate_recent = self.sink, self.recent


def compile_edits(edits, n_layers: int, n_heads: int, d_head: int, device=None) -> dict[int, LayerEdits]:
    """A list of edits -> {layer: LayerEdits}, with range checks that say what is wrong."""
    out: dict[int, LayerEdits] = {}
    for ed in edits:
        if not hasattr(ed, "add_to"):
            raise TypeError(f"{ed!r} is not a headscope edit (Ablate, ScaleKeys, HeadAffine, StreamingGate)")
        if not 0 <= ed.layer < n_layers:
            raise IndexError(f"{type(ed).__name__}: layer {ed.layer} out of range, the model has {n_layers} layers")
        for h in _heads(ed.head):
            if not 0 <= h < n_heads:
                raise IndexError(f"{type(ed).__name__}: head {h} out of range, layer {ed.layer} has {n_heads} heads")
        ed.add_to(out.setdefault(ed.layer, LayerEdits()), n_heads, d_head)
    if device is not None:
        for e in out.values():
            for f in ("q_scale", "gate", "replace_mask", "replace_value", "out_scale", "out_bias"):
                t = getattr(e, f)
                if t is not None:
                    setattr(e, f, t.to(device))
    return out
