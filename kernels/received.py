"""Triton column sums: attention *received* by each key, from the LSE the forward kernel saved.

One program per (key block, batch, KV head) holds its keys' K tile and loops over the query heads of
its GQA group and, for each, over the query blocks that can see its keys. When that gives too few
programs to fill the GPU (short sequences: causal work is lopsided, the first key blocks have the
most queries) the group's heads are split over ``R / HEADS_PER_PROG`` programs; each (key, head)
sum still has exactly one owner (causal: from the key on;
sliding window: up to ``window`` after it; ``received_window=(a, b)``: queries with a <= t - s <= b).
For each tile it recomputes the scores, turns them into probabilities with the saved LSE
(``p = exp2(x * log2 e - lse * log2 e)``; times the per-row redistribution coefficients of
``flash_stats`` MODE 1 when a head is redistributed, so the sums describe the edited
probabilities) and adds the tile's row sums to a register accumulator. Each key's sum is owned by
exactly one program and added in a fixed order: deterministic, no atomics.

As in the forward kernel the query range is split into a masked front (the causal diagonal), an
unmasked middle and a masked back (window edge, partial last query block); with a received window
every tile is masked. ``received_count`` needs no kernel: it is a closed form in the key index
(``triton_attention._received_count``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .flash_stats import LOG2E, key_classes


@triton.jit
def received_kernel(
    Q, K, Lse, Coef, Recv,
    sqb, sqh, sqm, skb, skh, skn, srb, srh,
    H, G, NQ, NK, n_rows, HEADS_PER_PROG,
    scaling, softcap, window, ra, rb,
    QScale, KPos0, Pad, spb, RdHasTgt, RdSrc, RdTgt,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_QSCALE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, RWIN: tl.constexpr,
    NSRC: tl.constexpr, NTGT: tl.constexpr,
):
    """Column sums of attention: Recv[b, h, s] (fp32, [B, H, K]) = sum over the queries t that see key s
    of p[t, s], from the forward's saved LSE (base e), edited probabilities included. Grid:
    (cdiv(K, BLOCK_N), B * G * (H // G // HEADS_PER_PROG)); launched by
    ``triton_attention._received_sums``. Algorithm: see the module doc."""
    pid_n = tl.program_id(0)
    R = H // G
    n_split = R // HEADS_PER_PROG                      # programs sharing one (key block, batch, KV head)
    bg = tl.program_id(1) // n_split
    j0 = (tl.program_id(1) % n_split) * HEADS_PER_PROG
    b = bg // G
    g = bg % G
    s0 = pid_n * BLOCK_N
    offs_n = s0 + tl.arange(0, BLOCK_N)                 # key cache indices
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < NK
    dmask = offs_d < HEAD_D
    b64 = b.to(tl.int64)
    k_ptrs = (K + b64 * skb + g.to(tl.int64) * skh + s0.to(tl.int64) * skn
              + (tl.arange(0, BLOCK_N)[:, None] * skn + offs_d[None, :]))
    k = tl.load(k_ptrs, mask=nmask[:, None] & dmask[None, :], other=0.0)
    if DOT_UPCAST:   # interpreter workaround, see flash_stats
        k = k.to(tl.float32)
    OFF = NK - NQ
    zero = s0 * 0
    s_last = tl.minimum(s0 + BLOCK_N, NK) - 1

    # cache indices t of the queries that may see a key of this block: [tq_lo, tq_hi)
    tq_lo = zero + OFF
    if CAUSAL:
        tq_lo = tl.maximum(tq_lo, s0)
    if RWIN:
        tq_lo = tl.maximum(tq_lo, s0 + ra)
    tq_hi = zero + NK
    if HAS_WINDOW:
        tq_hi = tl.minimum(tq_hi, s_last + window)
    if RWIN:
        tq_hi = tl.minimum(tq_hi, s_last + rb + 1)
    i_lo = (tl.maximum(tq_lo - OFF, 0) // BLOCK_M) * BLOCK_M
    i_hi = tl.maximum(tq_hi - OFF, i_lo)
    if RWIN:
        mid_lo = i_hi
        mid_hi = i_hi
    else:
        mid_lo = i_lo
        if CAUSAL:   # every row t >= the block's last key
            mid_lo = ((tl.maximum(s_last - OFF, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        mid_hi = zero + (NQ // BLOCK_M) * BLOCK_M
        if HAS_WINDOW:   # every row t - s0 < window
            mid_hi = tl.minimum(mid_hi, (tl.maximum(s0 + window - OFF, 0) // BLOCK_M) * BLOCK_M)
        mid_lo = tl.minimum(tl.maximum(mid_lo, i_lo), i_hi)
        mid_hi = tl.maximum(tl.minimum(mid_hi, i_hi), mid_lo)

    pos = tl.load(KPos0 + b) + offs_n
    if HAS_PAD:
        kp = tl.load(Pad + b64 * spb + offs_n, mask=nmask, other=0) != 0

    for j in range(j0, j0 + HEADS_PER_PROG):
        h = g * R + j
        sm_scale = scaling
        if HAS_QSCALE:
            sm_scale = scaling * tl.load(QScale + h)
        q_base = Q + b64 * sqb + h.to(tl.int64) * sqh
        row_base = (b * H + h).to(tl.int64) * NQ
        if NSRC > 0:
            in_src, in_rest, in_sit = key_classes(pos, h, RdHasTgt, RdSrc, RdTgt, NSRC, NTGT)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for phase in tl.static_range(3):
            if phase == 0:
                m_lo = i_lo
                m_hi = mid_lo
            elif phase == 1:
                m_lo = mid_lo
                m_hi = mid_hi
            else:
                m_lo = mid_hi
                m_hi = i_hi
            qt_ptrs = q_base + m_lo.to(tl.int64) * sqm + (tl.arange(0, BLOCK_M)[None, :] * sqm + offs_d[:, None])
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                if phase != 1:
                    qt = tl.load(qt_ptrs, mask=(offs_m < NQ)[None, :] & dmask[:, None], other=0.0)
                    lse = tl.load(Lse + row_base + offs_m, mask=offs_m < NQ, other=float("inf"))
                elif BLOCK_D == HEAD_D:
                    qt = tl.load(qt_ptrs)
                    lse = tl.load(Lse + row_base + offs_m)
                else:
                    qt = tl.load(qt_ptrs, mask=dmask[:, None], other=0.0)
                    lse = tl.load(Lse + row_base + offs_m)
                if DOT_UPCAST:
                    qt = qt.to(tl.float32)
                qk = tl.dot(k, qt, input_precision=DOT_PREC)                         # [BLOCK_N, BLOCK_M]
                if HAS_SOFTCAP:
                    x2 = (1.0 - 2.0 / (tl.exp(2.0 * qk * (sm_scale / softcap)) + 1.0)) * (softcap * LOG2E)
                else:
                    x2 = qk * (sm_scale * LOG2E)
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # empty rows give 0
                if phase != 1:
                    tt = offs_m + OFF
                    vis = (offs_m < NQ)[None, :] & nmask[:, None]
                    if CAUSAL:
                        vis = vis & (offs_n[:, None] <= tt[None, :])
                    if HAS_WINDOW:
                        vis = vis & ((tt[None, :] - offs_n[:, None]) < window)
                    if RWIN:
                        dd = tt[None, :] - offs_n[:, None]
                        vis = vis & (dd >= ra) & (dd <= rb)
                    x2 = tl.where(vis, x2, float("-inf"))
                p = tl.exp2(x2 - lse2[None, :])
                if NSRC > 0:
                    cs = tl.load(Coef + row_base + offs_m, mask=offs_m < NQ, other=1.0)
                    cr = tl.load(Coef + n_rows + row_base + offs_m, mask=offs_m < NQ, other=1.0)
                    p = p * tl.where(in_src[:, None], cs[None, :], tl.where(in_rest[:, None], cr[None, :], 1.0))
                acc += tl.sum(p, 1)
                qt_ptrs += BLOCK_M * sqm
        if HAS_PAD:
            acc = tl.where(kp, acc, 0.0)
        tl.store(Recv + b64 * srb + h.to(tl.int64) * srh + offs_n, acc, mask=nmask)
