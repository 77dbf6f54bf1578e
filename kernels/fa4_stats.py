"""Row statistics inside FlashAttention-4's Hopper forward: the scores are already in the softmax
warpgroups' registers, so each statistic costs a few register operations per score and no extra
pass (issue #13, "statistics accumulated in the softmax warpgroups").

FlashAttention-4 (``flash_attn.cute``, flash-attn-4 4.0.0b36; Zadouri et al. 2026) runs on sm90 as
FlashAttention-3 does (Shah et al. 2024, "FlashAttention-3: Fast and Accurate Attention with
Asynchrony and Low-precision", Sec. 3.1-3.2): a producer warp loads K/V by TMA while two consumer
warpgroups alternate between their QK^T / PV tensor-core products and their softmax, so CUDA-core
work in the softmax overlaps the other warpgroup's matrix products. Its online softmax lives in one
method, ``Softmax.online_softmax`` (per key block: row max, exp2, row sum, the rescale factor), and
its end in ``Softmax.finalize`` (the LSE). This module extends exactly those two, and nothing else:

* ``StatsSoftmax.online_softmax`` does the same online softmax (sum ``l`` in base 2 of the exps
  against a frame ``m``, every accumulator in that frame and multiplied by ``alpha = exp2(m_old -
  m_new)`` when it moves; Milakov & Gimelshein 2018, Sec. 3). The frame is the running max rounded
  down: it moves to the running max only when that passes it by more than ``RESCALE_TAU`` (8, in
  log2 units), the rule of FA4's sm100 softmax (``fa4_stats_sm90.RESCALE``; "always" follows every
  rise, as FA4's sm90 softmax does). It also keeps, per row and per thread, with ``e = exp2(x - m)``
  (``x`` the base-2 scaled score):

  - entropy: ``E = sum e (x - m)``; moving the frame adds ``l (m_old - m_new)`` before the rescale;
    ``H = ln l - ln2 E / l`` (nats);
  - distance: ``D = sum e (t - s)``; ``distance = D / l``;
  - argmax: the first key whose raw score equals the (quad-wide) running max. Key blocks arrive
    from the diagonal backwards, so a match in a later-visited block has a smaller index and
    replaces an earlier one on ties; ``max_prob = exp2(max - m) / l``;
  - masses on few keys, only in the key blocks that can hold such keys (a runtime branch per
    block): recent ``sum_{t-s<R} e``, the window band ``sum_{t-s<W} e`` and ``sum_{t-s<W} e (t-s)``
    (``window_distance = (band_dist + W (l - band_mass)) / l``), sink ``sum_{s<sink_k} e`` and each
    span ``sum_{a<=s<b} e``.

  The masses change in a few key blocks per row, so they keep their own frame (the row max at
  their last update) and are rescaled only then, and once more in ``finalize``. Thread partials
  are summed across the 4 threads of a row (a quad) in ``finalize``, as FA4 does for ``l``.
* ``StatsSoftmax.finalize`` finishes them and writes one fp32 value per row and statistic to the
  ``[slot, B, H, Q]`` buffer passed as FA4's first aux tensor (the second holds the runtime
  parameters: sink_k, R, W, the span bounds, per-batch position shifts).
* The kernel subclass only tells the softmax which key block it is on (``n_block``) and, on the
  first block of a tile, where the tile lies (``m_block``, batch, head, the thread's MMA slice), all
  read from the mask call FA4 already makes. Nothing else of the kernel changes.

The forward itself (output, LSE, tiles, pipelines, scheduling) is FA4's own. Reference beside the
fast path: ``reference.attention`` (fp32, whole matrix) defines every statistic; the GPU tests
compare with it.

Column sums (``received``) need every row's final LSE, so they come after the forward, from one more
FA4 pass over the transposed problem (``received_sums``: keys as queries, ``ColSumSoftmax`` turns
each score into ``exp2(x - lse2[t])`` and sums it; exact in fp32, no running max).

Contract and limits (``supports`` says why a call is declined): causal self-attention with Q = K,
no window, bf16/fp16, head dims in ``HEAD_DIMS``, FA4 importable on an sm90 GPU; every row statistic of
``StatRequest`` and the column sums over all queries (no ``received_window``, no edits). ``run`` works
on FA4's [B, N, H, d] layout; ``fa4.attention`` calls ``attention``.
"""
from __future__ import annotations

