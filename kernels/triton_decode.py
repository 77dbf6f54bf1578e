"""Split-key decode attention with per-row statistics (flash-decoding, Dao et al. 2023,
"Flash-Decoding for long-context inference"; the partial-softmax merge of Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax", §3).

With few queries (Q small: one generated token, a retrieval query) and many keys, one program per
query block leaves most of the GPU idle. Here the visible key range is cut into ``S`` splits; one
program per (split, batch * KV head) holds every query row of the KV head's GQA group (``R * Q``
rows, R = H / G, padded to 16 for the tensor cores), so each key and value block is read once for
all the heads that share it. Each program runs an online softmax over its split and writes partial
results in the frame of its own running max ``m_j`` (base 2, scores pre-multiplied by log2 e):

  ``l_j = sum e``, ``acc_j = sum e v``, ``E_j = sum e (x - m_j)`` (entropy), ``sum e (t - s)``
  (distance), ``sum e min(t - s, W)``, ``sum_{t - s < r} e`` (recent), ``sum_{s in span} e`` (sink
  and spans), and the first index of the split's max score,

with ``e = exp2(x - m_j)``. The splits of each row are then merged (``_merge_rows``): ``M = max_j m_j``,
``w_j = exp2(m_j - M)``, ``L = sum w_j l_j``; output and masses are ``sum w_j (.)_j / L``; entropy is
``ln L - ln2 * sum_j w_j (E_j + l_j (m_j - M)) / L``; the argmax is the index of the first split whose
max equals M (splits are in key order, so the first index on ties); ``max_prob = 1 / L``;
``lse = ln2 * (M + log2 L)``. (Read a chunk of splits at a time, with a running ``M`` as an online
softmax over splits.) Who merges (``MERGE``): the last split program of each (batch, KV head) group
to finish, which it learns from an acquire-release counter per group (as CUTLASS's serial split-K
reduction orders its partial tiles with a semaphore), so a call is one launch; or a second kernel
with one program per row, which takes less GPU time. By default the first for small eager calls
(host-bound: the launch saved is worth more than the merge's wait), the second otherwise.

Supported: everything of ``StatRequest`` except column sums (``received``), and the ``q_scale``
edit; other edits and column sums go through ``flash_stats`` (``eligible`` says which).
"""
from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

from .device_cache import cached, dummies, sm_count
from . import launch
from .launch import fast, specialization_facts
from .spec import decline_reason

from .flash_stats import IDX_BIG, LN2, LOG2E, NEG_BIG, window_arg  # noqa: E402  (one definition of the constants)
from .flash_stats import SLOT_DISTANCE as P_DIST  # noqa: E402
from .flash_stats import SLOT_ENTROPY as P_ENT  # noqa: E402
from .flash_stats import SLOT_RECENT as P_RECENT  # noqa: E402
from .flash_stats import SLOT_SPAN0 as P_SPAN0  # noqa: E402
from .flash_stats import SLOT_WDIST as P_WDIST  # noqa: E402

# partial-statistic slots of the ``PStats`` buffer [slot, B*G, S, RQ] are the ``Rows`` slots of
# flash_stats (entropy, distance, window distance, recent, max_prob, spans...)


@triton.jit
def _partial_regions(Part, n_pad, HEAD_D: tl.constexpr, N_SLOT: tl.constexpr):
    """The regions of the partial buffer (``partials_layout``), each ``n_pad`` rows apart: m, l,
    acc [rows, HEAD_D], N_SLOT statistic slots, the int32 argmax index; and the region stride."""
    n_prow = n_pad.to(tl.int64)
    PIdx = (Part + (2 + HEAD_D + N_SLOT) * n_prow).to(tl.pointer_type(tl.int32), bitcast=True)
    return Part, Part + n_prow, Part + 2 * n_prow, Part + (2 + HEAD_D) * n_prow, PIdx, n_prow


