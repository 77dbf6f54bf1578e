"""Public entry of the Triton kernels: a drop-in fast path for ``kernels.chunked.attention``.

    from headscope.kernels import triton_attention as ta
    if ta.available(q):
        try:
            out, stats = ta.attention(q, k, v, scaling=d ** -0.5, stats=req, edits=edits)
        except ta.Unsupported as e:        # say so once, then use chunked.attention
            ...

Same arguments, same result (``out`` [B, H, Q, d] in q's dtype; a dict with the keys, shapes and
dtypes of ``chunked.attention``: argmax int64, received_count float32, everything else fp32; ``lse``
is the *natural-log* log-sum-exp of the (q_scale-edited) scores, -inf for rows that see no key).

Kernels: ``flash_stats._attn_fwd`` (forward, row statistics, edits) and
``received.received_kernel`` (column sums from the saved LSE); calls with few queries against many
keys (decoding) go to ``triton_decode`` (key splits merged through their partial LSEs) when
``triton_decode.eligible`` accepts them. A head with a redistribution
(ACT / VAR) costs two forward passes: the first finds each row's class masses and coefficients,
the second computes the edited output and statistics from exact probabilities.

Not done here (``Unsupported`` is raised, so the caller can fall back): edit tensors or q/k/v that
require grad while grad is enabled (no backward pass: training goes through the PyTorch path), more
than one redistribution on a head, head_dim > 256, Q > K, dtypes other than fp16/bf16/fp32,
tensors off CUDA (unless ``TRITON_INTERPRET=1``). Output-space edits (ablation by replacement,
LoFiT's affine, steering) are not kernel arguments: the probe applies them to the output.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys

import torch

from .device_cache import cached, dummies, off_current_device, sm_count
from .launch import fast
from .spec import LayerEdits, StatRequest, decline_reason


class Unsupported(Exception):
    """The Triton kernels cannot do this call; ``chunked.attention`` can (the message says why)."""


# What the Triton kernels can do, declared (``supports`` checks a request against it; the probe
# asks before calling and falls back to the chunked path with one message when it declines).
SUPPORTED_STATS = frozenset({"sink_k", "spans", "entropy", "distance", "window_distance", "recent", "argmax",
                             "received", "received_window"})
SUPPORTED_EDITS = frozenset({"q_scale", "redistributions", "gate", "gate_sink", "gate_recent"})


def supports(stats: StatRequest | None, edits: LayerEdits | None, *, sinks: bool = False) -> str | None:
    """None when the Triton kernels can run this request, else the reason they decline (a
    sentence): a statistic or edit field outside ``SUPPORTED_STATS`` / ``SUPPORTED_EDITS``, or
    learned attention sinks (``s_aux``, not in the kernels). Per-call limits on shapes, dtypes and
    devices are checked by ``attention`` itself (``Unsupported``)."""
    if sinks:
        return "the Triton kernels do not implement learned attention sinks (s_aux)"
    return decline_reason("the Triton kernels", SUPPORTED_STATS, SUPPORTED_EDITS, stats, edits)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(x: torch.Tensor | torch.device | str | None = None) -> bool:
    """Triton is importable and ``x`` (a tensor or device; default: any CUDA device) is on CUDA,
    or Triton's interpreter is on (TRITON_INTERPRET=1), where CPU tensors run too."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreting():
        return True
    if x is None:
        return torch.cuda.is_available()
    dev = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return dev.type == "cuda"


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim. "plain": no statistics, no edits;
# "stats": row statistics; "edit": redistribution passes / gate (more accumulators live at once).
# Chosen on an H100 with benchmarks/attention_bench.py --sweep (see BENCHMARKS.md); d256 plain and the d128
# received tiles re-chosen on the H200 (2026-12-01, notes/kernels-benchmarks.md).
FWD_CONFIGS = {
    "plain": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 128, 8, 3),
              256: (128, 64, 8, 2)},
    "stats": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3),
              256: (64, 32, 4, 2)},
    "edit": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2),
             256: (32, 32, 4, 2)},
}
# received kernel: (BLOCK_M = query block of the inner loop, BLOCK_N = key block, warps, stages)
RECV_CONFIGS = {16: (64, 128, 8, 3), 32: (64, 128, 8, 3), 64: (64, 128, 8, 3), 128: (128, 128, 8, 3),
                256: (32, 64, 8, 2)}
