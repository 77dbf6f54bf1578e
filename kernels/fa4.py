"""Optional FlashAttention-4 backend (``pip install headscope[fa4]``): plain attention and the
statistics that follow from its row log-sum-exp alone.

FlashAttention-4 (Zadouri, Hoehnerbach, Shah, Liu, Thakkar and Dao 2026, "FlashAttention-4:
Algorithm and Kernel Pipelining Co-Design for Asymmetric Hardware Scaling"; the CuTe-DSL kernels
``flash_attn.cute`` of the flash-attention repository, with a Hopper path beside the Blackwell one)
is the fastest attention forward measured on the H200 (BENCHMARKS.md). With ``return_lse=True`` it
also returns each row's natural-log log-sum-exp ``lse[t] = log sum_s exp(scale * q_t . k_s)`` over
the keys row t may see (the statistic FlashAttention keeps for its backward pass: Dao et al. 2022,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", Sec. 3.1). With the
LSE in hand every probability is one score away:

    p[t, s] = exp(scale * q_t . k_s - lse[t])          (exact)

so a statistic that is a *mass on a few keys* needs the scores of those keys only, not another
pass over the whole row (the lever of issue #13 "kernels at the speed of the best"):

- ``sink_mass``: keys at positions s < sink_k; ``span_mass``: the keys of each span;
- ``recent_mass``: the band t - recent < s <= t;
- ``window_distance`` = sum_s p min(t - s, W) = sum_{t-s<W} p (t - s) + W (1 - sum_{t-s<W} p):
  the band of W keys plus the row total, which is 1;
- ``lse`` itself.

``masses_from_lse`` computes them in fp32 PyTorch from q, k and the LSE (batched over heads, in
query chunks, so memory stays O(Q · band)); it does not depend on FlashAttention and the CPU tests
hold it to ``reference.attention``. Entropy, mean distance and argmax / max_prob need every key of a
row (or the forward loop itself): with the real FlashAttention-4 on Hopper, causal Q = K, no window,
d in ``fa4_stats.HEAD_DIMS``, every row statistic is computed inside FA4's own softmax instead
(``fa4_stats``, which ``attention`` calls), and column sums over all queries in one transposed FA4
pass after it. Outside that (e.g. ``received_window``, or a stand-in FA4), requests are declined
here (``supports``) and the probe runs them on the Triton kernels with one message.

    from headscope.kernels import fa4
    if fa4.available(q) and fa4.supports(q, k, v, stats, None) is None:
        out, st = fa4.attention(q, k, v, scaling=d ** -0.5, stats=stats)   # out [B, H, Q, d]

Same contract as ``triton_attention.attention``: ``out`` [B, H, Q, d] in q's dtype (a view of
FA4's [B, Q, H, d] output), a dict with the keys of ``spec.expected_keys(stats)`` (fp32), and this
module's ``Unsupported`` (the probe catches it, says why once and falls back) for what this
backend cannot do: dtypes other than bf16/fp16, head dims outside ``HEAD_DIMS``, a
padding mask, softcap, learned sinks (s_aux), any probability edit, inputs that require grad,
causal calls with 1 < Q < K (prefill onto a cache), a sliding window without causality, and the
statistic fields outside ``SUPPORTED_STATS``.

FA4's API (flash-attn-4 4.0.0b36; imported and timed on the H200 on 2026-12-01): q, k, v are
[B, N, H, d] (fewer KV heads for GQA; the last dim contiguous), ``flash_attn_func(q, k, v,
softmax_scale=, causal=, window_size=(left, right), return_lse=)`` returns ``(out [B, N, H, d],
lse)``, the LSE fp32 [B, H, N] in its ``_flash_attn_fwd`` (``lse_shape = (batch, num_head,
seqlen_q)``); ``_lse_bhq`` also accepts [B, N, H] and refuses any other shape, and the GPU tests
hold it to the reference. A window ``(left, 0)`` lets query t see keys t - left .. t, so HF's
``sliding_window`` W (t - s < W) is ``left = W - 1``. Only Q = K (where FA4's bottom-right mask
alignment and the top-left one agree) and Q = 1 (sent without a mask, over the last W keys) are
used here.
"""
from __future__ import annotations

import os

import torch

from . import fa4_stats
from .device_cache import off_current_device
from .spec import LayerEdits, StatRequest, decline_reason


