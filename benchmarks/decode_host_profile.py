"""Where an eager decode step's host time goes: ``cProfile`` over back-to-back calls of the
split-key decode path (``kernels/triton_decode.py``) and of default SDPA, one query against K
cached keys, bf16. Prints each call's wall time without the profiler, then the functions with the
most own time per call (µs) under it. Issue 13 ("Decode per call, eager vs graph" in BENCHMARKS.md).

    python benchmarks/decode_host_profile.py [--calls 300] [--top 18]     # on a GPU
"""
import argparse
import cProfile
import os as _os
import pstats
import sys as _sys
_here = _os.path.dirname(_os.path.realpath(__file__))
_sys.path.insert(0, _os.path.dirname(_here))   # the repository root: benchmarks.host_timing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.host_timing import decode_inputs, wall_us  # noqa: E402
from headscope.kernels import triton_attention as ta  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402

CASES = [  # name, B, H, G, d, K, left padding of row 0, request
    ("Llama-3-8B 8k plain", 1, 32, 8, 128, 8192, 0, None),
    ("Llama-3-8B 8k argmax", 1, 32, 8, 128, 8192, 0, StatRequest(argmax=True)),
    ("Llama-3-8B 32k argmax", 1, 32, 8, 128, 32768, 0, StatRequest(argmax=True)),
    ("Llama-3-8B 32k all rows", 1, 32, 8, 128, 32768, 0,
     StatRequest(sink_k=4, spans=((4, 68),), entropy=True, distance=True, window_distance=128, recent=64, argmax=True)),
    ("SmolLM2 B3 8k argmax, padded", 3, 9, 3, 64, 8192, 100, StatRequest(argmax=True)),
]


def profile(fn, n, top):
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]     # by own (total) time
    for (file, line, name), (cc, nc, tt, ct, _) in rows:
        where = f"{_os.path.basename(file)}:{line}" if file != "~" else ""
        print(f"    {tt / n * 1e6:8.1f} µs own {ct / n * 1e6:8.1f} µs cum  {nc / n:5.1f}/call  {name} {where}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--top", type=int, default=18)
    a = ap.parse_args()
    for name, B, H, G, d, K, pad, req in CASES:
        q, k, v, kp, mask = decode_inputs(B, H, G, d, K, pad)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if pad else None, enable_gqa=True)

        def ours():
            return ta.attention(q, k, v, scaling=d ** -0.5, causal=True, key_padding=kp if pad else None, stats=req)
        with torch.no_grad():
            print(f"## {name}: SDPA {wall_us(sdpa, a.calls):.0f} µs, ours {wall_us(ours, a.calls):.0f} µs per call "
                  f"(eager wall)", flush=True)
            print("  ours under cProfile:")
            profile(ours, a.calls, a.top)
        print(flush=True)


if __name__ == "__main__":
    main()