import os

import torch

from .spec import decline_reason

# slots of the statistics buffer [slot, B, H, Q] (fp32); the sink and each span follow SLOT_SPAN0
SLOT_ENTROPY, SLOT_DISTANCE, SLOT_WDIST, SLOT_RECENT, SLOT_MAXP, SLOT_ARGMAX = range(6)
SLOT_SPAN0 = 6
# runtime parameters (int32): sink_k, recent R, window W, then (start, end) per span; per-batch
# position shifts of key index 0 follow at PARAM_POS0
P_SINK, P_RECENT, P_WDIST, P_SPAN0 = 0, 1, 2, 3
MAX_SPANS = 8
PARAM_POS0 = P_SPAN0 + 2 * MAX_SPANS
IDX_NONE = 1 << 30          # "no argmax in this thread yet" (exact in fp32)
_LOG2E = 1.4426950408889634


class Flags(tuple):
    """Compile-time switches of one kernel variant: (entropy, distance, argmax, recent, wdist,
    sink, n_spans)."""

    __slots__ = ()

    def __new__(cls, entropy=False, distance=False, argmax=False, recent=False, wdist=False,
                sink=False, n_spans=0):
        return super().__new__(cls, (bool(entropy), bool(distance), bool(argmax), bool(recent),
                                     bool(wdist), bool(sink), int(n_spans)))

    entropy = property(lambda s: s[0])
    distance = property(lambda s: s[1])
    argmax = property(lambda s: s[2])
    recent = property(lambda s: s[3])
    wdist = property(lambda s: s[4])
    sink = property(lambda s: s[5])
    n_spans = property(lambda s: s[6])

    @property
    def n_slots(self) -> int:
        """Rows of the statistics buffer this variant writes."""
        return SLOT_SPAN0 + (1 if self.sink else 0) + self.n_spans


# statistics computed here: every row statistic of StatRequest in the forward, and the column sums over
# all queries (``received``) in one transposed pass after it; not received_window, not edits
SUPPORTED_STATS = frozenset({"sink_k", "spans", "entropy", "distance", "window_distance", "recent", "argmax",
                             "received"})
# head dims the probe routes here: d64, d128 and d256 (each at its tile in ``ROWS_TILES``), and any other
# head dim given a tile in HEADSCOPE_FA4S_TILES. ``attention`` itself runs any head dim FA4 takes.
HEAD_DIMS = frozenset({64, 128, 256})

_KERNELS: dict = {}
_CACHES: dict = {}
_importable = None


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``name`` (``default`` when unset), one of ``choices``; any
    other value is a ValueError that names the variable and the choices (the kernel switches below
    and in ``fa4_stats_sm90``: a typo must not fall back to a default without a word)."""
    value = os.environ.get(name, default)
    if value not in choices:
        allowed = ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"
        raise ValueError(f"{name} must be {allowed}, not {value!r}")
    return value


def env_tiles(name: str) -> dict[int, tuple[int, int]]:
    """Tile sizes per head dim from environment variable ``name``: "" (unset) for none, else
    comma-separated ``d:MxN`` items (e.g. "64:128x96,128:128x112"); anything else is a ValueError
    that names the variable and says what it takes."""
    tiles = {}
    for item in filter(None, os.environ.get(name, "").split(",")):
        try:
            d, mn = item.split(":")
            m, n = mn.split("x")
            d, m, n = int(d), int(m), int(n)
        except ValueError:
            raise ValueError(f"{name} takes comma-separated d:MxN items, e.g. '64:128x96', not {item!r}") from None
        if d not in (64, 128, 256) or m not in (64, 128, 192) or n % 16 or not 64 <= n <= 192:
            raise ValueError(f"{name}: {item!r} needs d 64, 128 or 256, M 64, 128 or 192, "
                             "and N a multiple of 16 from 64 to 192")
        tiles[d] = (m, n)
    return tiles


def importable() -> bool:
    """flash_attn.cute's sm90 kernel and the CuTe DSL import (cached)."""
    global _importable
    if _importable is None:
        try:
            from . import fa4_stats_sm90  # noqa: F401
            _importable = True
        except Exception:  # noqa: BLE001  (not installed, or its CUDA libraries do not load)
            _importable = False
    return _importable