class Unsupported(Exception):
    """The FlashAttention-4 backend cannot do this call (the message says why); the caller falls back."""


# Statistic fields computed from the LSE (``lse`` itself is always returned with statistics).
SUPPORTED_STATS = frozenset({"sink_k", "spans", "recent", "window_distance"})
SUPPORTED_EDITS: frozenset[str] = frozenset()
# head dims the FA4 sm90 path ran on the H200 (BENCHMARKS.md: d64, d128, d256); others decline
HEAD_DIMS = frozenset({64, 128, 256})
DTYPES = (torch.bfloat16, torch.float16)
# limits of the LSE path (the extra scores grow as Q x band): past them the Triton kernels' single pass
# runs the request (the crossover is not measured)
MAX_BAND = 4096           # max(recent, window_distance)
MAX_SUBSET_KEYS = 4096    # sink_k + total span length
# Decoding (Q = 1) stays on SDPA / the Triton decode path in the probe unless this is True:
# flash_attn_func runs one query without key splits by default (num_splits=1), one program per
# (batch, KV head), while SDPA and triton_decode split the keys and sit near the K/V read floor
# (BENCHMARKS.md, decode table). ``attention`` itself takes Q = 1 either way.
DECODE = False
# queries per band block (scores [block, block + band - 1] each) and the fp32 score memory per chunk
BAND_BLOCK = 32
CHUNK_BYTES = 1 << 28

_impl = None              # the flash_attn_func in use (None: not resolved yet; False: not importable)
_import_error = ""
_any_device = False       # set_impl(..., any_device=True): a stand-in that runs on CPU tensors
_capability: dict = {}
_strided_ok = True        # FA4 takes strided [B, N, H, d] views (cleared if it ever refuses one)


def set_impl(fn, any_device: bool = False) -> None:
    """Use ``fn`` (same signature and results as ``flash_attn.cute.flash_attn_func``) instead of
    FlashAttention-4, e.g. a PyTorch stand-in in tests; ``any_device=True`` lets it run on CPU
    tensors. ``set_impl(None)`` goes back to importing FlashAttention-4."""
    global _impl, _any_device, _import_error
    _impl, _any_device, _import_error = (fn if fn is not None else None), bool(any_device and fn is not None), ""


def _load():
    """flash_attn.cute.flash_attn_func, imported once (None if it cannot be imported)."""
    global _impl, _import_error
    if _impl is None:
        try:
            from flash_attn.cute import flash_attn_func
            _impl = flash_attn_func
        except ModuleNotFoundError as e:  # not installed: the optional extra, nothing to report
            _impl = False
            if not (e.name or "").startswith("flash_attn"):
                _import_error = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001  (installed, but it or its CUDA libraries do not load)
            _impl, _import_error = False, f"{type(e).__name__}: {e}"
    return _impl or None


def import_error() -> str:
    """Why an installed FlashAttention-4 could not be imported ('' if it was imported, is simply not
    installed, or was not tried yet)."""
    return _import_error


def _device_ok(dev: torch.device) -> bool:
    if _any_device:
        return True
    if dev.type != "cuda":
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _capability:
        _capability[idx] = torch.cuda.get_device_capability(idx)[0]
    return _capability[idx] in (9, 10, 11)            # Hopper (sm90), Blackwell (sm100 / sm110)


def available(x: torch.Tensor | torch.device | str | None = None) -> bool:
    """FlashAttention-4 is importable and can run on ``x``'s device (a tensor or device; default:
    the current CUDA device): a Hopper or Blackwell GPU. False when ``HEADSCOPE_NO_FA4=1``.
    The import and the device check are cached."""
    if os.environ.get("HEADSCOPE_NO_FA4", "0") not in ("", "0"):
        return False
    if x is None:
        if not _any_device and not torch.cuda.is_available():
            return False
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    if not _any_device and dev.type != "cuda":
        return False
    return _load() is not None and _device_ok(dev)


def _band(stats: StatRequest) -> int:
    return max(stats.recent or 0, stats.window_distance or 0)


