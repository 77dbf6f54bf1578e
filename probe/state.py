"""What is active on a model right now: recorders, edits, hook functions, cache requests.

Opening a context on ``HookedModel`` only adds plain objects here; the attention function reads
``plan(layer)`` on every call. One ``ProbeState`` per model, shared by its attention modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..kernels.spec import LayerEdits, StatRequest
from .record import Recorder


@dataclass
class LayerPlan:
    stats: StatRequest | None
    recorders: list[Recorder]
    edits: LayerEdits | None
    hooks: dict[str, list]          # kind -> hook functions (q, k, v, attn_scores, pattern, z)

    @property
    def needs_probs(self) -> bool:
        return bool(self.hooks.get("pattern") or self.hooks.get("attn_scores"))


def _merge_edits(a: LayerEdits, b: LayerEdits) -> LayerEdits:
    """Two edit sets on one layer (nested ``model.edit`` blocks): b applies after a."""
    import torch
    out = LayerEdits(**{k: getattr(a, k) for k in a.__dataclass_fields__})
    if b.q_scale is not None:
        out.q_scale = b.q_scale if a.q_scale is None else a.q_scale * b.q_scale
    out.redistributions = a.redistributions + b.redistributions
    if b.gate is not None:
        if a.gate is not None:
            raise ValueError("two StreamingGate edit sets on one layer: put them in one model.edit([...])")
        out.gate, out.gate_sink, out.gate_recent = b.gate, b.gate_sink, b.gate_recent
    if b.replace_mask is not None:
        if a.replace_mask is None:
            out.replace_mask, out.replace_value = b.replace_mask, b.replace_value
        else:
            out.replace_mask = a.replace_mask | b.replace_mask
            out.replace_value = torch.where(b.replace_mask[:, None], b.replace_value, a.replace_value)
    if b.out_scale is not None or b.out_bias is not None:
        a0 = a.out_scale if a.out_scale is not None else 0.0
        v0 = a.out_bias if a.out_bias is not None else 0.0
        a1 = b.out_scale if b.out_scale is not None else 0.0
        v1 = b.out_bias if b.out_bias is not None else 0.0
        out.out_scale = (1 + a1) * (1 + a0) - 1
        out.out_bias = (1 + a1) * v0 + v1
    return out


@dataclass
class ProbeState:
    n_layers: int
    recorders: list[Recorder] = field(default_factory=list)
    edit_sets: list[dict[int, LayerEdits]] = field(default_factory=list)
    hooks: dict[tuple[int, str], list] = field(default_factory=dict)
    fallback_warned: set = field(default_factory=set)

    def active(self) -> bool:
        return bool(self.recorders or self.edit_sets or self.hooks)

    def plan(self, layer: int) -> LayerPlan | None:
        recs = [r for r in self.recorders if layer in r.layers]
        stats = None
        for r in recs:
            stats = r.request if stats is None else stats.merge(r.request)
        edits = None
        for es in self.edit_sets:
            if layer in es:
                edits = es[layer] if edits is None else _merge_edits(edits, es[layer])
        hooks = {kind: fns for (l, kind), fns in self.hooks.items() if l == layer and fns}
        if stats is None and edits is None and not hooks:
            return None
        return LayerPlan(stats, recs, edits, hooks)
