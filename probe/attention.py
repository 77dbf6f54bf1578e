"""The one attention path: a function registered with transformers' ``AttentionInterface``.

Every HF model switched to ``attn_implementation="headscope"`` calls ``headscope_attention`` in
each layer with q [batch, head, q_len, d], k/v [batch, kv_head, k_len, d] (after RoPE and the KV
cache update). With nothing active on the layer it runs the plain fast path (SDPA where it
applies). Otherwise it runs an instrumented kernel (Triton on CUDA, the exact chunked PyTorch
path elsewhere, the full-matrix reference only when a hook asks for the pattern itself), hands
statistics to the recorders and tensors to hook functions, and applies the active edits.

The mask function registered beside it is transformers' ``flash_attention_mask``: no mask at all
without padding, a compact [batch, k_len] bool mask with it; the window comes as ``sliding_window``.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..kernels import chunked, reference
from .edits import apply_output_edits

NAME = "headscope"
log = logging.getLogger("headscope")
_triton = None


def _triton_module():
    """kernels.triton_attention if it can run here, else None (imported once)."""
    global _triton
    if _triton is None:
        try:
            from ..kernels import triton_attention as ta
            _triton = ta
        except Exception as e:  # triton missing or broken: the chunked path is exact, just slower
            log.warning("headscope: Triton kernels unavailable (%s); using the chunked PyTorch path", e)
            _triton = False
    return _triton or None


def _key_pos0(position_ids, B: int, K: int, device) -> torch.Tensor:
    """Token position of cache index 0, per sequence [B] (see kernels/spec.py)."""
    if position_ids is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    last = position_ids[:, -1].to(device=device, dtype=torch.long)
    return (last + 1 - K).expand(B) if last.shape[0] == 1 else last + 1 - K


def _fast(module, q, k, v, key_padding, scaling, sliding_window, softcap, causal):
    """Plain attention, nothing recorded: SDPA when it is exact, else the plain chunked/Triton path."""
    Q, K = q.shape[2], k.shape[2]
    window_irrelevant = sliding_window is None or sliding_window >= K
    if key_padding is None and window_irrelevant and softcap is None and (Q == K or Q == 1 or not causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Q > 1, scale=scaling,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return _instrumented(module, q, k, v, key_padding, scaling, sliding_window, softcap, causal,
                         None, None, None)[0]


def _warn_once(module, msg: str) -> None:
    state = getattr(module, "_headscope", None)
    seen = state.fallback_warned if state is not None else set()
    if msg not in seen:
        seen.add(msg)
        log.warning("headscope: %s", msg)


def _needs_grad(q, k, v, edits) -> bool:
    """Autograd will want gradients through this call (inputs or edit tensors require grad)."""
    if not torch.is_grad_enabled():
        return False
    ts = [q, k, v] + (edits.tensors() if edits is not None else [])
    return any(t.requires_grad for t in ts)


def _instrumented(module, q, k, v, key_padding, scaling, sliding_window, softcap, causal,
                  key_pos0, stats, edits, score_hook=None, pattern_hook=None):
    kw = dict(scaling=scaling, causal=causal, sliding_window=sliding_window, key_padding=key_padding,
              softcap=softcap, key_pos0=key_pos0, stats=stats, edits=edits)
    if score_hook is not None or pattern_hook is not None:
        out, st, _ = reference.attention(q, k, v, score_hook=score_hook, pattern_hook=pattern_hook, **kw)
        return out, st
    if _needs_grad(q, k, v, edits):
        # Triton and the fused C row pass have no backward: the chunked PyTorch path is differentiable
        if q.is_cuda and os.environ.get("HEADSCOPE_NO_TRITON") != "1" and _triton_module() is not None:
            _warn_once(module, "gradients are needed, so the Triton kernel is skipped; using the "
                               "differentiable chunked PyTorch path (use torch.no_grad() for inference)")
        elif q.device.type == "cpu" and chunked.cpu_native.available():
            _warn_once(module, "gradients are needed, so the fused C row pass is skipped; using the "
                               "differentiable chunked PyTorch path (use torch.no_grad() for inference)")
        return chunked.attention(q, k, v, **kw)
    if q.is_cuda and os.environ.get("HEADSCOPE_NO_TRITON") != "1":
        ta = _triton_module()
        if ta is not None:
            try:
                return ta.attention(q, k, v, **kw)
            except ta.Unsupported as e:
                _warn_once(module, f"Triton kernel cannot do this ({e}); using the chunked path")
    return chunked.attention(q, k, v, **kw)


def headscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, position_ids=None, **kwargs):
    """q [B, H, Q, d], k/v [B, G, K, d], attention_mask None or [B, K] bool -> ([B, Q, H, d], None)."""
    B, H, Q, d = query.shape
    K = key.shape[2]
    if scaling is None:
        scaling = d ** -0.5
    causal = getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise RuntimeError("headscope attention expects the compact [batch, k_len] padding mask; "
                           "load the model through headscope.load so its mask function is registered")
    key_padding = attention_mask.bool() if attention_mask is not None else None
    if key_padding is not None and key_padding.shape[-1] != K:
        key_padding = key_padding[:, -K:]

    state = getattr(module, "_headscope", None)
    layer = getattr(module, "_headscope_layer", getattr(module, "layer_idx", 0))
    plan = state.plan(layer) if state is not None and state.active() else None
    if plan is None:
        out = _fast(module, query, key, value, key_padding, scaling, sliding_window, softcap, causal)
        return out.transpose(1, 2).contiguous(), None

    hooks = plan.hooks
    from .hooks import Hook, hook_name

    def call(kind, t):
        for fn in hooks.get(kind, ()):
            r = fn(t, hook=Hook(hook_name(kind, layer)))
            if r is not None:
                t = r
        return t

    # TransformerLens shapes for q/k/v/z: [batch, pos, head, d_head]
    if "q" in hooks:
        query = call("q", query.transpose(1, 2)).transpose(1, 2)
    if "k" in hooks:
        key = call("k", key.transpose(1, 2)).transpose(1, 2)
    if "v" in hooks:
        value = call("v", value.transpose(1, 2)).transpose(1, 2)
    score_hook = (lambda s: call("attn_scores", s)) if "attn_scores" in hooks else None
    pattern_hook = (lambda p: call("pattern", p)) if "pattern" in hooks else None

    key_pos0 = _key_pos0(position_ids, B, K, query.device)
    if plan.edits is not None and plan.edits.redistributions:
        _check_spans(plan.edits, key_pos0, K, layer)
    if plan.stats is None and plan.edits is None and score_hook is None and pattern_hook is None:
        out = _fast(module, query, key, value, key_padding, scaling, sliding_window, softcap, causal)
    else:
        out, stats = _instrumented(module, query, key, value, key_padding, scaling, sliding_window, softcap,
                                   causal, key_pos0, plan.stats, plan.edits, score_hook, pattern_hook)
        for rec in plan.recorders:
            rec.add(layer, stats)
    out = out.transpose(1, 2)                                   # [B, Q, H, d]
    if plan.out_edits:                                          # output-space edits, once, in PyTorch
        out = apply_output_edits(out, plan.out_edits)
    if "z" in hooks:
        out = call("z", out)
    return out.contiguous(), None


def _check_spans(edits, key_pos0, K: int, layer: int) -> None:
    """A redistribution span that reaches beyond the longest sequence is an error, not a no-op."""
    n = int((key_pos0 + K).max())                               # positions 0..n-1 exist
    for r in edits.redistributions:
        for a, b in r.source + (r.target or ()):
            if b > n:
                raise ValueError(f"ScaleKeys on layer {layer}: span ({a}, {b}) reaches beyond the sequence "
                                 f"({n} positions, 0..{n - 1}); give spans inside the prompt")


def register() -> None:
    """Register the attention and mask functions under the name 'headscope' (idempotent)."""
    AttentionInterface.register(NAME, headscope_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


register()
