"""The CuTe-DSL half of ``fa4_stats``: FlashAttention-4's sm90 softmax extended with row statistics,
and the kernel subclass that tells it where it is. Imported only when flash_attn.cute (the optional
``headscope[fa4]`` extra) is installed; ``fa4_stats`` documents the method and holds the host side.

Shapes: ``acc_S`` is one thread's fragment of the [tile_m, tile_n] score tile, viewed as
[rows, cols] (``reshape_acc_to_mn``); ``row_max``/``row_sum`` and every statistic accumulator hold
one value per row of that view (FA4's layout: a row is shared by the 4 threads of a quad).
"""
from __future__ import annotations

import math
import operator
import os
from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from flash_attn.cute import flash_fwd_sm90 as fwd90
from flash_attn.cute import utils
from flash_attn.cute.softmax import Softmax
from quack import layout_utils

from .fa4_stats import (COLSUM_PAD, IDX_NONE, P_RECENT, P_SINK, P_SPAN0, P_WDIST, PARAM_POS0, SLOT_ARGMAX,
                        SLOT_DISTANCE, SLOT_ENTROPY, SLOT_MAXP, SLOT_RECENT, SLOT_SPAN0, SLOT_WDIST, env_choice)

LN2 = math.log(2.0)
# How a row's argmax is found in a key block, only by a thread holding the row max of the block (the
# max rose here, or ties it), on the scores. "select" (default): a select chain from the thread's last
# column back (a compare and a select a column, in ARGMAX_CHAINS independent chains, then their min);
# "branch": a compare, a select and a min tree (one instruction a column more). On the H200 (interleaved
# A/B, BENCHMARKS.md, 2026-12-03) "select" took every row statistic 1.2-3.3% less time at d128 16k-32k,
# 8 of 8 pairs. "scan": every column of every block, no branch (slower). Tried and dropped: the searches
# hoisted after every row's max, before any exp (commit 1a81c95: argmax alone 4% fewer cycles, every row
# statistic 3% slower), and after every row's exps, on the exp scores, so that no branch splits the
# rows' code (commit 1863060, "tail": every row statistic 2-4% slower in 8 of 8 interleaved pairs).
ARGMAX_SEARCH = env_choice("HEADSCOPE_FA4S_ARGMAX", "select", ("select", "branch", "scan"))
ARGMAX_CHAINS = 4
# independent partial sums per row reduction (``_tree_sum``), a power of two. 1 is one dependency chain,
# as FA4's own sm90 sums. On the H200 (an interleaved A/B, BENCHMARKS.md) 2 was no faster and
# 4 slower (all rows 0.785x / 0.79x / 0.76x FA4 for 1 / 2 / 4), so 1 stays. ptxas, every row
# statistic at d128: 1 and 2 spill 4 bytes, 4 spills 8 (40 bytes loaded), 8 spills 168
N_PARTIALS = int(os.environ.get("HEADSCOPE_FA4S_PARTIALS", "1"))
# "threshold" (default): a row's frame (the max its exps are taken against) moves only when the
# running max passes it by more than RESCALE_TAU in log2 units, as FA4's sm100 softmax does (its
# rescale_threshold); exps are then at most 2^RESCALE_TAU, every statistic is computed in the frame, and
# O is rescaled only in a warp where some row's frame moved. "always" (FA4's sm90 softmax): each block's
# exps are taken against the row's running max, so O and the sums are rescaled whenever it rises. On
# the H200 (interleaved, BENCHMARKS.md) "threshold" took every row statistic 1-3% less time at 32k (7 of
# 8 pairs, the 8th within 0.3%) and the end-to-end census 0.5-1.2% less (3 of 3); GPU tests pass for both.
RESCALE = env_choice("HEADSCOPE_FA4S_RESCALE", "threshold", ("threshold", "always"))
RESCALE_TAU = 8.0
_CTX = SimpleNamespace()     # trace-time context of the tile being compiled (see begin_tile)