def supports(q, k, v, stats: StatRequest | None, edits: LayerEdits | None, *, causal: bool = True,
             sliding_window: int | None = None, key_padding: torch.Tensor | None = None,
             softcap: float | None = None, sinks: bool = False, grad: bool = False) -> str | None:
    """None when this backend can run the call, else the reason it declines (one line). Checks the
    request (statistics, edits, sinks, softcap, padding, grad) and the shapes, dtypes and device of
    q [B, H, Q, d], k, v [B, G, K, d]; not whether FlashAttention-4 is installed (``available``)."""
    name = "the FlashAttention-4 backend"
    if sinks:
        return f"{name} does not take learned attention sinks (s_aux)"
    if softcap is not None:
        return f"{name} does not apply a softcap"
    if key_padding is not None:
        return f"{name} does not take a padding mask"
    if grad:
        return f"{name} is used for inference only (an input requires grad; use torch.no_grad())"
    if edits is not None and not edits.empty:
        return decline_reason(name, SUPPORTED_STATS, SUPPORTED_EDITS, None, edits)
    if stats is not None:
        reason = decline_reason(name, SUPPORTED_STATS, SUPPORTED_EDITS, stats, None)
        in_kernel = _in_kernel(q, k, stats, causal, sliding_window)   # None: fa4_stats takes all of it
        if reason is not None and in_kernel is not None:
            return reason + (" (it computes sink, span, recent and window-distance masses and the LSE; the rest "
                             "needs its in-kernel variant: " + in_kernel + ")")
        if not causal:
            return f"{name} computes statistics of causal attention only"
        if _band(stats) > MAX_BAND and in_kernel is not None:
            return f"{name} takes recent / window_distance bands up to {MAX_BAND} keys, got {_band(stats)}"
        n_sub = stats.sink_k + sum(b - a for a, b in stats.spans)
        if n_sub > MAX_SUBSET_KEYS and in_kernel is not None:
            return f"{name} takes up to {MAX_SUBSET_KEYS} sink and span keys, got {n_sub}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"{name} needs q, k, v as [batch, heads, len, head_dim]"
    B, H, Q, d = q.shape
    G, K = k.shape[1], k.shape[2]
    if tuple(k.shape) != (B, G, K, d) or v.shape != k.shape:
        return f"{name}: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}"
    if G == 0 or H % G:
        return f"{name}: {H} query heads are not a multiple of {G} KV heads"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"{name} takes bf16 or fp16 q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}"
    if d not in HEAD_DIMS:
        return f"{name} takes head dims {sorted(HEAD_DIMS)}, got {d}"
    if Q == 0 or Q > K:
        return f"{name} needs 0 < Q <= K (queries are the last Q keys), got Q={Q}, K={K}"
    window = sliding_window is not None and sliding_window < K
    if causal and 1 < Q < K:
        return f"{name} does not take causal prefill onto a cache (1 < Q < K)"
    if window and not causal:
        return f"{name} takes a sliding window with causal attention only"
    if sliding_window is not None and sliding_window < 1:
        return f"{name}: sliding_window must be >= 1, got {sliding_window}"
    if not (q.device == k.device == v.device) or not (_any_device or q.is_cuda):
        return f"{name} runs on CUDA tensors (q on {q.device}, k on {k.device}, v on {v.device})"
    return None


def _in_kernel(q, k, stats, causal, sliding_window) -> str | None:
    """None when ``fa4_stats`` (statistics inside FA4's sm90 softmax) takes this request with the real
    FlashAttention-4 (not a ``set_impl`` stand-in), else why not."""
    if _impl is not None and _impl is not False and getattr(_impl, "__module__", "").split(".")[0] != "flash_attn":
        return "a stand-in FlashAttention-4 (set_impl) has no in-kernel statistics"
    if q.dim() != 4 or k.dim() != 4:
        return "q and k must be [batch, heads, len, head_dim]"
    return fa4_stats.supports(q, k, stats, causal=causal, sliding_window=sliding_window)


def _lse_bhq(lse: torch.Tensor | None, B: int, H: int, Q: int) -> torch.Tensor:
    """FA4's LSE as [B, H, Q] fp32: it documents [B, H, Q]; [B, Q, H] is accepted too (H != Q)."""
    if lse is None:
        raise Unsupported("FlashAttention-4 returned no LSE although return_lse=True was passed")
    if tuple(lse.shape) == (B, H, Q):
        return lse.float()
    if tuple(lse.shape) == (B, Q, H):
        return lse.transpose(1, 2).float()
    raise Unsupported(f"FlashAttention-4 returned an LSE of shape {tuple(lse.shape)}; expected [B, H, Q] = "
                      f"{(B, H, Q)}")