# fp32 inputs: "ieee" dots run on the FMA units; small tiles keep them out of local memory
FP32_CONFIG = (32, 32, 4, 2)
# received kernel: split a GQA group's heads over programs while there are fewer than this many
# programs per SM (short sequences)
RECV_MIN_PROGRAMS_PER_SM = 4
INTERPRET_BLOCK = 16   # interpreter: small tiles keep the numpy emulation quick



def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _block_config(block, table_fwd, table_recv, bd, fp32=False):
    """-> ((BM, BN, warps, stages) forward, (BM, BN, warps, stages) received)."""
    if block is None:
        if interpreting():
            c = (INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1)
            return c, c
        if fp32:
            return FP32_CONFIG, FP32_CONFIG
        return table_fwd[bd], table_recv[bd]
    if isinstance(block, int):
        block = (block, block)
    block = tuple(int(x) for x in block)
    if len(block) not in (2, 4) or any(x < 16 or x & (x - 1) for x in block[:2]):
        raise Unsupported(f"block={block!r}: give an int or (BLOCK_M, BLOCK_N[, num_warps, num_stages]) "
                          "with powers of two >= 16")
    warps, stages = block[2:] if len(block) == 4 else (4, 2)
    c = (block[0], block[1], warps, stages)
    return c, c


def _edit_tensors(edits: LayerEdits | None):
    if edits is None:
        return []
    return edits.tensors()