def _locate_tile(mask_fn):
    """Where the tile being traced lies, read from the arguments of FA4's mask call (``mask_fn``, a
    partial of ``AttentionMask.apply_mask``), into the trace context ``_CTX``: tile sizes, packed-GQA
    factor, m_block / batch / head, seqlen_q, this thread's and thread 0's (row, col) coordinates
    of its score fragment (``tScS``, ``t0ScS``, [rows, cols]) and the aux tensors. Returns ``_CTX``."""
    kw = mask_fn.keywords
    mask = mask_fn.func.__self__
    hs = _CTX
    hs.tile_m, hs.tile_n = mask.tile_m, mask.tile_n
    hs.pack = mask.qhead_per_kvhead_packgqa
    hs.m_block, hs.batch, hs.head = kw["m_block"], kw["batch_idx"], kw["head_idx"]
    hs.seqlen_q = mask.seqlen_q
    thr_mma = kw["thr_mma"]
    cS = cute.make_identity_tensor((hs.tile_m, hs.tile_n))
    hs.tScS = layout_utils.reshape_acc_to_mn(thr_mma.partition_C(cS))
    hs.t0ScS = layout_utils.reshape_acc_to_mn(thr_mma.get_slice(0).partition_C(cS))
    hs.aux = kw["aux_data"].tensors
    return hs