def attention(q, k, v, *, scaling: float, causal: bool = True, sliding_window: int | None = None,
              key_padding: torch.Tensor | None = None, softcap: float | None = None,
              key_pos0: torch.Tensor | None = None, stats: StatRequest | None = None,
              edits: LayerEdits | None = None, sinks: torch.Tensor | None = None):
    """q [B, H, Q, d], k, v [B, G, K, d] -> (out [B, H, Q, d] in q's dtype, stats dict), as
    ``triton_attention.attention``; raises ``Unsupported`` for what ``supports`` declines, when
    FlashAttention-4 is not available, or when it fails on the call (the message says why)."""
    if off_current_device(q):                   # its kernels launch on the current device: switch to q's
        with torch.cuda.device(q.device):
            return attention(q, k, v, scaling=scaling, causal=causal, sliding_window=sliding_window,
                             key_padding=key_padding, softcap=softcap, key_pos0=key_pos0, stats=stats,
                             edits=edits, sinks=sinks)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    reason = supports(q, k, v, stats, edits, causal=causal, sliding_window=sliding_window,
                      key_padding=key_padding, softcap=softcap, sinks=sinks is not None, grad=grad)
    if reason is not None:
        raise Unsupported(reason)
    fn = _load()
    if fn is None or not _device_ok(q.device):
        raise Unsupported("FlashAttention-4 is not available here" + (f" ({_import_error})" if _import_error else ""))
    B, H, Q, d = q.shape
    K = k.shape[2]
    window = sliding_window if sliding_window is not None and sliding_window < K else None
    kk, vv, fa_causal, win = k, v, causal, (None, None)
    if Q == 1 and causal:
        # one query sees every cached key (or the last `window` of them): no mask at all
        fa_causal = False
        if window is not None:
            kk, vv = k[:, :, K - window:], v[:, :, K - window:]
    elif window is not None:
        win = (window - 1, 0)                              # t - s < W  <=>  s >= t - (W - 1)
    want = stats is not None
    if want and _in_kernel(q, k, stats, causal, sliding_window) is None:
        try:
            return fa4_stats.attention(q, k, v, scaling=scaling, stats=stats, key_pos0=key_pos0)
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise Unsupported(f"FlashAttention-4 with in-kernel statistics failed: {type(e).__name__}: {first}") from e

    def call(contiguous: bool):
        # [B, N, H|G, d] views of [B, H|G, N, d]: a model's q (and k, v without a cache) already lie
        # this way in memory; a KV cache does not, and copying it costs a decode step more than FA4
        qt, kt, vt = (x.transpose(1, 2) for x in (q, kk, vv))
        if contiguous:
            qt, kt, vt = (x.contiguous() for x in (qt, kt, vt))
        return fn(qt, kt, vt, softmax_scale=float(scaling), causal=fa_causal, window_size=win, return_lse=want)
    global _strided_ok
    try:
        try:
            res = call(not _strided_ok)
        except Exception:  # noqa: BLE001
            if not _strided_ok:
                raise
            res = call(True)                  # this FA4 build wants contiguous [B, N, H, d] tensors
            _strided_ok = False
    except Exception as e:  # noqa: BLE001  (a shape or GPU this FA4 build does not handle)
        first = (str(e).strip().splitlines() or [""])[0][:200]      # one line: the probe logs it once
        raise Unsupported(f"FlashAttention-4 failed: {type(e).__name__}: {first}") from e
    out, lse = res if isinstance(res, (tuple, list)) else (res, None)
    out = out.transpose(1, 2)                                                  # [B, H, Q, d]
    if not want:
        return out, {}
    lse = _lse_bhq(lse, B, H, Q)
    st = masses_from_lse(q, k, lse, scaling=scaling, causal=causal, sliding_window=window,
                         key_pos0=key_pos0, stats=stats)
    return out, st


# ---------------------------------------------------------------------------------------------
# statistics from the LSE: masses on a few keys (FlashAttention-independent)
_bmm_out_dtype = True     # torch.bmm(..., out_dtype=fp32) works here (cleared after the first failure)


