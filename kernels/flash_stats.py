"""Triton forward attention with per-row statistics and head edits (FlashAttention-2 style).

One program per (query block, batch * head) walks the key blocks it can see with an online softmax
(running max ``m`` and sum ``l`` in base 2: scores are pre-multiplied by log2(e) so ``exp2`` does
the work; the LSE it returns is converted back to the natural log). The key range of a query block
is split into three loops: a masked front (the sliding window's edge), an unmasked middle (every key
visible to every query of the block, the bulk of the work) and a masked back (the causal diagonal,
or the last partial block); fully masked key blocks are never visited.

Everything beyond the plain forward sits behind ``tl.constexpr`` flags, so the plain build is the
plain FlashAttention loop. ``MODE`` says which pass this is:

* ``MODE == 0``  one pass, online rescaling. Statistics are accumulated per row, in fp32, in the
  frame of the running max (multiplied by ``alpha = exp2(m_old - m_new)`` whenever it moves):
  entropy as ``E = sum e (x - m)`` (so ``H = ln l - ln2 * E / l``, no cancellation against the
  LSE), distance as ``(t - s0) * sum e - sum e * j`` per key block (keys at ``s0 + j``), window
  distance and recent mass per key block (a block wholly beyond or within the window costs one row
  sum; only blocks that straddle it are done element-wise), the argmax from the running max of the
  scores (the first index of each block's max, searched in every block: on the H100 this beat
  searching only where a row's max moved and a fused max-with-index reduction), ``max_prob = 1 / l``.
  Sink and span masses are *not* in the main loop: once ``m`` and ``l`` are final, a short second
  loop recomputes the scores of only the key blocks inside each span (the sink is span
  ``[-inf, sink_k)``) and sums the exact probabilities. That costs a QK^T over the span's keys
  only, instead of per-element selects on every key block.
* ``MODE == 1``  first pass of a redistribution (ACT / VAR): online softmax without the PV product,
  accumulating the masses of the source keys, of target-minus-source and of source-and-target;
  its epilogue applies the row rule of ``spec.Redistribution`` and writes per row the two
  coefficients (``c_src`` for source keys, ``c_rest`` for target-minus-source keys; other keys keep
  1) and the entropy constant ``Kc = sum_class c M_class ln c``.
* ``MODE == 2``  second pass of a redistribution: the LSE is known, so the probabilities are exact
  (``p' = c_class * exp2(x - lse)``) and the output and every statistic are plain sums of the
  *edited* probabilities with no rescaling (entropy ``= -(Kc + ln2 * sum p' (x - lse))``).

Edits: ``q_scale`` is folded into the score scale; the DuoAttention gate keeps a second online
softmax (its own max, sum and output accumulator) over the streaming-visible keys, mixed in the
epilogue in fp32 before the cast. Output-space edits (replacement, LoFiT) are not done here: the
probe applies them to the output.
Redistributions: at most one per head (per-head span tables; heads without one get coefficient 1).

Addressing: the (batch, head) base of every tensor and each loop's start pointer are int64; offsets
inside a tile are int32. fp32 inputs use ``input_precision="ieee"`` dots (no TF32).
No nested jit calls in the hot loops: the interpreter re-patches triton.language on each call.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_BIG = tl.constexpr(-1.0e30)   # "no max yet"; finite so that m_old - m_new never is inf - inf
IDX_BIG = tl.constexpr(2147483647)
# The sliding window. HAS_WINDOW (compile time) puts its test in the kernels; ``window`` (run time) is
# its width. A model with sliding layers (Gemma-2/3, GPT-OSS, Mistral: ``probe.attention.
# has_sliding_layers``) runs every layer with the test compiled in, its full layers with NO_WINDOW, a
# window wider than any sequence: then its sliding and full layers share each compiled kernel (on
# Gemma-3-270M's quick report, 11 kernels to compile on a fresh GPU instead of 21). Other models keep
# kernels without the test: with it, row statistics at 16k took 3.5% more time on the H200.
NO_WINDOW = 1 << 30


def window_arg(sliding_window) -> int:
    """The kernels' ``window`` argument: the sliding window, or NO_WINDOW for none."""
    return NO_WINDOW if sliding_window is None else int(sliding_window)

