"""Per-call time of one decode step (Q = 1 against K cached keys) as a generation loop sees it:
eager wall time per call (host launch cost included) and GPU time (CUDA-graph replays), for default
SDPA, the split-key decode path (``kernels/triton_decode.py``, chosen automatically) and the
one-program-per-query-block forward it replaced (``DECODE_MIN_K`` set beyond any context). Shapes of
SmolLM2 (batch 3, left-padded, as the retrieval analyzer decodes) and Llama-3-8B (batch 1). Issue 13.

    python benchmarks/decode_host.py            # on a GPU; prints a markdown table
"""
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.realpath(__file__))   # benchmarks/kernels.py would shadow transformers'
_sys.path[:] = [_os.path.dirname(_here)] + [p for p in _sys.path if _os.path.realpath(p or ".") != _here]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks.host_timing import decode_inputs, wall_us  # noqa: E402
from headscope.kernels import triton_attention as ta
from headscope.kernels import triton_decode as td
from headscope.kernels.spec import StatRequest

SHAPES = [  # name, B, H, G, d, K values, left padding of row 0
    ("SmolLM2", 3, 9, 3, 64, (2048, 4096, 7168), 100),
    ("Llama-3-8B", 1, 32, 8, 128, (8192, 32768), 0),
]
REQUESTS = {"plain": None, "argmax": StatRequest(argmax=True)}


def graph_us(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3


def main():
    default_min_k = td.DECODE_MIN_K
    print("| shape | B | K | request | SDPA eager µs [graph] | decode path eager µs [graph] | "
          "query-block fwd eager µs [graph] |")
    print("|---|---|---|---|---|---|---|")
    for name, B, H, G, d, Ks, pad in SHAPES:
        for K in Ks:
            q, k, v, kp, mask = decode_inputs(B, H, G, d, K, pad)

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if pad else None, enable_gqa=True)
            for rname, req in REQUESTS.items():
                def ours():
                    return ta.attention(q, k, v, scaling=d ** -0.5, causal=True, key_padding=kp if pad else None,
                                        stats=req)
                cells = []
                for fn, min_k in ((sdpa, None), (ours, default_min_k), (ours, 1 << 40)):
                    td.DECODE_MIN_K = min_k if min_k is not None else default_min_k
                    with torch.no_grad():
                        cells.append(f"{wall_us(fn, 300):.0f} [{graph_us(fn):.0f}]")
                td.DECODE_MIN_K = default_min_k
                print(f"| {name} | {B} | {K // 1024}k | {rname} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