def supports(q, k, stats, *, causal: bool = True, sliding_window: int | None = None) -> str | None:
    """None when this path can compute ``stats`` for q [B, H, N, d], k [B, G, N, d] (the shape,
    dtype and device checks of ``fa4.supports`` come first), else why not (one line)."""
    name = "FlashAttention-4 with in-kernel statistics"
    if stats is None:
        return f"{name} is for calls with statistics"
    reason = decline_reason(name, SUPPORTED_STATS, frozenset(), stats, None)
    if reason is not None:
        return reason
    if not causal or q.shape[2] != k.shape[2]:
        return f"{name} takes causal self-attention with as many queries as keys"
    if sliding_window is not None and sliding_window < k.shape[2]:
        return f"{name} does not take a sliding window"
    if q.shape[-1] not in HEAD_DIMS | set(ROWS_TILES):
        return (f"{name} takes head dims {sorted(HEAD_DIMS)} (others with a tile in HEADSCOPE_FA4S_TILES), "
                f"got {q.shape[-1]}")
    if len(stats.spans) > MAX_SPANS:
        return f"{name} takes up to {MAX_SPANS} spans, got {len(stats.spans)}"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"{name} runs on Hopper (sm90) GPUs"
    if not importable():
        return f"{name} needs flash_attn.cute (pip install headscope[fa4])"
    return None


def _run_variant(key, make_class, create_softmax, q, k, v, **fa_kwargs):
    """FA4's ``_flash_attn_fwd`` with the kernel class ``make_class()`` and its softmax from
    ``create_softmax``, compiled once per ``key`` into this module's own cache."""
    from flash_attn.cute import interface
    from flash_attn.cute.softmax import Softmax
    if key not in _KERNELS:
        _KERNELS[key] = make_class()
        _CACHES[key] = {}
    # FA4 compiles the kernel class named in its interface module, whose softmax comes from
    # Softmax.create, into its compile cache; for this variant all three are ours, for this call only
    saved = (interface.FlashAttentionForwardSm90, Softmax.__dict__["create"], interface._flash_attn_fwd.compile_cache)
    interface.FlashAttentionForwardSm90 = _KERNELS[key]
    Softmax.create = staticmethod(create_softmax)
    interface._flash_attn_fwd.compile_cache = _CACHES[key]
    try:
        return interface._flash_attn_fwd(q, k, v, pack_gqa=False, **fa_kwargs)
    finally:
        interface.FlashAttentionForwardSm90, Softmax.create, interface._flash_attn_fwd.compile_cache = saved