# row-statistic slots of the ``Rows`` buffer [slot, B*H*Q]
SLOT_ENTROPY = tl.constexpr(0)
SLOT_DISTANCE = tl.constexpr(1)
SLOT_WDIST = tl.constexpr(2)
SLOT_RECENT = tl.constexpr(3)
SLOT_MAXP = tl.constexpr(4)
SLOT_SPAN0 = tl.constexpr(5)   # then one slot per span (the sink first)


@triton.jit
def _cast_p(p, dtype, UPCAST: tl.constexpr):
    """p rounded to the value dtype for the PV product (kept in fp32 under DOT_UPCAST)."""
    if UPCAST:
        return p.to(dtype).to(tl.float32)
    else:
        return p.to(dtype)


@triton.jit
def _in_spans(pos, SP, N: tl.constexpr):
    """pos [n] int64 positions -> bool [n], in any of the N half-open spans at SP (int64 pairs)."""
    m = pos != pos
    for j in tl.static_range(N):
        a = tl.load(SP + 2 * j)
        e = tl.load(SP + 2 * j + 1)
        m = m | ((pos >= a) & (pos < e))
    return m


@triton.jit
def key_classes(pos, h, RdHasTgt, RdSrc, RdTgt, NSRC: tl.constexpr, NTGT: tl.constexpr):
    """Redistribution key classes of one head: (source, target-minus-source, source-and-target)."""
    in_src = _in_spans(pos, RdSrc + h * (2 * NSRC), NSRC)
    if NTGT > 0:
        in_tgt = _in_spans(pos, RdTgt + h * (2 * NTGT), NTGT) | (tl.load(RdHasTgt + h) == 0)
    else:
        in_tgt = pos == pos
    in_rest = in_tgt & (in_src == 0)
    in_sit = in_tgt & in_src
    return in_src, in_rest, in_sit


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Rows, Arg, Coef,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, G, NQ, NK, n_rows,
    scaling, softcap, window,
    QScale, KPos0, Pad, spb,
    Spans, wdist_w, recent_r,
    RdFactor, RdMaxR, RdMinT, RdHasTgt, RdSrc, RdTgt,
    Gate, gate_sink, gate_recent,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_QSCALE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    WRITE_LSE: tl.constexpr, NSPAN: tl.constexpr, NSPAN_P: tl.constexpr,
    ENTROPY: tl.constexpr, DISTANCE: tl.constexpr, WDIST: tl.constexpr, RECENT: tl.constexpr,
    ARGMAX: tl.constexpr, NSRC: tl.constexpr, NTGT: tl.constexpr,
    GATE: tl.constexpr,
):
    # heaviest (last) query blocks first: causal load balance
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    start_m = pid_m * BLOCK_M
    OFF = NK - NQ                                    # cache index of query 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t = offs_m + OFF                                 # cache index of each query
    t_lo = start_m + OFF
    t_hi = tl.minimum(start_m + BLOCK_M, NQ) + OFF   # exclusive
    b64 = b.to(tl.int64)
    q_base = Q + b64 * sqb + h.to(tl.int64) * sqh + start_m.to(tl.int64) * sqm
    k_base = K + b64 * skb + g.to(tl.int64) * skh
    v_base = V + b64 * svb + g.to(tl.int64) * svh
    row_mask = offs_m < NQ
    rows = bh.to(tl.int64) * NQ + offs_m             # index into [B*H*Q] row buffers

    q_ptrs = q_base + tl.arange(0, BLOCK_M)[:, None] * sqm + offs_d[None, :]
    if BLOCK_D == HEAD_D:
        q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_mask[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
    if DOT_UPCAST:   # interpreter: its tl.dot multiplies bf16 bit patterns as ints (Triton 3.9)
        q = q.to(tl.float32)

    sm_scale = scaling
    if HAS_QSCALE:
        sm_scale = scaling * tl.load(QScale + h)
    pos0 = tl.load(KPos0 + b)
    pad_base = Pad + b64 * spb

    # ---- key ranges: [lo, mid_lo) masked | [mid_lo, mid_hi) unmasked | [mid_hi, hi) masked ----
    zero = t_lo * 0                                  # scalars as tensors (ints equal to 1 are constexpr)
    lo = zero
    hi = zero + NK
    mid_lo = zero
    if HAS_WINDOW:
        lo = (tl.maximum(t_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
        mid_lo = ((tl.maximum(t_hi - window, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = t_hi
        mid_hi = ((t_lo + 1) // BLOCK_N) * BLOCK_N
    else:
        mid_hi = zero + (NK // BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(mid_hi, hi), mid_lo)

    # ---- state ----
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MODE == 2:
        lse_in = tl.load(Lse + rows, mask=row_mask, other=0.0)
        m_i = tl.where(lse_in == float("-inf"), 0.0, lse_in * LOG2E)
        if NSRC > 0:
            c_src = tl.load(Coef + rows, mask=row_mask, other=1.0)
            c_rest = tl.load(Coef + n_rows + rows, mask=row_mask, other=1.0)
    else:
        m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ent = tl.zeros([BLOCK_M], dtype=tl.float32)
    dist = tl.zeros([BLOCK_M], dtype=tl.float32)
    wdist = tl.zeros([BLOCK_M], dtype=tl.float32)
    recent = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax = tl.zeros([BLOCK_M], dtype=tl.int32)
    pmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_src = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_rest = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_sit = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_s = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    jf = tl.arange(0, BLOCK_N).to(tl.float32)

    for phase in tl.static_range(3):
        if phase == 0:
            n_lo = lo
            n_hi = mid_lo
        elif phase == 1:
            n_lo = mid_lo
            n_hi = mid_hi
        else:
            n_lo = mid_hi
            n_hi = hi
        kt_ptrs = k_base + n_lo.to(tl.int64) * skn + (tl.arange(0, BLOCK_N)[None, :] * skn + offs_d[:, None])
        v_ptrs = v_base + n_lo.to(tl.int64) * svn + (tl.arange(0, BLOCK_N)[:, None] * svn + offs_d[None, :])
        for start_n in range(n_lo, n_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if phase != 1:
                kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < NK) & (offs_d[:, None] < HEAD_D), other=0.0)
            elif BLOCK_D == HEAD_D:
                kt = tl.load(kt_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_D, other=0.0)
            if DOT_UPCAST:
                kt = kt.to(tl.float32)
            qk = tl.dot(q, kt, input_precision=DOT_PREC)
            if HAS_SOFTCAP:    # softcap * tanh(s / softcap), tanh written with exp (saturates at +-1)
                x2 = (1.0 - 2.0 / (tl.exp(2.0 * qk * (sm_scale / softcap)) + 1.0)) * (softcap * LOG2E)
            else:
                x2 = qk * (sm_scale * LOG2E)
            if phase != 1:
                vis = offs_n[None, :] < NK
                if CAUSAL:
                    vis = vis & (offs_n[None, :] <= t[:, None])
                if HAS_WINDOW:
                    vis = vis & ((t[:, None] - offs_n[None, :]) < window)
                if HAS_PAD:
                    kp = tl.load(pad_base + offs_n, mask=offs_n < NK, other=0)
                    vis = vis & (kp != 0)[None, :]
                x2 = tl.where(vis, x2, float("-inf"))
            elif HAS_PAD:
                kp = tl.load(pad_base + offs_n)
                x2 = tl.where((kp != 0)[None, :], x2, float("-inf"))

            if MODE == 2:
                qk2 = x2 - m_i[:, None]
                p = tl.exp2(qk2)
                if NSRC > 0:
                    in_src, in_rest, in_sit = key_classes(pos0 + offs_n, h, RdHasTgt, RdSrc, RdTgt, NSRC, NTGT)
                    coef = tl.where(in_src[None, :], c_src[:, None],
                                    tl.where(in_rest[None, :], c_rest[:, None], 1.0))
                    p = p * coef
                alpha = 1.0
                m_new = m_i
            else:
                m_blk = tl.max(x2, 1)
                m_new = tl.maximum(m_i, m_blk)
                alpha = tl.exp2(m_i - m_new)
                qk2 = x2 - m_new[:, None]
                if ENTROPY:
                    if phase != 1 or HAS_PAD:
                        qk2 = tl.maximum(qk2, NEG_BIG)       # masked: 0 * -inf would be NaN
                p = tl.exp2(qk2)
            rs = tl.sum(p, 1)

            if MODE == 1:
                in_src, in_rest, in_sit = key_classes(pos0 + offs_n, h, RdHasTgt, RdSrc, RdTgt, NSRC, NTGT)
                l_src = l_src * alpha + tl.sum(tl.where(in_src[None, :], p, 0.0), 1)
                l_rest = l_rest * alpha + tl.sum(tl.where(in_rest[None, :], p, 0.0), 1)
                l_sit = l_sit * alpha + tl.sum(tl.where(in_sit[None, :], p, 0.0), 1)
            else:
                # ---- statistics (fp32, before p is cast for the PV product) ----
                if ENTROPY:
                    if MODE == 0:
                        ent = alpha * (ent + l_i * (m_i - m_new)) + tl.sum(p * qk2, 1)
                    else:
                        ent = ent + tl.sum(tl.where(p > 0, p * qk2, 0.0), 1)
                if DISTANCE or WDIST or RECENT:
                    dmin = t_lo - (start_n + BLOCK_N - 1)      # smallest t - s in this tile
                    dmax = t_hi - 1 - start_n                  # largest
                if DISTANCE or WDIST:
                    if CAUSAL:
                        dblk = (t - start_n).to(tl.float32) * rs - tl.sum(p * jf[None, :], 1)
                    else:
                        dblk = tl.sum(p * tl.maximum(t[:, None] - offs_n[None, :], 0).to(tl.float32), 1)
                if DISTANCE:
                    dist = dist * alpha + dblk
                if WDIST:
                    if dmin >= wdist_w:
                        wblk = rs * wdist_w
                    elif dmax < wdist_w:
                        wblk = dblk
                    else:
                        wt = tl.minimum(tl.maximum(t[:, None] - offs_n[None, :], 0), wdist_w)
                        wblk = tl.sum(p * wt.to(tl.float32), 1)
                    wdist = wdist * alpha + wblk
                if RECENT:
                    if dmin >= recent_r:
                        rblk = rs * 0.0
                    elif dmax < recent_r:
                        rblk = rs
                    else:
                        rblk = tl.sum(tl.where((t[:, None] - offs_n[None, :]) < recent_r, p, 0.0), 1)
                    recent = recent * alpha + rblk
                if ARGMAX:          # first index of the block max, in every block
                    if MODE == 0:
                        idx = tl.min(tl.where(x2 == m_blk[:, None], offs_n[None, :], IDX_BIG), 1)
                        amax = tl.where(m_blk > m_i, idx, amax)
                    else:
                        pb = tl.max(p, 1)
                        idx = tl.min(tl.where(p == pb[:, None], offs_n[None, :], IDX_BIG), 1)
                        amax = tl.where(pb > pmax, idx, amax)
                        pmax = tl.maximum(pmax, pb)

                # ---- output ----
                if phase != 1:
                    v = tl.load(v_ptrs, mask=(offs_n[:, None] < NK) & (offs_d[None, :] < HEAD_D), other=0.0)
                elif BLOCK_D == HEAD_D:
                    v = tl.load(v_ptrs)
                else:
                    v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
                if DOT_UPCAST:
                    v = v.to(tl.float32)
                if MODE == 0:
                    acc = acc * alpha[:, None]
                acc = tl.dot(_cast_p(p, Out.dtype.element_ty, DOT_UPCAST), v, acc, input_precision=DOT_PREC)
                if GATE:
                    stream = (((pos0 + offs_n) < gate_sink)[None, :]
                              | ((t[:, None] - offs_n[None, :]) < gate_recent))
                    xs = tl.where(stream, x2, float("-inf"))
                    ms_new = tl.maximum(m_s, tl.max(xs, 1))
                    ps = tl.exp2(xs - ms_new[:, None])
                    alpha_s = tl.exp2(m_s - ms_new)
                    l_s = l_s * alpha_s + tl.sum(ps, 1)
                    acc_s = tl.dot(_cast_p(ps, Out.dtype.element_ty, DOT_UPCAST), v, acc_s * alpha_s[:, None],
                                   input_precision=DOT_PREC)
                    m_s = ms_new
            if MODE != 2:
                l_i = l_i * alpha + rs
            m_i = m_new
            kt_ptrs += BLOCK_N * skn
            v_ptrs += BLOCK_N * svn

    # ---- epilogue ----
    l_pos = l_i > 0
    l_safe = tl.where(l_pos, l_i, 1.0)
    if MODE != 2:
        lse = tl.where(l_pos, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
        if WRITE_LSE:
            tl.store(Lse + rows, lse, mask=row_mask)

    if MODE == 1:
        # spec.Redistribution's row rule, from the unedited class masses
        f = tl.load(RdFactor + h)
        max_ratio = tl.load(RdMaxR + h)
        min_target = tl.load(RdMinT + h)
        m_src = l_src / l_safe
        m_rest = l_rest / l_safe
        m_tgt = m_rest + l_sit / l_safe
        freed = (1.0 - f) * m_src
        gain = tl.where(m_rest > 0, freed / tl.maximum(m_rest, 1e-30), 0.0)
        keep = (m_rest > 0) & ((l_sit / l_safe) / tl.maximum(m_tgt, 1e-30) <= max_ratio) & (m_tgt >= min_target)
        cs = tl.where(keep, f, 1.0)
        cr = tl.where(keep, 1.0 + gain, 1.0)
        # sum_class c M_class ln c, with xlogy's convention as in the reference: a class without mass
        # or with c = 0 adds 0; a negative coefficient (factor > 1 freeing more mass than the target
        # holds) makes probabilities negative and the entropy NaN (ln of a negative number)
        kc = (tl.where((cs != 0) & (m_src > 0), m_src * cs * tl.log(cs), 0.0)
              + tl.where((cr != 0) & (m_rest > 0), m_rest * cr * tl.log(cr), 0.0))
        tl.store(Coef + rows, cs, mask=row_mask)
        tl.store(Coef + n_rows + rows, cr, mask=row_mask)
        tl.store(Coef + 2 * n_rows + rows, kc, mask=row_mask)
    else:
        # ---- sink / span masses: exact probabilities over the span's key blocks only ----
        if NSPAN > 0:
            if MODE == 0:
                inv_l = tl.where(l_pos, 1.0 / l_safe, 0.0)
            else:
                inv_l = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            cols = tl.arange(0, NSPAN_P)
            span_acc = tl.zeros([BLOCK_M, NSPAN_P], dtype=tl.float32)
            for j in tl.static_range(NSPAN):
                c0 = tl.maximum(tl.load(Spans + 2 * j) - pos0, lo).to(tl.int32)
                c1 = tl.minimum(tl.load(Spans + 2 * j + 1) - pos0, hi).to(tl.int32)
                sacc = tl.zeros([BLOCK_M], dtype=tl.float32)
                kt_ptrs = k_base + c0.to(tl.int64) * skn + (tl.arange(0, BLOCK_N)[None, :] * skn + offs_d[:, None])
                for start_n in range(c0, c1, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < c1) & (offs_d[:, None] < HEAD_D), other=0.0)
                    if DOT_UPCAST:
                        kt = kt.to(tl.float32)
                    qk = tl.dot(q, kt, input_precision=DOT_PREC)
                    if HAS_SOFTCAP:
                        x2 = (1.0 - 2.0 / (tl.exp(2.0 * qk * (sm_scale / softcap)) + 1.0)) * (softcap * LOG2E)
                    else:
                        x2 = qk * (sm_scale * LOG2E)
                    vis = offs_n[None, :] < c1
                    if CAUSAL:
                        vis = vis & (offs_n[None, :] <= t[:, None])
                    if HAS_WINDOW:
                        vis = vis & ((t[:, None] - offs_n[None, :]) < window)
                    if HAS_PAD:
                        kp = tl.load(pad_base + offs_n, mask=offs_n < c1, other=0)
                        vis = vis & (kp != 0)[None, :]
                    p = tl.exp2(tl.where(vis, x2, float("-inf")) - m_i[:, None]) * inv_l[:, None]
                    if MODE == 2:
                        if NSRC > 0:
                            in_src, in_rest, in_sit = key_classes(pos0 + offs_n, h, RdHasTgt, RdSrc, RdTgt,
                                                                   NSRC, NTGT)
                            p = p * tl.where(in_src[None, :], c_src[:, None],
                                             tl.where(in_rest[None, :], c_rest[:, None], 1.0))
                    sacc += tl.sum(p, 1)
                    kt_ptrs += BLOCK_N * skn
                span_acc = tl.where(cols[None, :] == j, sacc[:, None], span_acc)
            for j in tl.static_range(NSPAN):
                val = tl.sum(tl.where(cols[None, :] == j, span_acc, 0.0), 1)
                tl.store(Rows + (SLOT_SPAN0 + j) * n_rows + rows, val, mask=row_mask)

        if MODE == 0:
            out = acc / l_safe[:, None]
        else:
            out = acc
        if ENTROPY:
            if MODE == 0:
                e_out = tl.where(l_pos, tl.log(l_safe) - LN2 * ent / l_safe, 0.0)
            else:
                kc = tl.load(Coef + 2 * n_rows + rows, mask=row_mask, other=0.0)
                e_out = -(kc + LN2 * ent)
            tl.store(Rows + SLOT_ENTROPY * n_rows + rows, e_out, mask=row_mask)
        if DISTANCE:
            if MODE == 0:
                dist = dist / l_safe
            tl.store(Rows + SLOT_DISTANCE * n_rows + rows, dist, mask=row_mask)
        if WDIST:
            if MODE == 0:
                wdist = wdist / l_safe
            tl.store(Rows + SLOT_WDIST * n_rows + rows, wdist, mask=row_mask)
        if RECENT:
            if MODE == 0:
                recent = recent / l_safe
            tl.store(Rows + SLOT_RECENT * n_rows + rows, recent, mask=row_mask)
        if ARGMAX:
            if MODE == 0:
                pmax = tl.where(l_pos, 1.0 / l_safe, 0.0)
            tl.store(Rows + SLOT_MAXP * n_rows + rows, pmax, mask=row_mask)
            tl.store(Arg + rows, amax.to(tl.int64) + pos0, mask=row_mask)

        # ---- streaming gate (the last probability-space edit), fp32 ----
        if GATE:
            a = tl.load(Gate + h)
            out_s = acc_s / tl.where(l_s > 0, l_s, 1.0)[:, None]
            out = (1.0 - a) * out_s + a * out
        dmask = offs_d < HEAD_D
        o_ptrs = (Out + b64 * sob + h.to(tl.int64) * soh + start_m.to(tl.int64) * som
                  + (tl.arange(0, BLOCK_M)[:, None] * som + offs_d[None, :]))
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & dmask[None, :])
