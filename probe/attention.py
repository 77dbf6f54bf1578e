"""The one attention path: a function registered with transformers' ``AttentionInterface``.

Every HF model switched to ``attn_implementation="headscope"`` calls ``headscope_attention`` in
each layer with q [batch, head, q_len, d], k/v [batch, kv_head, k_len, d] (after RoPE and the KV
cache update). With nothing active on the layer it runs the plain fast path (SDPA where it
applies). Otherwise it runs an instrumented kernel (Triton on CUDA, the exact chunked PyTorch
path elsewhere, the full-matrix reference only when a hook asks for the pattern itself), hands
statistics to the recorders and tensors to hook functions, and applies the active edits.

The mask function registered beside it is transformers' ``flash_attention_mask``: no mask at all
without padding, a compact [batch, k_len] bool mask with it; the window comes as ``sliding_window``.

Keyword arguments. Every argument that changes the attention math is implemented or refused:
``scaling``, ``sliding_window``, ``softcap`` (Gemma-2), ``is_causal`` and the learned sink logits
``s_aux`` (GPT-OSS) are implemented; ``dropout`` > 0 on a module in training mode is refused
(attention dropout is not implemented: call ``model.eval()``). Arguments in ``IGNORED_KWARGS`` do not
change the math and are ignored; any other argument is refused unless it is None (a None says the
feature is off), so a new transformers feature never runs silently wrong.

Fast paths. The Triton kernels and the fused C row pass each declare what they can do
(``supports(stats, edits, ...)`` in ``kernels/triton_attention.py`` and ``kernels/cpu_native.py``);
a request they decline runs on the chunked PyTorch path, which does everything, and the reason is
logged once per process (``logging.getLogger("headscope")``, level WARNING). The result always holds
every statistic the request asks for (``kernels.spec.expected_keys``).

FlashAttention-4 (optional, ``headscope[fa4]``, ``kernels/fa4.py``) comes first where it is
installed and the GPU runs it: plain calls (nothing recorded) and statistics it derives from its
row LSE (sink, span, recent and window-distance masses). It declines the rest with one message
(SDPA or the Triton kernels run instead); ``HEADSCOPE_NO_FA4=1`` switches it off.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..kernels import chunked, cpu_native, fa4, reference
from ..kernels.spec import expected_keys
from .edits import apply_output_edits

NAME = "headscope"
log = logging.getLogger("headscope")
_triton = None

# Attention kwargs transformers passes that do not change the attention math (cache and bookkeeping
# arguments, varlen metadata of flash kernels only when it is None -- see ``_check_kwargs``).
IGNORED_KWARGS = frozenset({"cache_position", "past_key_values", "past_key_value", "use_cache",
                            "output_attentions", "output_hidden_states", "return_dict", "deterministic",
                            "layer_idx", "token_type_ids", "layer_type", "attention_type",
                            "output_router_logits", "num_items_in_batch", "logits_to_keep"})
# Shared through the "headscope" logger, so that "once per process" holds even when this file is
# imported twice under two package names (pytest imports the repo root as a package of its folder's name)
if not hasattr(log, "headscope_declined"):
    log.headscope_declined, log.headscope_declined_lock = set(), threading.Lock()
_declined: set[str] = log.headscope_declined
_declined_lock = log.headscope_declined_lock


def decline_once(reason: str, fallback: str = "the chunked PyTorch path") -> None:
    """Log, once per process and reason, that a fast path declined a call and what runs instead."""
    with _declined_lock:
        if reason in _declined:
            return
        _declined.add(reason)
    log.warning("headscope: %s; using %s instead (same results, slower)", reason, fallback)


@contextlib.contextmanager
def watch_calls(modules):
    """Within the block, collect in the yielded set the indices of ``modules`` whose attention ran
    through ``headscope_attention`` (what ``HookedModel`` uses to refuse models that bypass it).
    The mark is an attribute on the module, not a module-level variable, so it also works when
    this file is imported twice under two package names (pytest's rootdir import does that)."""
    for m in modules:
        m.__dict__["_headscope_seen"] = False
    seen: set[int] = set()
    try:
        yield seen
    finally:
        for i, m in enumerate(modules):
            if m.__dict__.pop("_headscope_seen", False):
                seen.add(i)


def _check_kwargs(module, dropout, kwargs) -> None:
    """Refuse what would change the math without being implemented (see the module docstring)."""
    if dropout and getattr(module, "training", False):
        raise NotImplementedError(
            f"{type(module).__name__} asks for attention dropout p={dropout} (the module is in training "
            "mode); headscope's attention does not implement dropout. Call model.eval() (or set the "
            "config's attention_dropout to 0 to train without it).")
    extra = kwargs.keys() - IGNORED_KWARGS          # (every layer of every step: set arithmetic first)
    bad = {k: kwargs[k] for k in extra if kwargs[k] is not None} if extra else None
    if bad:
        names = ", ".join(f"{k}={type(v).__name__}" for k, v in bad.items())
        raise NotImplementedError(
            f"{type(module).__name__} passed attention argument(s) {names} that headscope's attention "
            "does not implement; running without them would give wrong results. Supported: scaling, "
            "dropout (0 or eval mode), sliding_window, softcap, is_causal, position_ids, s_aux (learned "
            f"sinks); ignored: {sorted(IGNORED_KWARGS)}.")


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


# The last answer of ``_key_pos0``: every layer of one forward gets the same position_ids tensor and
# key count, so all but the first take it from here. The entry holds the tensor itself (its id cannot
# be reused while held) and its version counter (an in-place change makes a new key). Tensors made
# under torch.inference_mode have no version counter: they are not kept.
_POS0_LAST: list = [None]


def _key_pos0(position_ids, B: int, K: int, device) -> torch.Tensor:
    """Token position of cache index 0, per sequence [B] (see kernels/spec.py)."""
    if position_ids is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    version = None if position_ids.is_inference() else position_ids._version
    kept = _POS0_LAST[0]
    if (version is not None and kept is not None and kept[0] is position_ids and kept[1] == version
            and kept[2] == (B, K, device)):
        return kept[3]
    last = position_ids[:, -1].to(device=device, dtype=torch.long)
    pos0 = last + (1 - K)                                       # one kernel, not two, per forward
    pos0 = pos0.expand(B) if last.shape[0] == 1 else pos0
    if version is not None:
        _POS0_LAST[0] = (position_ids, version, (B, K, device), pos0)
    return pos0


def _fa4_try(q, k, v, key_padding, scaling, sliding_window, softcap, causal, key_pos0, stats, edits, sinks,
             fallback: str):
    """FlashAttention-4 for this call if it is available and ``fa4.supports`` it: (out, stats dict),
    or None after saying once why not (nothing is said when FA4 is not installed)."""
    if q.shape[2] == 1 and not fa4.DECODE:     # decoding: SDPA / triton_decode split the keys (fa4.DECODE)
        return None
    if not fa4.available(q):
        if q.is_cuda and fa4.import_error():
            decline_once(f"FlashAttention-4 is installed but does not import ({fa4.import_error()})", fallback)
        return None
    grad = _needs_grad(q, k, v, edits)
    reason = fa4.supports(q, k, v, stats, edits, causal=causal, sliding_window=sliding_window,
                          key_padding=key_padding, softcap=softcap, sinks=sinks is not None, grad=grad)
    if reason is None:
        try:
            out, st = fa4.attention(q, k, v, scaling=scaling, causal=causal, sliding_window=sliding_window,
                                    key_pos0=key_pos0, stats=stats)
            missing = expected_keys(stats) - set(st)
            if not missing:
                return out, st
            reason = f"the FlashAttention-4 backend returned no {sorted(missing)}"
        except fa4.Unsupported as e:
            reason = f"the FlashAttention-4 backend cannot do this call ({e})"
    decline_once(reason, fallback)
    return None


def _fast(module, q, k, v, key_padding, scaling, sliding_window, softcap, causal, sinks=None):
    """Plain attention, nothing recorded: FlashAttention-4 where installed and it supports the call,
    else SDPA when it is exact, else the plain chunked/Triton path."""
    r = _fa4_try(q, k, v, key_padding, scaling, sliding_window, softcap, causal, None, None, None, sinks,
                 "PyTorch SDPA or headscope's kernels")
    if r is not None:
        return r[0]
    Q, K = q.shape[2], k.shape[2]
    window_irrelevant = sliding_window is None or sliding_window >= K
    if (key_padding is None and window_irrelevant and softcap is None and sinks is None
            and (Q == K or Q == 1 or not causal)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Q > 1, scale=scaling,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return _instrumented(module, q, k, v, key_padding, scaling, sliding_window, softcap, causal,
                         None, None, None, sinks=sinks, fa4_tried=True)[0]


def plain_attention(q, k, v, *, scaling: float, causal: bool = True, sliding_window: int | None = None,
                    key_padding: torch.Tensor | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """What a layer with nothing recorded runs: q [B, H, Q, d], k, v [B, G, K, d] -> [B, H, Q, d]
    (FlashAttention-4, SDPA or the plain kernels, as ``headscope_attention`` dispatches them)."""
    return _fast(None, q, k, v, key_padding, scaling, sliding_window, softcap, causal, sinks)


def _needs_grad(q, k, v, edits) -> bool:
    """Autograd will want gradients through this call (inputs or edit tensors require grad)."""
    if not torch.is_grad_enabled():
        return False
    ts = [q, k, v] + (edits.tensors() if edits is not None else [])
    return any(t.requires_grad for t in ts)


def has_sliding_layers(module) -> bool:
    """Whether the model of this attention module has sliding-window layers (its config names a
    ``sliding_window``: Gemma-2/3, GPT-OSS, Mistral; Qwen2 only with ``use_sliding_window``). Its
    full layers then run the Triton kernels with the window's test compiled in and an unbounded
    window, so that they share the sliding layers' compiled kernels (``triton_attention.attention``'s
    ``window_switch``): half the kernels to compile on a fresh GPU for a model that alternates them.
    A config with a window and ``layer_types`` that are all full (Qwen2-MoE's default, among others in
    transformers 5.25) has none: its layers keep the kernels without the window's test."""
    if module is None:
        return False
    got = module.__dict__.get("_headscope_sliding")
    if got is None:                     # read once per module: a config read costs microseconds a call
        cfg = getattr(module, "config", None)
        kinds = getattr(cfg, "layer_types", None)
        got = getattr(cfg, "sliding_window", None) is not None and (kinds is None or "sliding_attention" in kinds)
        module.__dict__["_headscope_sliding"] = got
    return got


def _instrumented(module, q, k, v, key_padding, scaling, sliding_window, softcap, causal,
                  key_pos0, stats, edits, score_hook=None, pattern_hook=None, sinks=None, fa4_tried=False):
    """Pick the path for one instrumented call: the reference when a hook wants scores/patterns,
    FlashAttention-4 when installed and it ``supports`` the request, Triton on CUDA when it
    ``supports`` the request, else the chunked path (with the fused C row pass when
    ``cpu_native.supports`` it). Returns (out [B, H, Q, d], stats dict)."""
    kw = dict(scaling=scaling, causal=causal, sliding_window=sliding_window, key_padding=key_padding,
              softcap=softcap, key_pos0=key_pos0, stats=stats, edits=edits, sinks=sinks)
    want = expected_keys(stats)
    if score_hook is not None or pattern_hook is not None:
        out, st, _ = reference.attention(q, k, v, score_hook=score_hook, pattern_hook=pattern_hook, **kw)
        return out, st
    if not fa4_tried:
        r = _fa4_try(q, k, v, key_padding, scaling, sliding_window, softcap, causal, key_pos0, stats, edits,
                     sinks, "headscope's own kernels")
        if r is not None:
            return r
    grad = _needs_grad(q, k, v, edits)        # Triton and the fused C row pass have no backward
    if q.is_cuda and os.environ.get("HEADSCOPE_NO_TRITON") != "1":
        ta = _triton_module()
        if ta is not None:
            reason = ("the Triton kernels have no backward pass (an input or edit tensor requires grad; "
                      "use torch.no_grad() for inference)") if grad else ta.supports(stats, edits,
                                                                                    sinks=sinks is not None)
            if reason is None:
                try:
                    out, st = ta.attention(q, k, v, window_switch=has_sliding_layers(module), **kw)
                    missing = want - set(st)
                    if not missing:
                        return out, st
                    reason = f"the Triton kernels returned no {sorted(missing)}"
                except ta.Unsupported as e:
                    reason = f"the Triton kernels cannot do this call ({e})"
            decline_once(reason)
    native = None
    need_rows = stats is not None or sinks is not None or softcap is not None or \
        (edits is not None and bool(edits.redistributions))
    if need_rows and q.device.type == "cpu" and cpu_native.available():
        reason = cpu_native.supports(stats, edits, sinks=sinks is not None, grad=grad)
        if reason is not None:
            decline_once(reason, "the chunked path's PyTorch row pass")
            native = False
    out, st = chunked.attention(q, k, v, native=native, **kw)
    missing = want - set(st)
    if missing:  # the chunked path is the complete one: a gap here is a bug, not a fallback
        raise RuntimeError(f"headscope: the chunked attention path returned no {sorted(missing)} for {stats}")
    return out, st


def headscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, position_ids=None, is_causal=None, s_aux=None,
                        **kwargs):
    """q [B, H, Q, d], k/v [B, G, K, d], attention_mask None or [B, K] bool -> ([B, Q, H, d], None).
    ``s_aux`` [H]: learned sink logits (GPT-OSS), one more softmax term per head with no value."""
    if module.__dict__.get("_headscope_seen") is False:          # HookedModel's load-time check
        module.__dict__["_headscope_seen"] = True
    _check_kwargs(module, dropout, kwargs)
    B, H, Q, d = query.shape
    K = key.shape[2]
    if scaling is None:
        scaling = d ** -0.5
    causal = bool(is_causal) if is_causal is not None else getattr(module, "is_causal", True)
    sinks = None
    if s_aux is not None:
        sinks = torch.as_tensor(s_aux).to(device=query.device).reshape(-1)
        if sinks.numel() != H:
            raise ValueError(f"s_aux has {sinks.numel()} values for {H} query heads: expected one sink logit per head")
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
        out = _fast(module, query, key, value, key_padding, scaling, sliding_window, softcap, causal, sinks)
        return out.transpose(1, 2).contiguous(), None

    hooks = plan.hooks
    score_hook = pattern_hook = call = None
    if hooks:
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
        out = _fast(module, query, key, value, key_padding, scaling, sliding_window, softcap, causal, sinks)
    else:
        out, stats = _instrumented(module, query, key, value, key_padding, scaling, sliding_window, softcap,
                                   causal, key_pos0, plan.stats, plan.edits, score_hook, pattern_hook, sinks)
        for rec in plan.recorders:
            rec.add(layer, stats)
    out = out.transpose(1, 2)                                   # [B, Q, H, d]
    if plan.out_edits:                                          # output-space edits, once, in PyTorch
        out = apply_output_edits(out, plan.out_edits)
    if hooks and "z" in hooks:
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