class StatsSoftmax(Softmax):
    """FA4's online softmax plus the row statistics above (see the module docstring)."""

    # -- called by the kernel subclass ---------------------------------------------------
    def begin_tile(self, mask_fn, flags):
        """First key block of a tile: where the tile lies (from FA4's own mask call), and fresh
        accumulators. Kept in the module's trace context ``_CTX``, not on the softmax: FA4's
        dataclass is rebuilt from its fields wherever it enters a loop."""
        hs = _locate_tile(mask_fn)
        n = cute.size(self.row_max)
        # per-row thread partials: 0 E, 1 D, 2 band mass, 3 band distance, 4 recent, 5 sink,
        # 6.. spans; best score and its key index
        hs.acc = cute.make_rmem_tensor((n, 6 + flags.n_spans), Float32)
        hs.acc.fill(0.0)
        hs.best_v = cute.make_rmem_tensor(n, Float32)
        hs.best_v.fill(-Float32.inf)
        hs.best_i = cute.make_rmem_tensor(n, Float32)
        hs.best_i.fill(Float32(IDX_NONE))
        # the masses (acc[:, 2:]) are summed in few key blocks, so they keep their own frame (the
        # row max of their last update) instead of being rescaled in every block
        hs.mref = cute.make_rmem_tensor(n, Float32)
        hs.mref.fill(-Float32.inf)
        # RESCALE "threshold": each row's true running max (row_max holds the frame)
        hs.mtrue = cute.make_rmem_tensor(n, Float32)
        hs.mtrue.fill(-Float32.inf)
        hs.mass_cols = ((2, 3) if flags.wdist else ()) + ((4,) if flags.recent else ()) + \
            ((5,) if flags.sink else ()) + tuple(6 + j for j in range(flags.n_spans))
        hs.flags = flags
        hs.out, hs.par = hs.aux[0], hs.aux[1]
        # query position of each of this thread's rows (packed GQA: rows are (t, head) pairs)
        hs.t = cute.make_rmem_tensor(cute.size(self.row_max), Int32)
        for r in range(cute.size(self.row_max)):
            row = hs.m_block * hs.tile_m + hs.tScS[r, 0][0]
            hs.t[r] = row // hs.pack if hs.pack != 1 else row
        shift = hs.par[PARAM_POS0 + hs.batch]          # token position of key index 0
        hs.sink_lim = hs.par[P_SINK] - shift
        hs.span_lo = [hs.par[P_SPAN0 + 2 * j] - shift for j in range(flags.n_spans)]
        hs.span_hi = [hs.par[P_SPAN0 + 2 * j + 1] - shift for j in range(flags.n_spans)]
        hs.R, hs.W = hs.par[P_RECENT], hs.par[P_WDIST]

    def set_block(self, n_block, masked: bool):
        """The key block (index of tile_n keys) the next ``online_softmax`` call works on, and whether
        FA4 masks it (the diagonal and sequence-end blocks; only these hold -inf scores)."""
        _CTX.n_block = n_block
        _CTX.masked = masked

    # -- FA4's hooks -------------------------------------------------------------------
    @cute.jit
    def online_softmax(self, acc_S, is_first: cutlass.Constexpr[bool] = False,
                       check_inf: cutlass.Constexpr[bool] = True):
        """FA4's online softmax of one key block (acc_S: this thread's scores, overwritten with
        exp2(x - m)) -> the per-row rescale factor for O; plus the statistics' thread partials."""
        hs = _CTX
        fl = hs.flags
        S = layout_utils.reshape_acc_to_mn(acc_S)                    # [rows, cols] of this thread
        row_scale = cute.make_fragment_like(self.row_max, Float32)
        sl2 = self.scale_log2
        ncol = cute.size(S, mode=[1])
        col0 = hs.tScS[0, 0][1]                                       # this thread's first column
        s0 = hs.n_block * hs.tile_n + col0                            # its key index in this block
        # column offsets of this thread's scores (compile-time constants)
        cc = cute.make_rmem_tensor_like(S[0, None], Float32)
        for c in cutlass.range_constexpr(ncol):
            cc[c] = Float32(hs.t0ScS[0, c][1])
        ccv = cc.load()
        # which few-key masses this block can hold (same for every row of the tile)
        tile_t0 = hs.m_block * hs.tile_m
        if const_expr(hs.pack != 1):
            tile_t0 = tile_t0 // hs.pack
        blk_lo = hs.n_block * hs.tile_n
        blk_hi = blk_lo + hs.tile_n
        band = 0
        if const_expr(fl.recent):
            band = hs.R
        if const_expr(fl.wdist):
            band = cutlass.max(band, hs.W) if const_expr(fl.recent) else hs.W
        for r in cutlass.range_constexpr(cute.size(self.row_max)):
            x = S[r, None].load()
            m_old = self.row_max[r]                                   # the frame of the sums so far
            m_loc = utils.fmax_reduce(x, init_val=None, arch=self.arch)      # this thread's block max
            m_new = m_loc
            if const_expr(not is_first):
                m_new = cute.arch.fmax(m_loc, m_old if const_expr(RESCALE == "always") else hs.mtrue[r])
            m_new = cute.arch.warp_reduction_max(m_new, threads_in_group=4)     # the row's running max
            frame = m_new
            if const_expr(RESCALE == "threshold"):
                hs.mtrue[r] = m_new
                if const_expr(not is_first):     # (-inf) - (-inf) is NaN: compares false, frame kept
                    frame = m_new if (m_new - m_old) * sl2 > Float32(RESCALE_TAU) else m_old
            self.row_max[r] = frame
            m_use = frame
            if const_expr(check_inf):
                m_use = 0.0 if frame == -Float32.inf else frame
            arg = x * sl2 - m_use * sl2
            e = cute.math.exp2(arg, fastmath=True)
            l_blk = _tree_sum(e)
            l_old = Float32(0.0)
            alpha = Float32(1.0)
            if const_expr(not is_first):
                alpha = cute.math.exp2((m_old - m_use) * sl2, fastmath=True)     # FA4: the safe max (-inf -> 0)
                l_old = self.row_sum[r]
            row_scale[r] = alpha
            self.row_sum[r] = l_old * alpha + l_blk
            # ---- statistics, thread partials in the frame of m_use (the masses: see _to_frame) ----
            if const_expr(fl.entropy):
                shift_e = Float32(0.0)
                if const_expr(not is_first):
                    shift_e = (m_old - m_use) * sl2 * l_old if l_old > 0.0 else Float32(0.0)
                # e (x - m); in a masked block a score is -inf with e = 0: clamp so that 0 * -inf is
                # not NaN (unmasked blocks, the bulk, skip the clamp)
                arg_c = arg
                if const_expr(hs.masked):
                    arg_c = cute.where(arg > Float32(-200.0), arg, Float32(-200.0))
                e_blk = _tree_sum(e, arg_c)
                hs.acc[r, 0] = alpha * (hs.acc[r, 0] + shift_e) + e_blk
            if const_expr(fl.distance):
                base = Float32(hs.t[r] - s0)                          # t - s at this thread's column 0
                ec = _tree_sum(e, ccv)
                hs.acc[r, 1] = alpha * hs.acc[r, 1] + (base * l_blk - ec)
            if const_expr(fl.argmax):
                if const_expr(ARGMAX_SEARCH == "branch"):
                    # only a thread holding the row max in this block searches it (rare: the max
                    # rose here, or ties it)
                    _argmax_search(hs.best_v, hs.best_i, r, (m_loc == m_new) & (m_new > -Float32.inf),
                                   x, m_new, ccv, Float32(s0))
                elif const_expr(ARGMAX_SEARCH == "select"):
                    _argmax_select(hs.best_v, hs.best_i, r, (m_loc == m_new) & (m_new > -Float32.inf),
                                   S, m_new, hs.t0ScS, Float32(s0))
                else:
                    cand = cute.where(x == m_new, ccv, Float32(IDX_NONE))
                    cmin = cand.reduce(cute.ReductionOp.MIN, Float32(IDX_NONE), 0)
                    cmin = cmin if m_new > -Float32.inf else Float32(IDX_NONE)   # a masked row matches -inf
                    hs.best_v[r] = m_new if cmin < Float32(IDX_NONE) else hs.best_v[r]
                    hs.best_i[r] = Float32(s0) + cmin if cmin < Float32(IDX_NONE) else hs.best_i[r]
            S[r, None].store(e)
        # masses on few keys: one runtime branch per key block and kind, over all rows (S now holds e)
        if const_expr(fl.recent or fl.wdist):
            _band_sums(hs.acc, hs.mref, hs.mass_cols, self.row_max, sl2, S, hs.t, blk_hi + band > tile_t0 + 1, ccv,
                       s0, hs.W, hs.R, fl.wdist, fl.recent)
        if const_expr(fl.sink):
            _key_range_sum(hs.acc, hs.mref, hs.mass_cols, self.row_max, sl2, S, 5, blk_lo < hs.sink_lim, ccv, s0,
                           -(1 << 30), hs.sink_lim)
        for j in cutlass.range_constexpr(fl.n_spans):
            _key_range_sum(hs.acc, hs.mref, hs.mass_cols, self.row_max, sl2, S, 6 + j,
                           (blk_lo < hs.span_hi[j]) & (blk_hi > hs.span_lo[j]), ccv, s0,
                           hs.span_lo[j], hs.span_hi[j])
        return row_scale

    @cute.jit
    def finalize(self, final_scale: Float32 = 1.0, sink_val=None):
        """FA4's finalize (row_sum becomes the LSE; returns 1 / l) after summing the statistics over
        each row's quad, then each row's statistics written to the aux buffer."""
        hs = _CTX
        fl = hs.flags
        n = cute.size(self.row_max)
        l_row = cute.make_rmem_tensor(n, Float32)
        l_row.store(utils.warp_reduce(self.row_sum.load(), operator.add, width=4))
        for r in cutlass.range_constexpr(n):
            # masses from their own frames into the row's final one
            _to_frame(hs.acc, hs.mref, r, hs.mass_cols, self.row_max[r], self.scale_log2)
            for j in ((0,) if fl.entropy else ()) + ((1,) if fl.distance else ()) + hs.mass_cols:
                hs.acc[r, j] = utils.warp_reduce(hs.acc[r, j], operator.add, width=4)
            if const_expr(fl.argmax):
                bv = utils.warp_reduce(hs.best_v[r], cute.arch.fmax, width=4)
                bi = hs.best_i[r] if hs.best_v[r] == bv else Float32(IDX_NONE)
                hs.best_i[r] = utils.warp_reduce(bi, cute.arch.fmin, width=4)
        row_scale = Softmax.finalize(self, final_scale, sink_val)           # row_sum becomes the LSE
        # write: the thread holding column 0 of each row, rows inside the sequence
        for r in cutlass.range_constexpr(n):
            row = hs.m_block * hs.tile_m + hs.tScS[r, 0][0]
            t = hs.t[r]
            head = hs.head
            if const_expr(hs.pack != 1):
                head = hs.head * hs.pack + row % hs.pack
            ok = (hs.tScS[0, 0][1] == 0) & (t < hs.seqlen_q)
            l = l_row[r]
            inv = Float32(1.0) / l
            vals = []
            if const_expr(fl.entropy):
                vals.append((SLOT_ENTROPY, cute.math.log(l, fastmath=False) - Float32(LN2) * hs.acc[r, 0] * inv))
            if const_expr(fl.distance):
                vals.append((SLOT_DISTANCE, hs.acc[r, 1] * inv))
            if const_expr(fl.wdist):
                vals.append((SLOT_WDIST, (hs.acc[r, 3] + Float32(hs.W) * (l - hs.acc[r, 2])) * inv))
            if const_expr(fl.recent):
                vals.append((SLOT_RECENT, hs.acc[r, 4] * inv))
            if const_expr(fl.argmax):
                if const_expr(RESCALE == "threshold"):       # the max's exp in the row's frame, over l
                    fr = self.row_max[r]
                    fr = 0.0 if fr == -Float32.inf else fr
                    vals.append((SLOT_MAXP, cute.math.exp2((hs.mtrue[r] - fr) * self.scale_log2, fastmath=True) * inv))
                else:
                    vals.append((SLOT_MAXP, inv))
                vals.append((SLOT_ARGMAX, hs.best_i[r]))
            j0 = SLOT_SPAN0
            if const_expr(fl.sink):
                vals.append((SLOT_SPAN0, hs.acc[r, 5] * inv))
                j0 = SLOT_SPAN0 + 1
            for j in cutlass.range_constexpr(fl.n_spans):
                vals.append((j0 + j, hs.acc[r, 6 + j] * inv))
            for slot, val in vals:
                _store_if(hs.out, slot, hs.batch, head, t, val, ok)
        return row_scale

    @cute.jit
    def rescale_O(self, acc_O: cute.Tensor, row_scale: cute.Tensor) -> None:
        """FA4's rescale of O by each row's factor; with RESCALE "threshold", only in a warp where
        some row's factor is not 1 (its frame moved): multiplying by 1 changes nothing."""
        if const_expr(RESCALE == "threshold"):
            moved = row_scale[0] != Float32(1.0)
            for r in cutlass.range_constexpr(1, cute.size(row_scale)):
                moved = moved | (row_scale[r] != Float32(1.0))
            if cute.arch.vote_any_sync(moved):
                Softmax.rescale_O(self, acc_O, row_scale)
        else:
            Softmax.rescale_O(self, acc_O, row_scale)


