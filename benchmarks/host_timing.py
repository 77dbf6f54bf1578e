"""Shared by the decode-step benchmarks (``decode_host.py``, ``decode_host_profile.py``,
``launch_overhead.py``): wall time per call of back-to-back calls (host launch cost included),
and the inputs of one decode step."""
import time

import torch


def wall_us(fn, n: int, warmup: int = 20) -> float:
    """Wall µs per call of ``n`` back-to-back calls of ``fn`` (after ``warmup`` calls), the GPU
    drained before and after: what an eager generation loop pays per step."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def decode_inputs(B: int, H: int, G: int, d: int, K: int, pad: int = 0, seed: int = 0):
    """One query per row against K cached keys, bf16 on the GPU: (q [B, H, 1, d], k, v [B, G, K, d],
    key_padding [B, K] bool with row 0's first ``pad`` keys off (as the retrieval analyzer's
    left-padded batches), its SDPA mask [B, 1, 1, K])."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kp = torch.ones(B, K, dtype=torch.bool, device="cuda")
    kp[0, :pad] = False
    return q, k, v, kp, kp[:, None, None, :]


def with_merge(fn, mode: str):
    """``fn`` run with the split-key decode path's splits merged by ``mode`` (``triton_decode.MERGE``:
    "auto", "fused" or "kernel"; its plans are kept per value, so switching costs nothing)."""
    from headscope.kernels import triton_decode as td

    def run():
        saved, td.MERGE = td.MERGE, mode
        try:
            return fn()
        finally:
            td.MERGE = saved
    return run