# the row-statistics kernel's tile (query rows x key columns) per head dim, where it differs from FA4's
# choice (d64: 192x128, three consumer warpgroups; d128: 128x128; d256: 128x80). The statistics need
# registers that FA4's tiles do not leave: ptxas, every row statistic, spills (stores/loads, bytes) at
# FA4's tiles: d64 1712/2060 (192 rows leave 128 registers a thread), d128 12/48, d256 224/232; at
# d64 128x128 4/8 and 128x96 none, d128 128x112 and 128x96 none, d256 128x64 8/48. Fewer columns also
# mean less code (all rows at d128: 218 MUFU.EX2 and 1610 FADD in SASS at 128 columns, 170 and 1226 at
# 96), at the price of more key blocks, each with its fixed cost (max shuffles, barriers).
# Measured on the H200 (BENCHMARKS.md, "Row-kernel tiles", 2026-12-02, interleaved, every row statistic):
# d64 at 128x128 runs 0.52x/0.61x FA4 at 16k/32k against 0.39x/0.50x on the Triton kernels (and 0.38x
# at FA4's 192x128), d256 at 128x64 0.88x/0.93x against 0.81x/0.85x at 128x80; at d128, 128x112 and
# 128x96 were slower than FA4's 128x128 (0.73-0.79x against 0.79-0.83x), so d128 keeps it.
# HEADSCOPE_FA4S_TILES="64:128x96,128:128x112" overrides them per head dim (``env_tiles``).
DEFAULT_ROWS_TILES = {64: (128, 128), 256: (128, 64)}
ROWS_TILES = {**DEFAULT_ROWS_TILES, **env_tiles("HEADSCOPE_FA4S_TILES")}
# where the row kernel's P.V product reads P at d <= 128: "registers" (FA4's choice at d128 and d64:
# the WGMMA takes P from registers) or "smem" (P stored to shared memory first, as FA4 does at
# d 80-96; no spills at d128, one shared-memory round trip of P per block). On the H200 "smem" was 3-6%
# slower at d128 in every interleaved pair (BENCHMARKS.md, "Row-kernel tiles"): the default stays.
ROWS_P = env_choice("HEADSCOPE_FA4S_P", "registers", ("registers", "smem"))


def run(q, k, v, *, scaling: float, flags: Flags, params: torch.Tensor, out_stats: torch.Tensor):
    """FA4's causal forward with row statistics. q [B, N, H, d], k, v [B, N, G, d] (FA4's layout),
    ``params`` int32 [PARAM_POS0 + B] on q's device, ``out_stats`` fp32 [flags.n_slots, B, H, N]
    (written). Returns (out [B, N, H, d], lse [B, H, N])."""
    from . import fa4_stats_sm90 as k90
    d = q.shape[-1]
    tiles = {}
    if d in ROWS_TILES:
        tiles["tile_mn"] = ROWS_TILES[d]
    if d <= 128 and ROWS_P == "smem":
        tiles["mma_pv_is_rs"] = False
    res = _run_variant((flags, k90.ARGMAX_SEARCH, k90.RESCALE), lambda: k90.make_kernel_class(flags),
                       k90.create_stats_softmax,
                       q, k, v, softmax_scale=float(scaling), causal=True, return_lse=True,
                       aux_tensors=[out_stats, params], **tiles)
    return res[0], res[1]


# width of the transposed pass's value tensor: its output is thrown away (and, by default, P.V not run)
COLSUM_DV = 16
# columns (queries) per tile of the transposed pass at d <= 128 (FA4's: 128). Without P.V its threads
# have registers to spare: ptxas spills nothing up to 176 columns at 192 rows (192 columns: 8 bytes).
# Wider tiles share each block's fixed cost (barriers, the LSE loads' latency) among more exps. On the
# H200 (BENCHMARKS.md, "Row-kernel tiles", interleaved): at d64, 160 columns ran the pass in 1.80 ms
# at 32k against 2.04-2.06 at 128 (144 and 176: 1.83-1.84); at d128 no width was faster in every
# pair (Qwen2.5-7B 32k: 7.20-7.25 ms at 128, 7.33-7.56 wider), so d128 (and d256, where FA4's tile
# applies) keep 128. HEADSCOPE_FA4S_COLSUM_TILE_N=144..192 sets one width for every head dim.
DEFAULT_COLSUM_TILE_N = {64: 160}
COLSUM_TILE_N = env_choice("HEADSCOPE_FA4S_COLSUM_TILE_N", "auto", ("auto", "128", "144", "160", "176", "192"))


def colsum_tile_n(d: int) -> int:
    """Query columns per tile of the transposed pass at head dim ``d`` (``COLSUM_TILE_N``)."""
    return DEFAULT_COLSUM_TILE_N.get(d, 128) if COLSUM_TILE_N == "auto" else int(COLSUM_TILE_N)