class ColSumSoftmax(Softmax):
    """The softmax of the transposed pass (``fa4_stats.received_sums``): rows are keys s, columns
    queries t, and each score becomes ``p = exp2(x - lse2[t])`` with the forward's saved LSE (base 2,
    the second aux tensor: fp32 [B, H, N + pad] seen as fp64 pairs, [B, H, (N + pad) / 2]). Every p is
    <= 1, so the frame is fixed (row max 0) and there is nothing to rescale; the row sum is the key's
    column sum, written by ``finalize`` to the first aux tensor ([1, B, H, N])."""

    def begin_tile(self, mask_fn, ex2_emu: int):
        """First key block of a tile: where it lies (``_locate_tile``); frame 0. ``ex2_emu``: of every
        8 columns, how many take exp2 on the FMA pipe (``fa4_stats.COLSUM_EX2_EMU``)."""
        hs = _locate_tile(mask_fn)
        hs.ex2_emu = ex2_emu
        hs.out, hs.bias = hs.aux[0], hs.aux[1]       # bias: the LSE buffer seen as fp32 pairs (fp64 elements)
        self.row_max.fill(0.0)
        # this thread's columns come in adjacent pairs (2i, 2i + 1) (the accumulator layout), so their
        # LSEs are loaded as 64-bit pairs and viewed as fp32 in registers: half the load instructions
        hs.lse_pairs = cute.make_rmem_tensor(cute.size(hs.tScS[0, None]) // 2, cutlass.Float64)
        hs.lse2 = cute.recast_tensor(hs.lse_pairs, Float32)                 # shaped as a row of acc_S

    def set_block(self, n_block, masked: bool):
        """The column block (index of tile_n queries) of the next ``online_softmax`` call, and its
        queries' LSEs, loaded here, before the kernel issues the block's QK^T, so that the loads
        (L2 latency) overlap the tensor cores instead of stalling the softmax (0.76 instead of 1.0
        FA4 forwards at d128; loading one block further ahead gained nothing more)."""
        hs = _CTX
        hs.n_block = n_block
        # pair index of this thread's column 0 (tile_n, its column and the pad are even)
        h0 = (n_block * hs.tile_n + hs.tScS[0, 0][1] + COLSUM_PAD) // 2
        for i in range(cute.size(hs.lse_pairs)):
            hs.lse_pairs[i] = hs.bias[hs.batch, hs.head, h0 + hs.t0ScS[0, 2 * i][1] // 2]   # constant offsets

    @cute.jit
    def online_softmax(self, acc_S, is_first: cutlass.Constexpr[bool] = False,
                       check_inf: cutlass.Constexpr[bool] = True):
        """acc_S (this thread's scores) -> exp2(x - lse2[t]) in place, added to the row sums;
        returns the rescale factor of O, 1 (the frame never moves)."""
        hs = _CTX
        S = layout_utils.reshape_acc_to_mn(acc_S)                    # [rows, cols] of this thread
        row_scale = cute.make_fragment_like(self.row_max, Float32)
        row_scale.fill(1.0)
        sl2 = self.scale_log2
        n_cols = cute.size(hs.lse2)
        for r in cutlass.range_constexpr(cute.size(self.row_max)):
            for c in cutlass.range_constexpr(n_cols):
                x = S[r, c] * sl2 - hs.lse2[c]
                if const_expr(c % 8 < hs.ex2_emu):     # on the FMA pipe (fa4_stats.COLSUM_EX2_EMU)
                    S[r, c] = utils.ex2_emulation(x, poly_degree=5)    # x <= -127 (masked too): 0
                else:
                    S[r, c] = cute.math.exp2(x, fastmath=True)        # masked: exp2(-inf) = 0
            e = S[r, None].load()
            l_blk = _tree_sum(e)
            if const_expr(is_first):
                self.row_sum[r] = l_blk
            else:
                self.row_sum[r] = self.row_sum[r] + l_blk
            S[r, None].store(e)
        return row_scale

    @cute.jit
    def finalize(self, final_scale: Float32 = 1.0, sink_val=None):
        """Each row's (key's) sum over its quad written to the aux buffer; then FA4's finalize."""
        hs = _CTX
        n = cute.size(self.row_max)
        l_row = cute.make_rmem_tensor(n, Float32)
        l_row.store(utils.warp_reduce(self.row_sum.load(), operator.add, width=4))
        row_scale = Softmax.finalize(self, final_scale, sink_val)
        for r in cutlass.range_constexpr(n):
            s = hs.m_block * hs.tile_m + hs.tScS[r, 0][0]
            _store_if(hs.out, 0, hs.batch, hs.head, s, l_row[r], (hs.tScS[0, 0][1] == 0) & (s < hs.seqlen_q))
        return row_scale


@cute.jit
def _tree_sum(a: cute.TensorSSA, b: cute.TensorSSA | None = None) -> Float32:
    """Sum of one row fragment (``sum a``, or ``sum a * b`` as FMAs) in N_PARTIALS independent partial
    sums: dependency chains of n / N_PARTIALS adds instead of the n of a plain ``reduce`` (which
    FA4's sm90 ``fadd_reduce`` is). Nsight Compute on the H200: the softmax warps' largest stall is
    the wait on such fixed-latency dependencies, and one warp per scheduler runs the softmax."""
    x = cute.make_rmem_tensor(a.shape, Float32)
    x.store(a)
    y = x
    if const_expr(b is not None):
        y = cute.make_rmem_tensor(b.shape, Float32)
        y.store(b)
    n = cute.size(x)
    acc = [x[i] * y[i] if const_expr(b is not None) else x[i] for i in range(N_PARTIALS)]
    for i in cutlass.range_constexpr(N_PARTIALS, n):
        if const_expr(b is not None):
            acc[i % N_PARTIALS] = acc[i % N_PARTIALS] + x[i] * y[i]
        else:
            acc[i % N_PARTIALS] = acc[i % N_PARTIALS] + x[i]
    step = 1
    for _ in cutlass.range_constexpr(N_PARTIALS.bit_length() - 1):      # pairwise: acc[0] += acc[step]...
        for j in cutlass.range_constexpr(0, N_PARTIALS, 2 * step):
            acc[j] = acc[j] + acc[j + step]
        step *= 2
    return acc[0]


def create_colsum_softmax(scale_log2, num_rows, arch=80, softmax_scale=None):
    """Stands in for ``Softmax.create`` while the column-sum kernel is traced."""
    return ColSumSoftmax(scale_log2, num_rows, cute.make_rmem_tensor(num_rows, Float32),
                         cute.make_rmem_tensor(num_rows, Float32), arch, softmax_scale)


def make_colsum_kernel_class(skip_pv: bool = False, ex2_emu: int = 0):
    """FA4's sm90 forward kernel with ``ColSumSoftmax`` (the transposed column-sum pass); with
    ``skip_pv`` its P.V products are not issued (see ``_no_pv``; ptxas then drops P's bf16
    conversion as dead code); ``ex2_emu`` of every 8 columns take exp2 on the FMA pipe."""
    name = f"ColSumFwdSm90_emu{ex2_emu}" + ("_nopv" if skip_pv else "")
    return make_kernel_class(ex2_emu, name=name, skip_pv=skip_pv)


def _no_pv(B_idx=None, zero_init=None, wg_wait: int = -1, **_):
    """Stands in for FA4's ``mma_pv_fn`` when the output is not wanted: an empty WGMMA commit group,
    so that FA4's ``wait_group(n)`` counts (which assume the P.V group) still wait for the QK^T."""
    from cutlass.cute.nvgpu import warpgroup
    warpgroup.fence()
    warpgroup.commit_group()
    if wg_wait >= 0:
        warpgroup.wait_group(wg_wait)


def make_kernel_class(flags, name: str | None = None, skip_pv: bool = False):
    """FA4's sm90 forward kernel whose softmax also keeps ``flags``' statistics (the softmax class
    itself comes from ``Softmax.create``, which ``fa4_stats`` swaps while tracing; ``flags`` is what
    its ``begin_tile`` gets: a ``Flags`` for ``StatsSoftmax``, the ex2 split for ``ColSumSoftmax``).
    ``skip_pv``: the output O is not computed (for the column-sum pass, which only wants the
    softmax's sums). Tried on the H200 and dropped (BENCHMARKS.md, commit 1863060): leaving out FA4's
    warp-scheduler barrier (the consumer warpgroups' turn-taking) made every row statistic
    0.4-4% slower and did not change the column pass consistently."""

    def pv(kw):
        if skip_pv and "mma_pv_fn" in kw:
            kw["mma_pv_fn"] = _no_pv
        return kw

    class StatsFwdSm90(fwd90.FlashAttentionForwardSm90):
        stat_flags = flags

        def last_half_block_overlap(self, *args, **kw):
            return super().last_half_block_overlap(*args, **pv(kw))

        def first_half_block_overlap(self, *args, **kw):
            kw["softmax"].begin_tile(kw["mask_fn"], self.stat_flags)
            kw["softmax"].set_block(kw["n_block"], masked=True)
            return super().first_half_block_overlap(*args, **kw)

        def mma_one_n_block(self, smem_pipe_read, *args, **kw):
            if kw.get("is_first_n_block", False):
                kw["softmax"].begin_tile(kw["mask_fn"], self.stat_flags)
            kw["softmax"].set_block(kw["n_block"], masked=kw.get("mask_fn") is not None)
            return super().mma_one_n_block(smem_pipe_read, *args, **pv(kw))

        def mma_one_n_block_intrawg_overlap(self, smem_pipe_read, *args, **kw):
            kw["softmax"].set_block(kw["n_block"], masked=kw.get("mask_fn") is not None)
            return super().mma_one_n_block_intrawg_overlap(smem_pipe_read, *args, **pv(kw))

    StatsFwdSm90.__name__ = StatsFwdSm90.__qualname__ = name or "StatsFwdSm90_" + "_".join(map(str, map(int, flags)))
    return StatsFwdSm90


@cute.jit
def _argmax_search(best_v: cute.Tensor, best_i: cute.Tensor, r: cutlass.Constexpr[int], active, x, m, ccv, s0):
    """Row r: the first column of this thread whose score x is the block's row max m (``active``: this
    thread holds m in this block); blocks come from the diagonal backwards, so it replaces any earlier
    (later-key) index. The first key of the largest score is the first of the largest probability,
    as ``p.max()`` of the reference picks."""
    if active:
        best_v[r] = m
        best_i[r] = s0 + cute.where(x == m, ccv, Float32(IDX_NONE)).reduce(cute.ReductionOp.MIN, Float32(IDX_NONE), 0)


@cute.jit
def _argmax_select(best_v: cute.Tensor, best_i: cute.Tensor, r: cutlass.Constexpr[int], active, S: cute.Tensor, m,
                   t0ScS: cute.Tensor, s0):
    """As ``_argmax_search``, on row r of S (still the scores): from this thread's last column back,
    each chain keeps the column of the latest match (so the first one in key order), then the least
    column over the ARGMAX_CHAINS chains."""
    if active:
        n = cute.size(S, mode=[1])
        idx = [Float32(IDX_NONE) for _ in range(ARGMAX_CHAINS)]
        for i in cutlass.range_constexpr(n):
            c = n - 1 - i
            j = c % ARGMAX_CHAINS
            idx[j] = Float32(t0ScS[0, c][1]) if S[r, c] == m else idx[j]
        best = idx[0]
        for j in cutlass.range_constexpr(1, ARGMAX_CHAINS):
            best = cute.arch.fmin(best, idx[j])
        best_v[r] = m
        best_i[r] = s0 + best


@cute.jit
def _to_frame(acc: cute.Tensor, mref: cute.Tensor, r: cutlass.Constexpr[int], cols: cutlass.Constexpr, row_max, sl2):
    """Row r's masses (acc[r, c] for c in cols) from their frame mref[r] into that of ``row_max`` (the frame of this
    block's exp scores: 0 for a row with no visible key yet, as FA4's check_inf). The frame's max
    only grows while the masses are not 0; the exponent is capped at 0 so that 0 never meets inf."""
    m = 0.0 if row_max == -Float32.inf else row_max
    f = cute.math.exp2(cute.arch.fmin((mref[r] - m) * sl2, Float32(0.0)), fastmath=True)
    for c in cols:
        acc[r, c] = acc[r, c] * f
    mref[r] = m


@cute.jit
def _band_sums(acc: cute.Tensor, mref: cute.Tensor, cols: cutlass.Constexpr, row_max: cute.Tensor, sl2,
               S: cute.Tensor, t: cute.Tensor, active, ccv, s0, W, R, WDIST: cutlass.Constexpr[bool], RECENT: cutlass.Constexpr[bool]):
    """Each row's window band (t - s < W: mass in acc[r, 2], sum e (t - s) in acc[r, 3]) and recent
    mass (t - s < R, acc[r, 4]), in a key block that can hold such keys (``active``: one runtime
    branch per block). S [rows, cols]: the exp scores in the frame of row_max; t - s = (t_r - s0) - ccv
    (column offsets)."""
    if active:
        for r in cutlass.range_constexpr(cute.size(S, mode=[0])):
            _to_frame(acc, mref, r, cols, row_max[r], sl2)
            e = S[r, None].load()
            d = Float32(t[r] - s0) - ccv
            if const_expr(WDIST):
                inw = d < Float32(W)
                acc[r, 2] = acc[r, 2] + cute.where(inw, e, 0.0).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
                acc[r, 3] = acc[r, 3] + cute.where(inw, e * d, 0.0).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
            if const_expr(RECENT):
                acc[r, 4] = acc[r, 4] + cute.where(d < Float32(R), e, 0.0).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)


@cute.jit
def _key_range_sum(acc: cute.Tensor, mref: cute.Tensor, cols: cutlass.Constexpr, row_max: cute.Tensor, sl2,
                   S: cute.Tensor,
                   j: cutlass.Constexpr[int], active, ccv, s0, lo, hi):
    """acc[r, j] += row r's exp scores over keys lo <= s < hi (s = s0 + ccv), in a block that meets
    the range (``active``)."""
    if active:
        s = Float32(s0) + ccv
        ins = (s >= Float32(lo)) & (s < Float32(hi))
        for r in cutlass.range_constexpr(cute.size(S, mode=[0])):
            _to_frame(acc, mref, r, cols, row_max[r], sl2)
            acc[r, j] = acc[r, j] + cute.where(ins, S[r, None].load(), 0.0).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)


@cute.jit
def _store_if(out: cute.Tensor, slot: cutlass.Constexpr[int], b, h, t, val, ok):
    """out[slot, b, h, t] = val where ``ok`` (one thread per row, rows inside the sequence)."""
    if ok:
        out[slot, b, h, t] = val


def create_stats_softmax(scale_log2, num_rows, arch=80, softmax_scale=None):
    """Stands in for ``Softmax.create`` while a statistics kernel is traced (``fa4_stats.run``)."""
    return StatsSoftmax(scale_log2, num_rows, cute.make_rmem_tensor(num_rows, Float32),
                        cute.make_rmem_tensor(num_rows, Float32), arch, softmax_scale)