@functools.cache                # asked once: an eager decode step is host-bound
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check(q, k, v, key_padding, key_pos0, edits, block):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise Unsupported("q, k, v must be [batch, heads, len, head_dim]")
    B, H, Q, D = q.shape
    G, K = k.shape[1], k.shape[2]
    if k.shape != (B, G, K, D) or v.shape != k.shape:
        raise Unsupported(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if G == 0 or H % G:
        raise Unsupported(f"{H} query heads are not a multiple of {G} KV heads")
    if Q == 0 or Q > K:
        raise Unsupported(f"need 0 < Q <= K (queries are the last Q keys), got Q={Q}, K={K}")
    if D > 256:
        raise Unsupported(f"head_dim {D} > 256")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise Unsupported(f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: need one of fp16/bf16/fp32 for all")
    if not (q.is_cuda and k.is_cuda and v.is_cuda) and not interpreting():
        raise Unsupported("tensors are not on CUDA (set TRITON_INTERPRET=1 to run Triton on the CPU)")
    if not _triton_installed():
        raise Unsupported("triton is not installed")
    if k.device != q.device or v.device != q.device:
        raise Unsupported("q, k, v are on different devices")
    if torch.is_grad_enabled():
        needs = [x for x in [q, k, v] + _edit_tensors(edits) if x is not None and x.requires_grad]
        if needs:
            raise Unsupported("an input requires grad and the Triton kernels have no backward pass "
                              "(training goes through the PyTorch path; use torch.no_grad() for inference)")
    if key_padding is not None and tuple(key_padding.shape) != (B, K):
        raise Unsupported(f"key_padding must be [batch, k_len] = {(B, K)}, got {tuple(key_padding.shape)}")
    if key_pos0 is not None and tuple(key_pos0.shape) != (B,):
        raise Unsupported(f"key_pos0 must be [batch] = {(B,)}, got {tuple(key_pos0.shape)}")
    if edits is not None:
        seen = {}
        for i, r in enumerate(edits.redistributions):
            for h in r.heads:
                if not -H <= h < H:
                    raise Unsupported(f"redistribution head {h} out of range for {H} heads")
                hh = h % H
                if hh in seen:
                    raise Unsupported(f"head {hh} has several redistributions (the kernel does one per head)")
                seen[hh] = i


def _redistribution_tables(reds, H, dev):
    """Per-head redistribution tables for the kernels (heads without one get factor 1, no spans)."""
    f32, i64 = torch.float32, torch.int64
    nsrc = max(1, max(len(r.source) for r in reds))
    ntgt = 0
    if any(r.target is not None for r in reds):
        ntgt = max(1, max(len(r.target) for r in reds if r.target is not None))
    fac, mr, mt, ht = [1.0] * H, [math.inf] * H, [-math.inf] * H, [0] * H
    src = [[(0, 0)] * nsrc for _ in range(H)]
    tgt = [[(0, 0)] * max(ntgt, 1) for _ in range(H)]
    for r in reds:
        for h in r.heads:
            h %= H
            fac[h] = float(r.factor)
            if r.max_ratio is not None:
                mr[h], mt[h] = float(r.max_ratio), float(r.min_target)
            for j, (a, b) in enumerate(r.source):
                src[h][j] = (int(a), int(b))
            if r.target is not None:
                ht[h] = 1
                for j, (a, b) in enumerate(r.target):
                    tgt[h][j] = (int(a), int(b))
    return (nsrc, ntgt, torch.tensor(fac, dtype=f32, device=dev), torch.tensor(mr, dtype=f32, device=dev),
            torch.tensor(mt, dtype=f32, device=dev), torch.tensor(ht, dtype=torch.int32, device=dev),
            torch.tensor(src, dtype=i64, device=dev).reshape(-1), torch.tensor(tgt, dtype=i64, device=dev).reshape(-1))


def _restrict_query_rows(coef, reds, kpos0, B: int, H: int, Q: int, K: int) -> None:
    """``Redistribution.min_query``: rows of queries before it keep coefficient 1 (and entropy
    constant 0), i.e. stay unedited. coef [3, B*H*Q] from the first pass, rows (b, h, i) at
    (b*H + h)*Q + i; query i sits at position kpos0[b] + K - Q + i."""
    limited = [r for r in reds if r.min_query is not None]
    if not limited:
        return
    qpos = kpos0[:, None] + (K - Q) + torch.arange(Q, device=coef.device)          # [B, Q]
    c = coef.view(3, B, H, Q)
    for r in limited:
        heads = torch.tensor([h % H for h in r.heads], device=coef.device)
        before = (qpos < r.min_query)[:, None, :].expand(B, len(heads), Q)           # [B, h, Q]
        for j, fill in enumerate((1.0, 1.0, 0.0)):
            cj = c[j, :, heads]                                                       # [B, h, Q] (a copy)
            c[j, :, heads] = torch.where(before, torch.full_like(cj, fill), cj)


def _heads_per_program(n_programs: int, R: int, dev) -> int:
    """Largest divisor of the GQA ratio R that still gives RECV_MIN_PROGRAMS_PER_SM programs per SM."""
    if dev.type != "cuda":   # interpreter: exercise both the split and the multi-head loop
        return R // 2 if R % 2 == 0 else R
    target = RECV_MIN_PROGRAMS_PER_SM * sm_count(dev)
    for hpp in sorted((x for x in range(1, R + 1) if R % x == 0), reverse=True):
        if n_programs * (R // hpp) >= target:
            return hpp
    return 1


def _received_count(B, Q, K, *, causal, sliding_window, received_window, key_padding, device):
    """How many queries may see key s (and fall in the received window): closed form, [B, K] fp32."""
    base = cached(("count", device, B, Q, K, bool(causal), sliding_window, received_window),
                   lambda: _count_base(B, Q, K, causal, sliding_window, received_window, device))
    if key_padding is None:
        return base.clone()
    return base * key_padding.to(device=device, dtype=torch.float32)


def _count_base(B, Q, K, causal, sliding_window, received_window, device):
    s = torch.arange(K, device=device)
    lo = torch.full_like(s, K - Q)
    hi = torch.full_like(s, K - 1)
    if causal:
        lo = torch.maximum(lo, s)
    if sliding_window is not None:
        hi = torch.minimum(hi, s + sliding_window - 1)
    if received_window is not None:
        a, b = received_window
        lo = torch.maximum(lo, s + a)
        hi = torch.minimum(hi, s + b)
    return (hi - lo + 1).clamp_min(0).to(torch.float32).expand(B, K).contiguous()


def _received_sums(q, k, lse, coef, st, common, flags, rd_args, nsrc, ntgt, cfg, causal, sliding_window,
                   key_padding):
    """Column sums from the saved LSE (``received.received_kernel``): {received_sum [B, H, K],
    received_count [B, K]}."""
    import triton

    from .received import received_kernel
    B, H, Q = q.shape[0], q.shape[1], q.shape[2]
    G, K = k.shape[1], k.shape[2]
    RBM, RBN, rwarps, rstages = cfg
    recv = torch.empty(B, H, K, dtype=torch.float32, device=q.device)
    rw = st.received_window
    R = H // G
    hpp = _heads_per_program(triton.cdiv(K, RBN) * B * G, R, q.device)
    fast(received_kernel)[(triton.cdiv(K, RBN), B * G * (R // hpp))](
        q, k, lse, coef, recv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        recv.stride(0), recv.stride(1), **common, HEADS_PER_PROG=hpp,
        ra=int(rw[0]) if rw else 0, rb=int(rw[1]) if rw else 0, **rd_args,
        BLOCK_M=RBM, BLOCK_N=RBN, **flags, RWIN=rw is not None, NSRC=nsrc, NTGT=ntgt,
        num_warps=rwarps, num_stages=rstages,
    )
    count = _received_count(B, Q, K, causal=causal, sliding_window=sliding_window, received_window=rw,
                            key_padding=key_padding, device=q.device)
    return {"received_sum": recv, "received_count": count}


def _module(name: str):
    """The Triton module ``kernels.<name>`` (``triton_decode``, ``flash_stats``), imported on first
    use (they import triton); a dictionary lookup afterwards, as every layer of every step asks."""
    m = sys.modules.get(f"{__package__}.{name}")
    if m is None:
        m = importlib.import_module(f".{name}", __package__)
    return m


def attention(q, k, v, *, scaling: float, causal: bool = True, sliding_window: int | None = None,
              key_padding: torch.Tensor | None = None, softcap: float | None = None,
              key_pos0: torch.Tensor | None = None, stats: StatRequest | None = None,
              edits: LayerEdits | None = None, block=None, sinks: torch.Tensor | None = None,
              window_switch: bool = False):
    """q [B, H, Q, d], k, v [B, G, K, d] -> (out [B, H, Q, d], stats dict), as ``chunked.attention``.
    Requests that ``supports`` declines (e.g. ``sinks``) raise ``Unsupported``.

    ``window_switch``: compile the window's test in even when ``sliding_window`` is None (for the full
    layers of a model with sliding layers, which then share their compiled kernels:
    ``flash_stats.NO_WINDOW``). The result is the same either way.

    ``block``: None (tuned table; 16 in the interpreter), an int (BLOCK_M = BLOCK_N), or
    (BLOCK_M, BLOCK_N[, num_warps, num_stages]) for both kernels. Raises ``Unsupported``.

    An eager decode call whose signature an earlier call had (``triton_decode.fast_attention``: the
    same q shape, dtype, device, stream, request and mask, no padding, softcap, edits or tiles) skips
    the checks below, which that earlier call passed, and launches its kept kernel directly."""
    if block is None and key_padding is None and softcap is None and sinks is None and (edits is None or edits.empty):
        got = _module("triton_decode").fast_attention(q, k, v, scaling, causal, sliding_window, key_pos0, stats,
                                                      window_switch)
        if got is not None:
            return got
    if off_current_device(q):                   # kernels launch on the current device: switch to q's
        with torch.cuda.device(q.device):
            return attention(q, k, v, scaling=scaling, causal=causal, sliding_window=sliding_window,
                             key_padding=key_padding, softcap=softcap, key_pos0=key_pos0, stats=stats,
                             edits=edits, block=block, sinks=sinks, window_switch=window_switch)
    reason = supports(stats, edits, sinks=sinks is not None)
    if reason is not None:
        raise Unsupported(reason)
    _check(q, k, v, key_padding, key_pos0, edits, block)
    td = _module("triton_decode")
    if block is None and td.eligible(q, k, stats=stats, edits=edits) is None:   # few queries, many keys
        return td.attention(q, k, v, scaling=scaling, causal=causal, sliding_window=sliding_window,
                            key_padding=key_padding, softcap=softcap, key_pos0=key_pos0, stats=stats, edits=edits,
                            window_switch=window_switch)
    fs = _module("flash_stats")

    B, H, Q, D = q.shape
    G, K = k.shape[1], k.shape[2]
    dev = q.device
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    BD = max(16, _pow2(D))
    f32, i64 = torch.float32, torch.int64
    dummy_f, dummy_i, dummy_i32, dummy_u8 = dummies(dev)
    n_rows = B * H * Q

    st = stats
    ed = edits if edits is not None and not edits.empty else None
    redist = ed is not None and len(ed.redistributions) > 0
    received = st is not None and st.received

    # ---- per-call tables ----
    kpos0 = (key_pos0.to(device=dev, dtype=i64).contiguous() if key_pos0 is not None
             else cached(("pos0", dev, B), lambda: torch.zeros(B, dtype=i64, device=dev)))
    pad = None
    if key_padding is not None:
        pad = key_padding.to(device=dev)
        pad = (pad.view(torch.uint8) if pad.dtype == torch.bool else (pad != 0).view(torch.uint8)).contiguous()
    nspan, spans = td.span_table(st, dev)
    spans = spans if nspan else dummy_i

    def f32h(x, shape):
        return x.detach().to(device=dev, dtype=f32).reshape(shape).contiguous()

    qscale = f32h(ed.q_scale, (H,)) if ed is not None and ed.q_scale is not None else dummy_f
    gate = f32h(ed.gate, (H,)) if ed is not None and ed.gate is not None else dummy_f

    nsrc = ntgt = 0
    rd_factor = rd_maxr = rd_mint = dummy_f
    rd_hastgt = dummy_i32
    rd_src = rd_tgt = dummy_i
    if redist:
        (nsrc, ntgt, rd_factor, rd_maxr, rd_mint, rd_hastgt, rd_src, rd_tgt) = cached(
            ("redist", dev, H, ed.redistributions), lambda: _redistribution_tables(ed.redistributions, H, dev))

    # ---- buffers ----
    out = torch.empty(B, H, Q, D, dtype=q.dtype, device=dev)
    need_lse = st is not None or redist
    lse = torch.empty(B, H, Q, dtype=f32, device=dev) if need_lse else dummy_f
    any_row = st is not None and (nspan or st.entropy or st.distance or st.window_distance
                                   or st.recent or st.argmax)
    rows = torch.empty(fs.SLOT_SPAN0.value + nspan, B, H, Q, dtype=f32, device=dev) if any_row else dummy_f
    arg = torch.empty(B, H, Q, dtype=i64, device=dev) if st is not None and st.argmax else dummy_i
    coef = torch.empty(3, n_rows, dtype=f32, device=dev) if redist else dummy_f

    kind = "edit" if (redist or (ed is not None and ed.gate is not None)) else ("stats" if any_row else "plain")
    (BM, BN, warps, stages), (RBM, RBN, rwarps, rstages) = _block_config(block, FWD_CONFIGS[kind], RECV_CONFIGS, BD,
                                                                      q.dtype == torch.float32)

    has_window = sliding_window is not None or bool(window_switch)
    common = dict(
        H=H, G=G, NQ=Q, NK=K, n_rows=n_rows,
        scaling=float(scaling), softcap=float(softcap) if softcap is not None else 1.0,
        window=fs.window_arg(sliding_window),
        QScale=qscale, KPos0=kpos0, Pad=pad if pad is not None else dummy_u8, spb=K,
    )
    flags = dict(HEAD_D=D, BLOCK_D=BD, CAUSAL=bool(causal), HAS_WINDOW=has_window,
                 HAS_PAD=pad is not None, HAS_SOFTCAP=softcap is not None,
                 HAS_QSCALE=ed is not None and ed.q_scale is not None,
                 DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                 DOT_UPCAST=interpreting() and q.dtype == torch.bfloat16)
    rd_args = dict(RdHasTgt=rd_hastgt, RdSrc=rd_src, RdTgt=rd_tgt)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    grid = (-(-Q // BM), B * H)

    def fwd(mode, with_stats, write_lse):
        s = st if with_stats else None
        fast(fs._attn_fwd)[grid](
            q, k, v, out, lse, rows, arg, coef, *strides, **common,
            Spans=spans, wdist_w=int(s.window_distance or 0) if s else 0,
            recent_r=int(s.recent or 0) if s else 0,
            RdFactor=rd_factor, RdMaxR=rd_maxr, RdMinT=rd_mint, **rd_args,
            Gate=gate, gate_sink=int(ed.gate_sink) if ed is not None else 0,
            gate_recent=int(ed.gate_recent) if ed is not None else 0,
            BLOCK_M=BM, BLOCK_N=BN, MODE=mode, WRITE_LSE=write_lse, **flags,
            NSPAN=nspan if s else 0, NSPAN_P=max(2, _pow2(nspan)),
            ENTROPY=bool(s and s.entropy), DISTANCE=bool(s and s.distance),
            WDIST=bool(s and s.window_distance), RECENT=bool(s and s.recent),
            ARGMAX=bool(s and s.argmax), NSRC=nsrc, NTGT=ntgt,
            GATE=with_stats and ed is not None and ed.gate is not None,
            num_warps=warps, num_stages=stages,
        )

    if redist:
        fwd(1, False, True)     # class masses -> coefficients (and the LSE)
        _restrict_query_rows(coef, ed.redistributions, kpos0, B, H, Q, K)
        fwd(2, True, False)     # edited output and statistics
    else:
        fwd(0, True, need_lse)

    if st is None:
        return out, {}
    res = td.row_results(st, lse, rows, arg)
    if received:
        res.update(_received_sums(q, k, lse, coef, st, common, flags, rd_args, nsrc, ntgt,
                                  (RBM, RBN, rwarps, rstages), causal, sliding_window, key_padding))
    return out, res