# zeros on both sides of the LSE buffer of the transposed pass (>= every tile_n it runs with): the last
# column block reads past N into zeros, never outside the buffer
COLSUM_PAD = 192
# how the transposed pass keeps t >= s: "causal" (both sequences reversed, so that it is FA4's causal
# mask and persistent longest-first scheduler) or "local" (FA4's local mask with window (0, none), no
# reversal copies). On the H200 (benchmarks/colsum_ab.py) "causal" with tile_m 192 was fastest.
COLSUM_MASK = env_choice("HEADSCOPE_FA4S_COLSUM", "causal", ("causal", "local"))
# rows (keys) per tile of the transposed pass at d <= 128: 192 runs three consumer warpgroups, so each
# loaded query tile serves 1.5x the keys (5-6% faster than FA4's own 128); 0 keeps FA4's choice
COLSUM_TILE_M = int(os.environ.get("HEADSCOPE_FA4S_COLSUM_TILE_M", "192"))
# "skip" (default): the transposed pass issues no P.V product at all (its output is thrown away; an
# empty WGMMA group keeps FA4's wait counts): 0.62 instead of 0.67 FA4 forwards at 32k on the H200,
# within 9e-7 of the reference at d128 and d256, GPU tests passed; "keep": FA4's own P.V on a zero V
COLSUM_PV = env_choice("HEADSCOPE_FA4S_COLSUM_PV", "skip", ("skip", "keep"))
# of every 8 columns of the transposed pass, how many take exp2 as a degree-5 polynomial on the FMA
# pipe (FA4's ``utils.ex2_emulation``: 2^floor(x) through the exponent bits, 2^frac(x) by Horner;
# relative error 1.5e-7 in fp32, the class of the MUFU's own ex2.approx; x <= -127, masked scores
# included, gives 0) instead of the MUFU (16 results per SM and clock), which, with the QK^T, bounds a pass
# whose tensor cores run QK^T only. 0: every exp2 on the MUFU.
COLSUM_EX2_EMU = int(os.environ.get("HEADSCOPE_FA4S_COLSUM_EMU", "0"))
_ZEROS: dict = {}