@triton.jit
def decode_partial_kernel(
    Q, K, V, Part,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    H, G, NQ, NK, key_lo, split_len, n_splits, n_pad,
    scaling, softcap, window,
    QScale, KPos0, Pad, Spans, wdist_w, recent_r,
    Out, Res, Arg, Count, sob, soh, som, n_rows,
    RQ: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_QSCALE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    NSPAN: tl.constexpr, N_SLOT: tl.constexpr, ENTROPY: tl.constexpr, DISTANCE: tl.constexpr,
    WDIST: tl.constexpr, RECENT: tl.constexpr, ARGMAX: tl.constexpr,
    FUSED: tl.constexpr, WRITE_LSE: tl.constexpr, BLOCK_R: tl.constexpr, MERGE_S: tl.constexpr,
):
    """One key split of one (batch, KV head): partial softmax state and statistics of its RQ rows,
    written to the ``Part`` buffer (``partials_layout``). With ``FUSED`` the last split of the group
    to finish (counted in ``Count[bg]``) merges the group's rows itself (``_merge_rows``) and sets the
    count back to 0; otherwise ``decode_merge_kernel`` does, as a second launch."""
    sp = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    R = H // G
    offs_r = tl.arange(0, BLOCK_M)                   # row r = (head g*R + r // NQ, query r % NQ)
    row_ok = offs_r < RQ
    h = g * R + offs_r // NQ                         # [BLOCK_M] query head of each row
    qi = offs_r % NQ
    t = NK - NQ + qi                                 # cache index of each row's query
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * sqb + h.to(tl.int64)[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
    if HAS_QSCALE:
        sm_scale = scaling * tl.load(QScale + h, mask=row_ok, other=1.0)   # [BLOCK_M]
    else:
        sm_scale = scaling + tl.zeros([BLOCK_M], dtype=tl.float32)
    pos0 = tl.load(KPos0 + b)
    k_base = K + b64 * skb + g.to(tl.int64) * skh
    v_base = V + b64 * svb + g.to(tl.int64) * svh

    n_lo = key_lo + sp * split_len
    n_hi = tl.minimum(n_lo + split_len, NK)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ent = tl.zeros([BLOCK_M], dtype=tl.float32)
    dist = tl.zeros([BLOCK_M], dtype=tl.float32)
    wdist = tl.zeros([BLOCK_M], dtype=tl.float32)
    recent = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax = tl.zeros([BLOCK_M], dtype=tl.int32)
    cols = tl.arange(0, 8)
    span_acc = tl.zeros([BLOCK_M, 8], dtype=tl.float32)    # up to 8 spans (sink included)
    jf = tl.arange(0, BLOCK_N).to(tl.float32)

    kt_ptrs = k_base + n_lo.to(tl.int64) * skn + (tl.arange(0, BLOCK_N)[None, :] * skn + offs_d[:, None])
    v_ptrs = v_base + n_lo.to(tl.int64) * svn + (tl.arange(0, BLOCK_N)[:, None] * svn + offs_d[None, :])
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n < n_hi
        kt = tl.load(kt_ptrs, mask=in_k[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
        v = tl.load(v_ptrs, mask=in_k[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        if DOT_UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_SOFTCAP:
            x2 = (1.0 - 2.0 / (tl.exp(2.0 * qk * (sm_scale[:, None] / softcap)) + 1.0)) * (softcap * LOG2E)
        else:
            x2 = qk * (sm_scale * LOG2E)[:, None]
        diff = t[:, None] - offs_n[None, :]          # t - s
        vis = in_k[None, :] & row_ok[:, None]
        if CAUSAL:
            vis = vis & (diff >= 0)
        if HAS_WINDOW:
            vis = vis & (diff < window)
        if HAS_PAD:
            kp = tl.load(Pad + b64 * NK + offs_n, mask=in_k, other=0)
            vis = vis & (kp != 0)[None, :]
        x2 = tl.where(vis, x2, float("-inf"))
        m_blk = tl.max(x2, 1)
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.exp2(m_i - m_new)
        qk2 = x2 - m_new[:, None]
        if ENTROPY:
            # masked: 0 * -inf would be NaN; a NaN score stays NaN (its row is NaN, as in eager)
            qk2 = tl.maximum(qk2, NEG_BIG, propagate_nan=tl.PropagateNan.ALL)
        p = tl.exp2(qk2)
        rs = tl.sum(p, 1)
        if ENTROPY:
            ent = alpha * (ent + l_i * (m_i - m_new)) + tl.sum(p * qk2, 1)
        # block-uniform shortcuts: t - s over this tile lies in [dmin, dmax] for every row
        dmin = NK - NQ - (start_n + BLOCK_N - 1)
        dmax = NK - 1 - start_n
        if DISTANCE or WDIST:
            if dmin >= 0:        # every key at or before every query: sum p (t - s0) - sum p j
                dblk = (t - start_n).to(tl.float32) * rs - tl.sum(p * jf[None, :], 1)
            else:
                dblk = tl.sum(p * tl.maximum(diff, 0).to(tl.float32), 1)
        if DISTANCE:
            dist = dist * alpha + dblk
        if WDIST:
            if dmin >= wdist_w:
                wblk = rs * wdist_w
            elif (dmax < wdist_w) & (dmin >= 0):
                wblk = dblk
            else:
                wblk = tl.sum(p * tl.minimum(tl.maximum(diff, 0), wdist_w).to(tl.float32), 1)
            wdist = wdist * alpha + wblk
        if RECENT:
            if dmin >= recent_r:
                rblk = rs * 0.0
            elif dmax < recent_r:
                rblk = rs
            else:
                rblk = tl.sum(tl.where(diff < recent_r, p, 0.0), 1)
            recent = recent * alpha + rblk
        if NSPAN > 0:
            kpos = pos0 + offs_n
            span_acc = span_acc * alpha[:, None]
            for j in tl.static_range(NSPAN):
                a = tl.load(Spans + 2 * j)
                e = tl.load(Spans + 2 * j + 1)
                if (pos0 + start_n < e) & (pos0 + start_n + BLOCK_N > a):   # the tile meets the span
                    sm = tl.sum(tl.where(((kpos >= a) & (kpos < e))[None, :], p, 0.0), 1)
                    span_acc = span_acc + tl.where(cols[None, :] == j, sm[:, None], 0.0)
        if ARGMAX:
            upd = m_blk > m_i
            if tl.max(upd.to(tl.int32), 0) > 0:    # search the index only where some row's max moved
                idx = tl.min(tl.where(x2 == m_blk[:, None], offs_n[None, :], IDX_BIG), 1)
                amax = tl.where(upd, idx, amax)
        if DOT_UPCAST:
            pc = p.to(V.dtype.element_ty).to(tl.float32)
        else:
            pc = p.to(V.dtype.element_ty)
        acc = tl.dot(pc, v, acc * alpha[:, None], input_precision=DOT_PREC)
        l_i = l_i * alpha + rs
        m_i = m_new
        kt_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn

    # ---- partials: [B*G, S, RQ] (+ slot / head-dim axes), each region n_pad rows apart ----
    prow = (bg.to(tl.int64) * n_splits + sp) * RQ + offs_r
    PM, PL, PAcc, PStats, PIdx, n_prow = _partial_regions(Part, n_pad, HEAD_D, N_SLOT)
    tl.store(PM + prow, m_i, mask=row_ok)
    tl.store(PL + prow, l_i, mask=row_ok)
    tl.store(PAcc + prow[:, None] * HEAD_D + offs_d[None, :], acc,
             mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :])
    if ENTROPY:
        tl.store(PStats + P_ENT * n_prow + prow, ent, mask=row_ok)
    if DISTANCE:
        tl.store(PStats + P_DIST * n_prow + prow, dist, mask=row_ok)
    if WDIST:
        tl.store(PStats + P_WDIST * n_prow + prow, wdist, mask=row_ok)
    if RECENT:
        tl.store(PStats + P_RECENT * n_prow + prow, recent, mask=row_ok)
    for j in tl.static_range(NSPAN):
        val = tl.sum(tl.where(cols[None, :] == j, span_acc, 0.0), 1)
        tl.store(PStats + (P_SPAN0 + j) * n_prow + prow, val, mask=row_ok)
    if ARGMAX:
        tl.store(PIdx + prow, amax, mask=row_ok)

    if FUSED:
        # every thread's partials stored, then one release/acquire ticket per program at GPU scope
        # (CUTLASS's split-k semaphore: barrier, then one thread's fenced atomic); the split that
        # draws the last ticket sees every other split's partials, read past L1 (.cg)
        tl.debug_barrier()
        ticket = tl.atomic_add(Count + bg, 1, sem="acq_rel", scope="gpu")
        if ticket == n_splits - 1:
            tl.atomic_xchg(Count + bg, 0, sem="relaxed", scope="gpu")      # ready for the next call
            rr = tl.arange(0, BLOCK_R)
            _merge_rows(Part, Out, Res, Arg, KPos0, b, g, bg, rr, rr < RQ, H, G, NQ, n_splits, n_rows, n_pad,
                        sob, soh, som, RQ, HEAD_D, BLOCK_D, MERGE_S, BLOCK_R, NSPAN, N_SLOT, ENTROPY,
                        DISTANCE, WDIST, RECENT, ARGMAX, WRITE_LSE, ".cg")


@triton.jit
def _merge_rows(Part, Out, Res, Arg, KPos0, b, g, bg, r, row_ok, H, G, NQ, n_splits, n_rows, n_pad,
                sob, soh, som,
                RQ: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_R: tl.constexpr, NSPAN: tl.constexpr, N_SLOT: tl.constexpr, ENTROPY: tl.constexpr,
                DISTANCE: tl.constexpr, WDIST: tl.constexpr, RECENT: tl.constexpr, ARGMAX: tl.constexpr,
                WRITE_LSE: tl.constexpr, CACHE: tl.constexpr):
    """Merge the ``n_splits`` partial results of rows ``r`` [BLOCK_R] of GQA group ``bg`` (row
    r = (h % R) * NQ + query) into the output and ``Res`` (the LSE in slot 0, the row statistics
    after it): one pass over the splits, BLOCK_S at a time, with a running max ``M`` as an online
    softmax over splits (one chunk when BLOCK_S >= splits: every load issued at once)."""
    R = H // G
    h = g * R + r // NQ                              # [BLOCK_R]
    qi = r % NQ
    row = (b * H + h) * NQ + qi                      # [BLOCK_R] row of the results
    PM, PL, PAcc, PStats, PIdx, n_prow = _partial_regions(Part, n_pad, HEAD_D, N_SLOT)
    base = bg.to(tl.int64) * n_splits * RQ + r       # [BLOCK_R]
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D

    M = tl.full([BLOCK_R], NEG_BIG, dtype=tl.float32)
    L = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    ent = L
    dist = L
    wdist = L
    recent = L
    cols = tl.arange(0, 8)
    spans = tl.zeros([BLOCK_R, 8], dtype=tl.float32)
    first = tl.full([BLOCK_R], IDX_BIG, dtype=tl.int32)          # the first split that holds M
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + offs_s                                         # [BLOCK_S]
        ok = (ss < n_splits)[:, None] & row_ok[None, :]          # [BLOCK_S, BLOCK_R]
        pr = base[None, :] + ss.to(tl.int64)[:, None] * RQ
        m = tl.load(PM + pr, mask=ok, other=NEG_BIG, cache_modifier=CACHE)
        lj = tl.load(PL + pr, mask=ok, other=0.0, cache_modifier=CACHE)
        M_new = tl.maximum(M, tl.max(m, 0))
        alpha = tl.exp2(M - M_new)                               # 1 while M stays
        w = tl.where(ok, tl.exp2(m - M_new[None, :]), 0.0)
        wl = w * lj
        a = tl.load(PAcc + pr[:, :, None] * HEAD_D + offs_d[None, None, :],
                    mask=ok[:, :, None] & dmask[None, None, :], other=0.0, cache_modifier=CACHE)
        acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], 0)
        if ENTROPY:
            e = tl.load(PStats + P_ENT * n_prow + pr, mask=ok, other=0.0, cache_modifier=CACHE)
            ent = alpha * (ent + L * (M - M_new)) + tl.sum(w * e + wl * (m - M_new[None, :]), 0)
        L = L * alpha + tl.sum(wl, 0)
        if DISTANCE:
            dist = dist * alpha + tl.sum(w * tl.load(PStats + P_DIST * n_prow + pr, mask=ok, other=0.0,
                                                     cache_modifier=CACHE), 0)
        if WDIST:
            wdist = wdist * alpha + tl.sum(w * tl.load(PStats + P_WDIST * n_prow + pr, mask=ok, other=0.0,
                                                       cache_modifier=CACHE), 0)
        if RECENT:
            recent = recent * alpha + tl.sum(w * tl.load(PStats + P_RECENT * n_prow + pr, mask=ok, other=0.0,
                                                         cache_modifier=CACHE), 0)
        if NSPAN > 0:
            spans = spans * alpha[:, None]
            for j in tl.static_range(NSPAN):
                v = tl.sum(w * tl.load(PStats + (P_SPAN0 + j) * n_prow + pr, mask=ok, other=0.0,
                                       cache_modifier=CACHE), 0)
                spans += tl.where(cols[None, :] == j, v[:, None], 0.0)
        if ARGMAX:   # splits are in key order: the first split whose max is M holds the first max key
            cand = tl.min(tl.where(ok & (m == M_new[None, :]) & (lj > 0), ss[:, None], IDX_BIG), 0)
            first = tl.where(M_new > M, cand, tl.minimum(first, cand))
        M = M_new

    l_pos = L != 0                                   # a NaN row stays NaN (not "no key")
    l_safe = tl.where(l_pos, L, 1.0)
    inv = tl.where(l_pos, 1.0 / l_safe, 0.0)
    out = acc * inv[:, None]
    tl.store(Out + b.to(tl.int64) * sob + h.to(tl.int64)[:, None] * soh + qi.to(tl.int64)[:, None] * som
             + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
    Rows = Res + n_rows
    if WRITE_LSE:
        tl.store(Res + row, tl.where(l_pos, (M + tl.log2(l_safe)) * LN2, float("-inf")), mask=row_ok)
    if ENTROPY:
        tl.store(Rows + P_ENT * n_rows + row, tl.where(l_pos, tl.log(l_safe) - LN2 * ent * inv, 0.0), mask=row_ok)
    if DISTANCE:
        tl.store(Rows + P_DIST * n_rows + row, dist * inv, mask=row_ok)
    if WDIST:
        tl.store(Rows + P_WDIST * n_rows + row, wdist * inv, mask=row_ok)
    if RECENT:
        tl.store(Rows + P_RECENT * n_rows + row, recent * inv, mask=row_ok)
    for j in tl.static_range(NSPAN):
        tl.store(Rows + (P_SPAN0 + j) * n_rows + row, tl.sum(tl.where(cols[None, :] == j, spans, 0.0), 1) * inv,
                 mask=row_ok)
    if ARGMAX:
        tl.store(Rows + 4 * n_rows + row, inv, mask=row_ok)      # max_prob = exp2(M - M) / L
        fs = tl.where(first == IDX_BIG, 0, first)
        idx = tl.load(PIdx + base + fs.to(tl.int64) * RQ, mask=row_ok, other=0, cache_modifier=CACHE)
        idx = tl.where(l_pos, idx, 0)
        tl.store(Arg + row, idx.to(tl.int64) + tl.load(KPos0 + b), mask=row_ok)


@triton.jit
def decode_merge_kernel(
    Part, Out, Res, Arg,
    sob, soh, som, H, G, NQ, n_splits, n_rows, n_pad, KPos0,
    RQ: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    NSPAN: tl.constexpr, N_SLOT: tl.constexpr, ENTROPY: tl.constexpr, DISTANCE: tl.constexpr,
    WDIST: tl.constexpr, RECENT: tl.constexpr, ARGMAX: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """One program per (batch, head, query) row: merge the S partial results of that row (from
    ``Part``) into the output and ``Res`` (the LSE in slot 0, the row statistics after it)."""
    row = tl.program_id(0)                           # b * H * NQ + h * NQ + i
    b = row // (H * NQ)
    hq = row % (H * NQ)
    h = hq // NQ
    qi = hq % NQ
    R = H // G
    g = h // R
    r = (h % R) * NQ + qi + tl.arange(0, 1)          # the row inside the GQA group, as a [1] vector
    _merge_rows(Part, Out, Res, Arg, KPos0, b, g, b * G + g, r, r < RQ, H, G, NQ, n_splits, n_rows, n_pad,
                sob, soh, som, RQ, HEAD_D, BLOCK_D, BLOCK_S, 1, NSPAN, N_SLOT, ENTROPY, DISTANCE, WDIST,
                RECENT, ARGMAX, WRITE_LSE, "")


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
# What the decode kernels can do, declared (as ``triton_attention.SUPPORTED_*``): every row statistic,
# no column sums (they need every query of the sequence), and of the edits only the query scale.
SUPPORTED_STATS = frozenset({"sink_k", "spans", "entropy", "distance", "window_distance", "recent", "argmax"})
SUPPORTED_EDITS = frozenset({"q_scale"})
DECODE_MAX_Q = 16          # queries per call taken by the decode path (more: flash_stats)
DECODE_MAX_ROWS = 64       # query rows per KV head (R * Q) held by one program
# Fewer keys (K, the cache length) than this: flash_stats' one program per query block. On the GPU
# alone the split path wins from ~1k keys (H200: 7-13 vs 30-132 µs at 2k-8k). Since the decode plans
# (``_Plan``) and bound launches (kernels/launch.py) an eager step costs no more on it either: at 1k
# keys 76-96 µs against the forward's 81-106 (noise ~10 µs), at 2k-8k 61-142 against 78-177
# (SmolLM2 shapes B=3 and Llama-3-8B B=1, H200, 2026-12-03;
# fewer than 1k keys not measured on the split path).
# It was 6144 while the split path's host work was twice as long.
# benchmarks/decode_host.py --min-k 0, BENCHMARKS.md "Decode on the H200 after the host rebuild".
DECODE_MIN_K = 1024
MAX_SPANS = 8              # sink + spans held by the partial kernel
# (BLOCK_N, num_warps, num_stages) by padded head dim; chosen on the H200 (benchmarks/attention_bench.py --decode)
DECODE_CONFIGS = {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)}
DECODE_PROGRAMS_PER_SM = 2  # aim for this many partial programs per SM (H200 sweep: 2 beat 1, 4, 8)
MERGE_BLOCK_S = 64          # splits a merge program loads at once (one chunk up to 64 splits)
# Fused merge: at most this many values (splits x rows x head dim) loaded at once, so its chunk of
# splits is min(the plan's most splits, MERGE_TILE / (rows x head dim)). Each chunk is one round trip
# to L2 on the merging program's critical path: on the H200 (Llama-3-8B, B = 1, 33 splits) 4096 / 8192
# / 16384 gave 20.4 / 16.2 / 13.2 µs a call with argmax, against 12.4 through the merge kernel; 16384
# still compiles without spills (206 registers; 255 with every row statistic).
MERGE_TILE = 16384
# Who merges the splits:
# - "fused": the last split of each KV head group to finish. One launch a call: an eager call saves
#   the second launch's host time (13-27 µs a call on the H200), but the GPU waits for the merging
#   program's chunks (on the H200 +1-3 µs at B = 1, 8k keys; +3-4% at 128k).
# - "kernel": a second launch (``decode_merge_kernel``), one program per row: the least GPU time.
# - "auto" (default): "fused" where an eager call is host-bound, that is small (B * G * K up to
#   FUSED_MAX_KEYS) and not captured in a CUDA graph; "kernel" otherwise.
# HEADSCOPE_DECODE_MERGE picks one for an A/B; plans are kept per value, so a benchmark may switch
# ``MERGE`` between calls. BENCHMARKS.md "One launch per decode call".
MERGE = os.environ.get("HEADSCOPE_DECODE_MERGE", "auto")
if MERGE not in ("auto", "fused", "kernel"):
    raise ValueError(f"HEADSCOPE_DECODE_MERGE={MERGE!r}: use 'auto', 'fused' or 'kernel'")
# Eager on the H200 (Llama-3-8B shapes), the fused merge was faster up to B * G * K = 512k (B = 1 at
# 32k keys: 98 against 115 µs with argmax; B = 8 at 8k: 77 against 94 with every row statistic) and
# slower from 1M, where the call is GPU-bound (B = 1 at 128k: 137 against 131 µs).
FUSED_MAX_KEYS = 1 << 19
INTERPRET_BLOCK_N = 16



def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def eligible(q, k, *, stats=None, edits=None, min_k: int | None = None) -> str | None:
    """None when the decode path can take this call, else the reason it cannot (a short phrase;
    ``triton_attention.attention`` then uses flash_stats, so nothing is lost but speed).

    q [B, H, Q, d], k [B, G, K, d]. Takes few queries (Q <= DECODE_MAX_Q, R * Q <= DECODE_MAX_ROWS)
    against many keys (K >= ``min_k``, default DECODE_MIN_K), the statistics and edits declared in
    ``SUPPORTED_STATS`` / ``SUPPORTED_EDITS`` (every row statistic; no column sums; ``q_scale``)."""
    B, H, Q, D = q.shape
    G, K = k.shape[1], k.shape[2]
    if Q > DECODE_MAX_Q or (H // max(G, 1)) * Q > DECODE_MAX_ROWS:
        return f"{Q} queries per KV head group of {H // max(G, 1)} heads is beyond the decode path"
    if K < (DECODE_MIN_K if min_k is None else min_k):
        return f"{K} keys are too few for a key split"
    reason = decline_reason("the decode kernels", SUPPORTED_STATS, SUPPORTED_EDITS, stats, edits)
    if reason is not None:
        return reason
    if stats is not None and (1 if stats.sink_k else 0) + len(stats.spans) > MAX_SPANS:
        return f"more than {MAX_SPANS} spans (sink included)"
    return None


class _Plan:
    """What a decode call needs that depends on neither the key count nor the tensors' addresses:
    tiles, the constexprs of both kernels (bound once, ``launch.Bound``), the span table, the
    partial-buffer width. Kept per (device, dtype, shapes but K, masks, request), so that an eager
    decode step's host time goes to the two launches and the three buffers."""

    def __init__(self, dev, dtype, B, H, Q, D, G, causal, has_window, softcap, pad, qscale, stats, config):
        self.stats = stats                           # held: the plan is keyed on id(stats)
        RQ = (H // G) * Q
        BD = max(16, _pow2(D))
        interp = _interpreting()
        if config is not None:
            BN, warps, stages = config
        elif interp:
            BN, warps, stages = INTERPRET_BLOCK_N, 4, 1
        else:
            BN, warps, stages = DECODE_CONFIGS[BD]
            if dtype == torch.float32:
                BN, stages = min(BN, 32), 2
        st = stats
        nspan, spans = span_table(st, dev)
        self.dummy_f, self.dummy_i, self.dummy_i32, self.dummy_u8 = dummies(dev)
        self.spans = spans if nspan else self.dummy_i
        self.kpos0 = cached(("pos0", dev, B), lambda: torch.zeros(B, dtype=torch.int64, device=dev))
        ent, dis, wd = bool(st and st.entropy), bool(st and st.distance), bool(st and st.window_distance)
        rec, am = bool(st and st.recent), bool(st and st.argmax)
        any_row = bool(nspan or ent or dis or wd or rec or am)
        self.n_slot = (5 + nspan) if any_row else 0
        # partials: m, l, acc [D], the statistic slots, the int32 argmax index: n_pad rows each
        self.part_width = 2 + D + self.n_slot + (1 if am else 0)
        # results: the LSE, then (with any row statistic) 5 + spans slots, each [B, H, Q]
        self.res_slots = 1 + ((5 + nspan) if any_row else 0)
        self.argmax = am
        self.BN, self.RQ, self.rows_per_bh = BN, RQ, B * G
        self.sms = sm_count(dev) if dev.type == "cuda" else None
        self.wdist_w = int(st.window_distance or 0) if st else 0
        self.recent_r = int(st.recent or 0) if st else 0
        flags = dict(HEAD_D=D, BLOCK_D=BD, NSPAN=nspan, N_SLOT=self.n_slot, ENTROPY=ent, DISTANCE=dis,
                     WDIST=wd, RECENT=rec, ARGMAX=am)
        self.merge_mode = MERGE
        self.fused_max_keys = FUSED_MAX_KEYS // (B * G)          # K up to this: fused under "auto"
        self.want = None if self.sms is None else max(1, (DECODE_PROGRAMS_PER_SM * self.sms) // (B * G))
        BR = _pow2(RQ)
        most_splits = MERGE_BLOCK_S if self.want is None else _pow2(self.want)
        partial = dict(
            RQ=RQ, BLOCK_M=max(16, BR), BLOCK_N=BN, CAUSAL=bool(causal), HAS_WINDOW=has_window,
            HAS_PAD=pad, HAS_SOFTCAP=softcap, HAS_QSCALE=qscale,
            DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
            DOT_UPCAST=interp and dtype == torch.bfloat16, **flags,
            WRITE_LSE=st is not None, BLOCK_R=BR,
            MERGE_S=max(1, min(MERGE_BLOCK_S, most_splits, MERGE_TILE // (BR * BD))),
            num_warps=warps, num_stages=stages)
        # the partial kernel with and without the fused merge (each compiled on first use)
        self.partial = {f: fast(decode_partial_kernel).bind(FUSED=f, **partial) for f in (True, False)}
        self._merge_flags = dict(RQ=RQ, WRITE_LSE=st is not None, **flags, num_warps=4 if BD >= 128 else 2)
        self._merges: dict = {}

    def merge(self, S: int):
        """The merge kernel bound for ``S`` splits (its BLOCK_S)."""
        bs = min(MERGE_BLOCK_S, max(2, _pow2(S)))
        m = self._merges.get(bs)
        if m is None:
            m = self._merges[bs] = fast(decode_merge_kernel).bind(BLOCK_S=bs, **self._merge_flags)
        return m


_PLANS: dict = {}
MAX_PLANS = 256            # plans kept (shapes x requests) before the cache is emptied


def clear_plans() -> None:
    """Forget the kept plans (after changing ``DECODE_CONFIGS`` or ``INTERPRET_BLOCK_N``, or the
    kernels themselves, in a running process: benchmarks do)."""
    _PLANS.clear()
    _FAST.clear()


def _plan(dev, dtype, B, H, Q, D, G, causal, has_window, softcap, pad, qscale, stats, config) -> _Plan:
    key = (dev, dtype, B, H, Q, D, G, causal, has_window, softcap, pad, qscale, id(stats), config, MERGE)
    p = _PLANS.get(key)
    if p is None or p.stats is not stats:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
            _FAST.clear()                      # their plans are gone from _PLANS (``_verify_fast`` compares)
        p = _PLANS[key] = _Plan(dev, dtype, B, H, Q, D, G, causal, has_window, softcap, pad, qscale, stats, config)
    return p


_COUNTS: dict = {}
_SCRATCH: dict = {}


def current_stream(dev):
    """The raw handle of ``dev``'s current CUDA stream (what Triton's launch reads), None off CUDA."""
    if dev.type != "cuda":
        return None
    return torch._C._cuda_getCurrentRawStream(dev.index if dev.index is not None else torch.cuda.current_device())


def stream_state(dev):
    """(whether ``dev``'s current stream is being captured into a CUDA graph, its raw handle); (False,
    None) off CUDA."""
    if dev.type != "cuda":
        return False, None
    return torch._C._cuda_isCurrentStreamCapturing(), current_stream(dev)


def split_counts(dev, n: int, stream=...):
    """The int32 counters of the fused merge, one per (batch, KV head) group, for ``stream`` (a raw
    handle from ``current_stream``; default: the current stream of ``dev``). They are zero between
    calls (the last split of a group sets its counter back), so they are made once and kept; one
    set per stream, so that calls on two streams never share a counter."""
    if stream is ...:
        stream = current_stream(dev)
    c = _COUNTS.get((dev, stream))
    if c is None or c.numel() < n:
        c = _COUNTS[(dev, stream)] = torch.zeros(max(n, 64), dtype=torch.int32, device=dev)
    return c


def partial_scratch(dev, n: int, stream=...):
    """fp32 scratch of at least ``n`` values for the partials, kept per (device, stream, thread);
    ``stream`` as in ``split_counts``. A call's partials are written and merged before the next
    call of the same thread on the same stream starts, so those calls can share it: one
    ``torch.empty`` less per eager call. (Per thread as well: two threads' launches interleave on a
    stream, and the merge kernel is a second launch.) Not for a call being captured into a CUDA
    graph, which would keep this memory's address: such a call gets its own buffer."""
    if stream is ...:
        stream = current_stream(dev)
    key = (dev, stream, threading.get_ident())
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        if len(_SCRATCH) >= 64:                # threads come and go: keep a bounded number
            _SCRATCH.clear()
        buf = _SCRATCH[key] = torch.empty(max(n, 1 << 14), dtype=torch.float32, device=dev)
    return buf


def partials_layout(n_prow: int) -> int:
    """Rows between the regions of the partial buffer (m, l, acc [D], each statistic slot, the argmax
    index, in that order): ``n_prow = B * G * S * R * Q`` rounded up to 16, so that every region
    starts 64-byte aligned and the kernels' offsets are multiples of 16 (Triton specialises on it)."""
    return -(-n_prow // 16) * 16


def attention(q, k, v, *, scaling: float, causal: bool = True, sliding_window: int | None = None,
              key_padding=None, softcap: float | None = None, key_pos0=None, stats=None, edits=None,
              splits: int | None = None, config=None, window_switch: bool = False):
    """Decode attention: q [B, H, Q, d], k, v [B, G, K, d] -> (out [B, H, Q, d], stats dict), the
    result of ``triton_attention.attention`` for a call that ``eligible`` accepts (the caller checks
    it and the shared argument checks). ``splits`` forces the number of key splits; ``config`` is
    (BLOCK_N, num_warps, num_stages); ``window_switch`` as in ``triton_attention.attention``."""

    B, H, Q, D = q.shape
    _, G, K, _ = k.shape
    dev = q.device
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if sq[3] != 1 or sk[3] != 1 or sv[3] != 1:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        sq, sk, sv = q.stride(), k.stride(), v.stride()
    ed = edits if edits is not None and not edits.empty else None
    has_qscale = ed is not None and ed.q_scale is not None
    st = stats
    p = _plan(dev, q.dtype, B, H, Q, D, G, bool(causal), sliding_window is not None or bool(window_switch),
              softcap is not None,
              key_padding is not None, has_qscale, st, tuple(config) if config is not None else None)

    key_lo, split_len, S = key_splits(p, K, Q, sliding_window, splits)

    kpos0 = key_pos0
    if key_pos0 is None:
        kpos0 = p.kpos0
    elif key_pos0.dtype != torch.int64 or not key_pos0.is_contiguous() or key_pos0.device != dev:
        kpos0 = key_pos0.to(device=dev, dtype=torch.int64).contiguous()
    pad = p.dummy_u8
    if key_padding is not None:
        pad = key_padding.to(device=dev)
        pad = (pad.view(torch.uint8) if pad.dtype == torch.bool else (pad != 0).view(torch.uint8)).contiguous()
    qscale = (ed.q_scale.detach().to(device=dev, dtype=torch.float32).reshape(H).contiguous()
              if has_qscale else p.dummy_f)

    # the buffers: the partials (scratch kept per stream, regions n_pad rows apart), the output, and
    # the results [1 + slots, B, H, Q] (the int64 argmax apart); each torch.empty is host time
    n_rows = B * H * Q
    n_pad = partials_layout(p.rows_per_bh * S * p.RQ)
    capturing, stream = stream_state(dev)
    part = (torch.empty(n_pad * p.part_width, dtype=torch.float32, device=dev) if capturing
            else partial_scratch(dev, n_pad * p.part_width, stream))
    out = torch.empty(B, H, Q, D, dtype=q.dtype, device=dev)
    res = torch.empty(p.res_slots, B, H, Q, dtype=torch.float32, device=dev) if st is not None else p.dummy_f
    arg = torch.empty(B, H, Q, dtype=torch.int64, device=dev) if p.argmax else p.dummy_i

    fused = p.merge_mode == "fused" or (p.merge_mode == "auto" and K <= p.fused_max_keys and not capturing)
    count = split_counts(dev, B * G, stream) if fused else p.dummy_i32
    args = kernel_args(q, k, v, part, sq, sk, sv, H, G, Q, D, K, key_lo, split_len, S, n_pad,
                       float(scaling), float(softcap) if softcap is not None else 1.0, window_arg(sliding_window),
                       qscale, kpos0, pad, p.spans, p.wdist_w, p.recent_r, out, res, arg, count, n_rows)
    # launched under the specialisation facts of the scalars args[4:24] (strides to window): the rest is
    # fixed by the plan (its dtypes, H, G, Q, D, B, the request) but the tensors' alignment, which
    # run_keyed checks itself
    caller_key = specialization_facts(args[4:24])
    p.partial[fused].run_keyed(caller_key, (S, B * G), args)
    if not fused:
        p.merge(S)[(n_rows,)](part, out, res, arg, H * Q * D, Q * D, D, H, G, Q, S, n_rows, n_pad, kpos0)
    elif (p.sms is not None and splits is None and key_padding is None and softcap is None and not has_qscale
          and not capturing and caller_key in p.partial[True].keyed):    # launched directly: fast_attention
        _remember(p, q, k, stats, scaling, causal, sliding_window, window_switch, stream)

    if st is None:
        return out, {}
    return out, row_results(st, res[0], res, arg, first=1)


# ---- the fast path: an eager call whose signature an earlier call had ----------------------------

class _Fast:
    """What ``fast_attention`` keeps for one call signature (``_fast_key``): the plan, its bound partial
    kernel with the fused merge, the merge counters and a partials scratch of the signature's stream
    (big enough for the most splits the plan makes), and the addresses of what stays fixed."""

    def __init__(self, p: _Plan, q, k, stats, scaling, sliding_window, stream):
        B, H, Q, D = q.shape
        dev = q.device
        self.p, self.stats, self.bound = p, stats, p.partial[True]
        self.B, self.H, self.Q, self.D, self.G = B, H, Q, D, k.shape[1]
        self.dtype, self.device, self.b_shape = q.dtype, dev, (B,)
        self.scaling, self.window = float(scaling), window_arg(sliding_window)
        # S <= p.want splits (split_len >= ceil(K / want)); fast_attention checks it anyway
        self.part_max = partials_layout(p.rows_per_bh * max(1, p.want) * p.RQ) * p.part_width
        self.part = partial_scratch(dev, self.part_max, stream)       # held: its address stays valid
        self.count = split_counts(dev, B * self.G, stream)
        self.part_a, self.count_a = self.part.data_ptr(), self.count.data_ptr()
        self.kpos0_a, self.spans_a = p.kpos0.data_ptr(), p.spans.data_ptr()
        self.dummy_f_a, self.dummy_i_a, self.pad_a = p.dummy_f.data_ptr(), p.dummy_i.data_ptr(), p.dummy_u8.data_ptr()
        self.n_rows = B * H * Q


_FAST: dict = {}
MAX_FAST = 256             # signatures kept before the table is emptied
_TENSOR = torch.Tensor
_I64 = torch.int64


def _fast_key(q, stats, scaling, causal, sliding_window, window_switch, index: int, stream) -> tuple:
    return (q.shape, q.dtype, index, stream, threading.get_ident(), id(stats), scaling, causal, sliding_window,
            window_switch, MERGE)


def _remember(p: _Plan, q, k, stats, scaling, causal, sliding_window, window_switch, stream) -> None:
    """After a full call that took the fused merge with nothing but q, k, v, key positions, the
    statistics and the window: keep its signature for ``fast_attention``."""
    index = q.get_device()
    key = _fast_key(q, stats, scaling, causal, sliding_window, window_switch, index, stream)
    if key not in _FAST:
        if len(_FAST) >= MAX_FAST:
            _FAST.clear()
        _FAST[key] = _Fast(p, q, k, stats, scaling, sliding_window, stream)


def fast_attention(q, k, v, scaling, causal, sliding_window, key_pos0, stats, window_switch):
    """``attention``'s result for an eager call whose signature (q's shape, dtype and device, the
    stream and thread, the request, the scale, the mask) an earlier full call had, with no key
    padding, softcap, edits or forced tiles; else None, and the caller takes the full path
    (``triton_attention.attention``: the argument checks, ``eligible``, ``attention``), which keeps
    the signature once its fused launch goes direct.

    Per call it checks what can change under an equal signature (k and v's shape, dtype and device;
    the key count against ``DECODE_MIN_K``, q's length and ``FUSED_MAX_KEYS``; unit last strides; grad;
    the current device; a CUDA-graph capture; ``key_pos0``; tensor subclasses; alignment) and returns
    None on any doubt. Then it counts the splits (``key_splits``), makes the result buffers and
    launches the kernel that ``run_keyed`` kept for the scalars' specialisation facts, the tensors as
    their addresses (``launch.Bound.launch_kept``): no argument checks, plan key, scratch lookups or
    general launch path, ~20 µs less host time a call on the H200's host. With ``launch.VERIFY_KEYED``
    each such call is checked against the full path (``_verify_fast``)."""
    if type(q) is not _TENSOR or type(k) is not _TENSOR or type(v) is not _TENSOR or not q.is_cuda:
        return None
    index = q.get_device()
    if torch._C._cuda_getDevice() != index:
        return None
    stream = torch._C._cuda_getCurrentRawStream(index)
    e = _FAST.get(_fast_key(q, stats, scaling, causal, sliding_window, window_switch, index, stream))
    if e is None or e.stats is not stats:
        return None
    ks = k.shape
    if len(ks) != 4 or v.shape != ks:
        return None
    kb, kg, K, kd = ks
    p = e.p
    if (kb != e.B or kg != e.G or kd != e.D or k.dtype is not e.dtype or v.dtype is not e.dtype
            or k.get_device() != index or v.get_device() != index
            or K < DECODE_MIN_K or K < e.Q or K > p.fused_max_keys):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if sq[3] != 1 or sk[3] != 1 or sv[3] != 1 or torch._C._cuda_isCurrentStreamCapturing():
        return None
    if key_pos0 is None:
        kp = e.kpos0_a
    elif (type(key_pos0) is _TENSOR and key_pos0.dtype is _I64 and key_pos0.get_device() == index
          and key_pos0.shape == e.b_shape and key_pos0.is_contiguous()):
        kp = key_pos0.data_ptr()
    else:
        return None
    key_lo, split_len, S = key_splits(p, K, e.Q, sliding_window)
    n_pad = partials_layout(p.rows_per_bh * S * p.RQ)
    qa, ka, va = q.data_ptr(), k.data_ptr(), v.data_ptr()
    if n_pad * p.part_width > e.part_max or (qa | ka | va | kp) & 15:
        return None
    B, H, Q, D, G, dev = e.B, e.H, e.Q, e.D, e.G, e.device
    out = torch.empty(B, H, Q, D, dtype=e.dtype, device=dev)
    res = torch.empty(p.res_slots, B, H, Q, dtype=torch.float32, device=dev) if stats is not None else None
    arg = torch.empty(B, H, Q, dtype=_I64, device=dev) if p.argmax else None
    args = kernel_args(qa, ka, va, e.part_a, sq, sk, sv, H, G, Q, D, K, key_lo, split_len, S, n_pad,
                       e.scaling, 1.0, e.window, e.dummy_f_a, kp, e.pad_a, e.spans_a, p.wdist_w, p.recent_r,
                       out.data_ptr(), e.dummy_f_a if res is None else res.data_ptr(),
                       e.dummy_i_a if arg is None else arg.data_ptr(), e.count_a, e.n_rows)
    caller_key = specialization_facts(args[4:24])
    if not e.bound.launch_kept(caller_key, (S, B * G), args, index):
        return None
    if launch.VERIFY_KEYED:
        _verify_fast(e, q, k, v, scaling, causal, sliding_window, key_pos0, stats, window_switch, caller_key,
                     args, out, res, arg)
    if stats is None:
        return out, {}
    return out, row_results(stats, res[0], res, arg, first=1)


def _verify_fast(e: _Fast, q, k, v, scaling, causal, sliding_window, key_pos0, stats, window_switch, caller_key,
                 args, out, res, arg) -> None:
    """Raise unless the full path would launch the same kernel with the same arguments: the same
    plan, ``eligible`` accepting the call, the kept kernel's specialisation key equal to that of
    every argument (tensors included), and equal arguments (the fast path's own scratch aside)."""
    B, H, Q, D = q.shape
    G, K = k.shape[1], k.shape[2]
    p = _plan(q.device, q.dtype, B, H, Q, D, G, bool(causal), sliding_window is not None or bool(window_switch),
              False, False, False, stats, None)
    why = eligible(q, k, stats=stats)
    if p is not e.p or why is not None:
        raise AssertionError(f"fast decode call: the plan {'differs' if p is not e.p else 'is equal'}; "
                             f"eligible: {why}")
    key_lo, split_len, S = key_splits(p, K, Q, sliding_window)
    n_pad = partials_layout(p.rows_per_bh * S * p.RQ)
    tensors = kernel_args(q, k, v, e.part, q.stride(), k.stride(), v.stride(), H, G, Q, D, K, key_lo, split_len, S,
                          n_pad, float(scaling), 1.0, window_arg(sliding_window), p.dummy_f,
                          p.kpos0 if key_pos0 is None else key_pos0, p.dummy_u8, p.spans, p.wdist_w, p.recent_r,
                          out, p.dummy_f if res is None else res, p.dummy_i if arg is None else arg, e.count,
                          B * H * Q)
    e.bound.verify_kept(caller_key, tensors)
    ref = [x.data_ptr() if isinstance(x, torch.Tensor) else x for x in tensors]
    if ref != list(args):
        raise AssertionError(f"fast decode call: arguments {list(args)} where the full path has {ref}")


def key_splits(p: _Plan, K: int, Q: int, sliding_window, splits=None) -> tuple[int, int, int]:
    """(key_lo, split_len, S) of a call: the visible key range [key_lo, K) (with a window, keys before
    the first query's window are skipped, from a block boundary), cut into S splits of split_len keys
    (a multiple of the plan's BLOCK_N): ``splits`` of them when given, else about
    DECODE_PROGRAMS_PER_SM programs per SM (two blocks a split at least)."""
    BN = p.BN
    key_lo = 0
    if sliding_window is not None:
        key_lo = max(0, K - Q - int(sliding_window) + 1)
        key_lo = (key_lo // BN) * BN
    K_vis = K - key_lo
    if splits is not None:
        S = max(1, min(int(splits), -(-K_vis // BN)))
        split_len = -(-(-(-K_vis // S)) // BN) * BN
    elif p.sms is None:                        # interpreter: several splits on tiny problems
        split_len = 2 * BN
    else:                                      # about DECODE_PROGRAMS_PER_SM programs per SM
        split_len = max(2 * BN, -(-K_vis // p.want))
        split_len = -(-split_len // BN) * BN
    return key_lo, split_len, -(-K_vis // split_len)


def kernel_args(q, k, v, part, sq, sk, sv, H, G, Q, D, K, key_lo, split_len, S, n_pad, scaling, softcap, window,
                qscale, kpos0, pad, spans, wdist_w, recent_r, out, res, arg, count, n_rows) -> tuple:
    """``decode_partial_kernel``'s runtime arguments in its order (tensors, or their addresses for a
    direct launch): the one place that order is written."""
    return (q, k, v, part, sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2],
            H, G, Q, K, key_lo, split_len, S, n_pad, scaling, softcap, window,
            qscale, kpos0, pad, spans, wdist_w, recent_r,
            out, res, arg, count, H * Q * D, Q * D, D, n_rows)


def span_table(stats, device):
    """(number of spans, int64 [2 * n] device tensor of half-open position spans, the sink first as
    ``[-2^62, sink_k)``) for a request; cached per device and spans. (0, None) without spans."""
    spans = []
    if stats is not None:
        if stats.sink_k:
            spans.append((-(2 ** 62), int(stats.sink_k)))
        spans += [(int(a), int(b)) for a, b in stats.spans]
    if not spans:
        return 0, None
    return len(spans), cached(("spans", device, tuple(spans)),
                              lambda: torch.tensor(spans, dtype=torch.int64, device=device).reshape(-1))


def row_results(stats, lse, rows, arg, first: int = 0) -> dict:
    """The statistics dict of a request from the kernels' row buffers (flash_stats and the decode
    merge share the layout): lse [B, H, Q], rows [first + 5 + spans, B, H, Q] (from slot ``first``:
    entropy, distance, window distance, recent mass, max prob, then the sink and each span), arg
    [B, H, Q] int64. Each statistic is one view of ``rows``."""
    res = {"lse": lse}
    j = first + 5
    if stats.sink_k:
        res["sink_mass"] = rows[j]
        j += 1
    if stats.spans:
        res["span_mass"] = rows[j:j + len(stats.spans)].permute(1, 2, 3, 0)   # a view, as fa4_stats (no copy launch)
    if stats.entropy:
        res["entropy"] = rows[first]
    if stats.distance:
        res["distance"] = rows[first + 1]
    if stats.window_distance:
        res["window_distance"] = rows[first + 2]
    if stats.recent:
        res["recent_mass"] = rows[first + 3]
    if stats.argmax:
        res["max_prob"] = rows[first + 4]
        res["argmax"] = arg
    return res