def _scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [X, m, d] @ b [X, d, n] -> fp32 [X, m, n]. bf16 / fp16 on CUDA go through the tensor cores
    with an fp32 result (``torch.bmm(..., out_dtype=torch.float32)``: the products of bf16 / fp16
    values are exact in fp32 and summed in fp32, as an fp32 matmul of the upcast inputs would);
    elsewhere, or where that overload is missing, an fp32 bmm of the upcast inputs."""
    global _bmm_out_dtype
    if _bmm_out_dtype and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _bmm_out_dtype = False
    return torch.bmm(a.float(), b.float())


def _visible(t_idx: torch.Tensor, s_idx: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """t_idx [..., Qc, 1], s_idx [..., 1 | Qc, L] cache indices -> bool mask (reference.visibility)."""
    diff = t_idx - s_idx
    vis = (s_idx >= 0)
    if causal:
        vis = vis & (diff >= 0)
    if window is not None:
        vis = vis & (diff < window)
    return vis


def _probs_(s: torch.Tensor, lse: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """In place: s [..., Qc, L] fp32 scores -> p = exp(s - lse) on visible keys, 0 elsewhere; lse
    [..., Qc]. A row whose LSE is -inf (no key) gets zeros; a NaN LSE stays NaN (reference._probs)."""
    dead = lse == float("-inf")
    s.sub_(lse.masked_fill(dead, 0.0)[..., None]).exp_()
    return s.masked_fill_(~(vis & ~dead[..., None]), 0.0)


def _subset_masses(q, k, lse, *, scaling, causal, window, key_pos0, stats, chunk_rows):
    """sink_mass [B, H, Q] and span_mass [B, H, Q, S] from the scores of those keys only."""
    B, H, Q, d = q.shape
    G, K = k.shape[1], k.shape[2]
    r = H // G
    dev = q.device
    kp0 = (key_pos0.to(device=dev, dtype=torch.long) if key_pos0 is not None
           else torch.zeros(B, dtype=torch.long, device=dev))
    # sinks are the positions s < sink_k, negative ones included (a cache whose index 0 sits at a
    # negative position): that many more keys, known on the host only after one look at key_pos0
    neg = max(0, -int(kp0.min())) if (stats.sink_k and key_pos0 is not None) else 0
    segs = ([(-neg, stats.sink_k)] if stats.sink_k else []) + list(stats.spans)
    idx, lens = [], []
    for a, b in segs:                                  # positions [a, b) -> cache indices pos - key_pos0
        n = min(b - a, K)
        lo = (a - kp0).clamp(0, K)                                               # [B]
        hi = (b - kp0).clamp(0, K)
        j = lo[:, None] + torch.arange(n, device=dev)[None]                     # [B, n]
        idx.append(torch.where(j < hi[:, None], j, torch.full_like(j, -1)))     # -1: not a cached key
        lens.append(n)
    idx = torch.cat(idx, 1)                                                      # [B, L]
    L = idx.shape[1]
    gather = idx.clamp_min(0)[:, None, :, None].expand(B, G, L, d)
    kt = torch.gather(k, 2, gather).transpose(-1, -2).reshape(B * G, d, L)       # [B G, d, L]
    qg = q.reshape(B, G, r, Q, d)
    sink = torch.empty(B, H, Q, dtype=torch.float32, device=dev) if stats.sink_k else None
    span = torch.empty(B, H, Q, len(stats.spans), dtype=torch.float32, device=dev) if stats.spans else None
    for q0 in range(0, Q, chunk_rows):
        q1 = min(Q, q0 + chunk_rows)
        qc = qg[:, :, :, q0:q1].reshape(B * G, r * (q1 - q0), d)
        s = _scores(qc, kt).view(B, H, q1 - q0, L).mul_(scaling)                  # [B, H, Qc, L]
        t_idx = torch.arange(K - Q + q0, K - Q + q1, device=dev)[None, None, :, None]
        vis = _visible(t_idx, idx[:, None, None, :], causal, window)             # [B, 1, Qc, L]
        p = _probs_(s, lse[:, :, q0:q1], vis)
        off = 0
        for i, n in enumerate(lens):
            m = p[..., off:off + n].sum(-1)
            if sink is not None and i == 0:
                sink[:, :, q0:q1] = m
            else:
                span[:, :, q0:q1, i - (sink is not None)] = m
            off += n
    out = {}
    if sink is not None:
        out["sink_mass"] = sink
    if span is not None:
        out["span_mass"] = span
    return out


def _exact_fp32_matmul() -> bool:
    """fp32 matmuls run in full fp32 here (no TF32 / bf16 shortcuts: the default precision)."""
    return torch.get_float32_matmul_precision() == "highest"


def _band_masses(q, k, lse, *, scaling, causal, window, stats, block, chunk_bytes):
    """recent_mass and window_distance [B, H, Q] from the band of keys t - L < s <= t (L = the larger
    of the two, capped by the window and K), in blocks of C queries that share the C + L - 1 keys
    they need.

    A block's scores [C, M = C + L - 1] hold row c's band at columns c .. c + L - 1; the strided
    view with row stride M + 1 ("skewed") lines the band up by distance, column j holding
    t - s = L - 1 - j for every row, so the masses are one product with fixed weights [L, 3]."""
    if not causal:
        raise ValueError("band statistics (recent_mass, window_distance) need causal attention")
    B, H, Q, d = q.shape
    G, K = k.shape[1], k.shape[2]
    r = H // G
    dev = q.device
    R, W = stats.recent or 0, stats.window_distance or 0
    L = max(1, min(max(R, W), K, window if window is not None else K))           # keys that can matter
    C = max(1, min(block, Q))
    M = C + L - 1
    nb = -(-Q // C)
    # keys of block j: cache indices T0_j - L + 1 .. T0_j + C - 1, T0_j = K - Q + j C; zero rows stand
    # for indices < 0 (masked) and for the queries past Q in the last block
    first = K - Q - (L - 1)
    kf = torch.zeros(B, G, nb * C + L - 1, d, dtype=k.dtype, device=dev)
    src0 = max(first, 0)
    kf[:, :, src0 - first:src0 - first + (K - src0)] = k[:, :, src0:]
    qf = q.reshape(B, G, r, Q, d)
    lse_g = lse.reshape(B, G, r, Q)
    dist = (L - 1 - torch.arange(L, device=dev)).float()                         # [L] t - s of column j
    cols = []                                                                    # weights [L, k]
    if R:
        cols.append((dist < R).float())
    if W:
        cols += [(dist < W).float(), dist * (dist < W).float()]
    wts = torch.stack(cols, 1)
    exact_mm = _exact_fp32_matmul()
    res = torch.empty(B, G, r, nb * C, len(cols), dtype=torch.float32, device=dev)
    per_block = B * H * C * M * 4
    nbc = max(1, min(nb, chunk_bytes // max(1, per_block)))
    j_idx = torch.arange(L, device=dev)
    c_idx = torch.arange(C, device=dev)[:, None]
    for j0 in range(0, nb, nbc):
        j1 = min(nb, j0 + nbc)
        n = j1 - j0
        a, b = j0 * C, min(Q, j1 * C)
        qc = torch.zeros(B, G, r, n * C, d, dtype=q.dtype, device=dev)
        qc[..., :b - a, :] = qf[:, :, :, a:b]
        qc = qc.view(B, G, r, n, C, d).permute(0, 1, 3, 2, 4, 5).reshape(B * G * n, r * C, d)
        lc = torch.zeros(B, G, r, n * C, dtype=torch.float32, device=dev)
        lc[..., :b - a] = lse_g[..., a:b]
        lc = lc.view(B, G, r, n, C).permute(0, 1, 3, 2, 4)                      # [B, G, n, r, C]
        kb = kf[:, :, j0 * C:j1 * C + L - 1].unfold(2, M, C)                     # [B, G, n, d, M]
        s = _scores(qc, kb.reshape(B * G * n, d, M))                             # [B G n, r C, M]
        band = s.as_strided((B * G, n, r, C, L), (n * r * C * M, r * C * M, C * M, M + 1, 1),
                            s.storage_offset())                                  # [B G, n, r, C, L]
        dead = lc == float("-inf")                                               # rows that see no key
        band.mul_(scaling).sub_(lc.masked_fill(dead, float("inf")).reshape(B * G, n, r, C, 1)).exp_()
        if K - Q + j0 * C < L - 1:                     # blocks whose band starts before cache index 0
            s_idx = (K - Q + (torch.arange(j0, j1, device=dev) * C)[:, None, None] + c_idx
                     - (L - 1) + j_idx)                                          # [n, C, L]
            band.masked_fill_((s_idx < 0)[None, :, None], 0.0)
        if exact_mm:
            # [B G n r, C, L] @ [L, k] as one batched product over the skewed view (no copy on CUDA)
            b3 = band.flatten(0, 2)                                              # a view: [B G n r, C, L]
            red = torch.bmm(b3, wts.expand(b3.shape[0], L, wts.shape[1]))
        else:                                          # TF32 / bf16 matmuls on: exact sums instead
            red = torch.stack([(band * wts[:, i]).sum(-1) for i in range(wts.shape[1])], -1).flatten(0, 2)
        red = red.view(B, G, n, r, C, -1)
        if W:                                          # mass beyond the band: W each (rows sum to 1)
            i = 1 if R else 0
            total = (~dead).float()                                              # [B, G, n, r, C]
            red[..., i + 1] += W * (total - red[..., i])
        res[..., a:a + n * C, :] = red.permute(0, 1, 3, 2, 4, 5).reshape(B, G, r, n * C, -1)
    out = {}
    res = res[..., :Q, :].reshape(B, H, Q, -1)
    if R:
        out["recent_mass"] = res[..., 0].contiguous()
    if W:
        out["window_distance"] = res[..., -1].contiguous()
    return out


def masses_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scaling: float,
                    causal: bool = True, sliding_window: int | None = None,
                    key_pos0: torch.Tensor | None = None, stats: StatRequest,
                    block: int | None = None, chunk_bytes: int | None = None) -> dict:
    """The statistics of ``SUPPORTED_STATS`` from each row's LSE, exactly as ``reference.attention``
    defines them (``spec.StatRequest``), plus ``lse`` itself.

    q [B, H, Q, d] (the last Q of the K keys), k [B, G, K, d] (G divides H), lse [B, H, Q] the
    natural-log log-sum-exp of the scaled scores over the keys each row sees (causal mask, HF
    ``sliding_window``: t - s < W), ``key_pos0`` [B] the token position of cache index 0. Scores of
    the needed keys are recomputed in fp32 from q and k (for bf16 / fp16 inputs exact even under
    TF32, whose 10-bit mantissa holds their values) and p = exp(s - lse):

    - ``sink_mass`` / ``span_mass``: the keys at those positions (gathered per sequence; for sinks,
      reading ``key_pos0``'s minimum on the host, one device sync, since positions below 0 count);
    - ``recent_mass`` / ``window_distance``: the band t - max(recent, W) < s <= t, in blocks of
      ``block`` queries sharing ``block + band - 1`` keys, the band read through a strided view that
      lines it up by distance (one batched product with fixed weights when fp32 matmuls run in full
      precision, elementwise sums otherwise); window_distance = sum_{t-s<W} p (t - s)
      + W (1 - sum_{t-s<W} p) (rows sum to 1: no learned sinks here).

    Statistics of causal attention only (``ValueError`` otherwise): without the causal mask the band
    is no longer a few keys. Returns fp32 tensors; memory O(Q · (band + block)) per chunk of
    ``chunk_bytes`` (default ``CHUNK_BYTES``) of scores."""
    if not causal and (stats.recent or stats.window_distance):
        raise ValueError("masses_from_lse: recent_mass and window_distance are band statistics of causal attention")
    active = {n for n in ("sink_k", "spans", "recent", "window_distance") if getattr(stats, n)}
    other = decline_reason("masses_from_lse", SUPPORTED_STATS, SUPPORTED_EDITS, stats, None)
    if other is not None:
        raise ValueError(other)
    B, H, Q, d = q.shape
    K = k.shape[2]
    window = sliding_window if sliding_window is not None and sliding_window < K else None
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    lse = lse.float()
    lse = lse.masked_fill(lse == float("inf"), float("nan"))        # a +inf score: a NaN row (spec)
    out: dict = {"lse": lse.contiguous()}
    if "sink_k" in active or "spans" in active:
        L = min(K, stats.sink_k) + sum(min(b - a, K) for a, b in stats.spans)
        rows = max(1, chunk_bytes // max(1, B * H * L * 4))
        out.update(_subset_masses(q, k, lse, scaling=scaling, causal=causal, window=window, key_pos0=key_pos0,
                                  stats=stats, chunk_rows=rows))
    if "recent" in active or "window_distance" in active:
        out.update(_band_masses(q, k, lse, scaling=scaling, causal=causal, window=window, stats=stats,
                                block=block or BAND_BLOCK, chunk_bytes=chunk_bytes))
    return out