def received_sums(q, k, lse, *, scaling: float) -> torch.Tensor:
    """Column sums of causal self-attention, ``received_sum[b, h, s] = sum_{t >= s} p[t, s]``, from the
    forward's LSE: q [B, H, N, d], k [B, G, N, d], lse [B, H, N] (natural log) -> [B, H, N] fp32.

    One FA4 pass over the *transposed* problem (issue #13: "column sums are the exponentiated LSE of a
    transposed attention"): the keys are its queries (each query head's KV head, so GQA costs a copy
    of K per query head), the queries its keys, and t >= s is FA4's causal mask once both sequences
    are reversed (``COLSUM_MASK``). Its softmax is ``ColSumSoftmax``: ``p = exp2(x log2e - lse[t]
    log2e)``, exact in fp32 and never above 1, summed along the row; no running max, no rescale.
    FA4 always multiplies P by V; here that product is not issued (``COLSUM_PV``), and V is a
    COLSUM_DV-wide zero tensor that only fills FA4's arguments."""
    from . import fa4_stats_sm90 as k90
    B, H, N, d = q.shape
    G = k.shape[1]
    flip = COLSUM_MASK == "causal"
    kk = k.flip(2) if flip else k
    kx = kk.repeat_interleave(H // G, dim=1) if G != H else kk                   # [B, H, N, d]
    qq = q.flip(2) if flip else q
    # even length: the kernel loads the LSEs as fp32 pairs (one 64-bit load per two columns)
    lse2 = torch.zeros(B, H, N + 2 * COLSUM_PAD + N % 2, dtype=torch.float32, device=q.device)
    lse2[..., COLSUM_PAD:COLSUM_PAD + N] = (lse.flip(2) if flip else lse) * _LOG2E
    out = torch.empty(1, B, H, N, dtype=torch.float32, device=q.device)
    zkey = (B, N, H, q.dtype, q.device)
    if zkey not in _ZEROS:
        _ZEROS.clear()
        _ZEROS[zkey] = torch.zeros(B, N, H, COLSUM_DV, dtype=q.dtype, device=q.device)
    mask = dict(causal=True) if flip else dict(causal=False, window_size_left=0, window_size_right=None)
    tile_n = colsum_tile_n(d)
    if COLSUM_TILE_M and d <= 128:
        mask["tile_mn"] = (COLSUM_TILE_M, tile_n)
    skip, emu = COLSUM_PV == "skip", COLSUM_EX2_EMU
    _run_variant(("colsum", flip, COLSUM_TILE_M, tile_n, skip, emu),
                 lambda: k90.make_colsum_kernel_class(skip, emu),
                 k90.create_colsum_softmax, kx.transpose(1, 2), qq.transpose(1, 2), _ZEROS[zkey],
                 softmax_scale=float(scaling), return_lse=False, aux_tensors=[out, lse2.view(torch.float64)], **mask)
    return out[0].flip(2) if flip else out[0]


def flags_for(stats) -> Flags:
    """The forward kernel variant a ``StatRequest`` needs (its row statistics; column sums run after it)."""
    return Flags(entropy=stats.entropy, distance=stats.distance, argmax=stats.argmax, recent=bool(stats.recent),
                 wdist=bool(stats.window_distance), sink=bool(stats.sink_k), n_spans=len(stats.spans))


def attention(q, k, v, *, scaling: float, stats, key_pos0: torch.Tensor | None = None):
    """Causal self-attention (Q = K) with statistics: q [B, H, N, d], k, v [B, G, N, d] ->
    (out [B, H, N, d] in q's dtype, dict of ``spec.StatRequest``'s row statistics + ``lse``, fp32
    [B, H, N]; ``argmax`` int64; with ``received``, ``received_sum`` [B, H, N] and
    ``received_count`` [B, N]). ``key_pos0`` [B]: the token position of key 0 (default 0), for
    sink and span positions. The caller checks ``fa4.supports``-style limits; see ``supports``."""
    B, H, N, d = q.shape
    if len(stats.spans) > MAX_SPANS:
        raise ValueError(f"fa4_stats takes up to {MAX_SPANS} spans, got {len(stats.spans)}")
    fl = flags_for(stats)
    par = [0] * PARAM_POS0
    par[P_SINK], par[P_RECENT], par[P_WDIST] = int(stats.sink_k or 0), int(stats.recent or 0), int(stats.window_distance or 0)
    for j, (a, b) in enumerate(stats.spans):
        par[P_SPAN0 + 2 * j], par[P_SPAN0 + 2 * j + 1] = int(a), int(b)
    params = torch.tensor(par, dtype=torch.int32).to(q.device, non_blocking=True)
    pos0 = (key_pos0.to(device=q.device, dtype=torch.int32).reshape(B) if key_pos0 is not None
            else torch.zeros(B, dtype=torch.int32, device=q.device))
    params = torch.cat([params, pos0])
    buf = torch.empty(fl.n_slots, B, H, N, dtype=torch.float32, device=q.device)
    out, lse = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scaling=scaling, flags=fl,
                   params=params, out_stats=buf)
    res = {"lse": lse.float().view(B, H, N)}                 # FA4's LSE is [B, H, N]
    if fl.entropy:
        res["entropy"] = buf[SLOT_ENTROPY]
    if fl.distance:
        res["distance"] = buf[SLOT_DISTANCE]
    if fl.wdist:
        res["window_distance"] = buf[SLOT_WDIST]
    if fl.recent:
        res["recent_mass"] = buf[SLOT_RECENT]
    if fl.argmax:
        res["max_prob"] = buf[SLOT_MAXP]
        res["argmax"] = buf[SLOT_ARGMAX].long() + pos0.long().view(B, 1, 1)   # key index -> position
    j = SLOT_SPAN0
    if fl.sink:
        res["sink_mass"] = buf[j]
        j += 1
    if fl.n_spans:
        res["span_mass"] = buf[j:j + fl.n_spans].permute(1, 2, 3, 0)
    if stats.received:
        res["received_sum"] = received_sums(q, k, res["lse"], scaling=scaling)
        # causal, Q = K: key s is seen by the N - s queries t >= s
        res["received_count"] = (N - torch.arange(N, device=q.device, dtype=torch.float32)).expand(B, N).contiguous()
    return out.transpose(1, 2), res
