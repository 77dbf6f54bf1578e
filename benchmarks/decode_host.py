"""Per-call time of one decode step (Q = 1 against K cached keys) as a generation loop sees it:
eager wall time per call (host launch cost included) and GPU time (CUDA-graph replays), for default
SDPA, the split-key decode path (``kernels/triton_decode.py``, chosen automatically) and the
one-program-per-query-block forward it replaced (``DECODE_MIN_K`` set beyond any context). Shapes of
SmolLM2 (batch 3, left-padded, as the retrieval analyzer decodes) and Llama-3-8B (batch 1). Issue 13.

    python benchmarks/decode_host.py [--min-k N] # on a GPU; prints a markdown table
    python benchmarks/decode_host.py --targets  # issue 13's decode grid: Llama-3-8B, B = 1 and 8,
                                                # K = 8k, 32k, 128k; argmax and every row statistic,
                                                # eager and graph, as ratios to default SDPA
"""
import argparse
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.realpath(__file__))
_sys.path.insert(0, _os.path.dirname(_here))   # the repository root: benchmarks.host_timing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks.host_timing import decode_inputs, wall_us  # noqa: E402
from headscope.kernels import triton_attention as ta
from headscope.kernels import triton_decode as td
from headscope.kernels.spec import StatRequest

SHAPES = [  # name, B, H, G, d, K values, left padding of row 0
    ("SmolLM2", 3, 9, 3, 64, (512, 1024, 2048, 4096, 7168), 100),
    ("Llama-3-8B", 1, 32, 8, 128, (512, 1024, 2048, 4096, 8192, 32768), 0),
]
REQUESTS = {"plain": None, "argmax": StatRequest(argmax=True)}


def graph_us(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3


def all_rows(K: int) -> StatRequest:
    """Every row statistic, as the decode sweep of ``attention_bench.py`` asks: sink 4, a span at the start
    and one in the middle, entropy, distance, window distance 128, recent 64, argmax."""
    return StatRequest(sink_k=4, spans=((4, 68), (K // 2, K // 2 + 256)), entropy=True, distance=True,
                       window_distance=128, recent=64, argmax=True)


def targets():
    """Issue 13's decode targets: with argmax <= 1.3x and every row statistic <= 1.5x default SDPA's
    decode time (Llama-3-8B shapes, B = 1 and 8, K = 8k-128k), eager wall and CUDA-graph time; the
    split-key path as chosen automatically (``DECODE_MIN_K``)."""
    print("| B | K | request | SDPA eager µs [graph] | ours eager µs [graph] | eager ratio | graph ratio | target |")
    print("|---|---|---|---|---|---|---|---|")
    H, G, d = 32, 8, 128
    for B in (1, 8):
        for K in (8192, 32768, 131072):
            q, k, v, _, _ = decode_inputs(B, H, G, d, K)

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            for rname, req, target in (("argmax", StatRequest(argmax=True), 1.3), ("all rows", all_rows(K), 1.5)):
                def ours():
                    return ta.attention(q, k, v, scaling=d ** -0.5, causal=True, stats=req)
                with torch.no_grad():
                    se, sg, oe, og = wall_us(sdpa, 300), graph_us(sdpa), wall_us(ours, 300), graph_us(ours)
                print(f"| {B} | {K / 1024:g}k | {rname} | {se:.0f} [{sg:.0f}] | {oe:.0f} [{og:.0f}] | "
                      f"{oe / se:.2f} | {og / sg:.2f} | ≤ {target} |", flush=True)
            del q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", action="store_true", help="issue 13's decode grid (module docstring)")
    ap.add_argument("--min-k", type=int, default=None,
                    help="the decode-path column's DECODE_MIN_K (default the library's; 0 forces the split-key "
                         "path at every K, to re-pick the threshold)")
    args = ap.parse_args()
    if args.targets:
        return targets()
    default_min_k = td.DECODE_MIN_K
    split_min_k = default_min_k if args.min_k is None else args.min_k
    print(f"decode-path column: DECODE_MIN_K = {split_min_k}")
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
                for fn, min_k in ((sdpa, None), (ours, split_min_k), (ours, 1 << 40)):
                    td.DECODE_MIN_K = min_k if min_k is not None else default_min_k
                    with torch.no_grad():
                        cells.append(f"{wall_us(fn, 300):.0f} [{graph_us(fn):.0f}]")
                td.DECODE_MIN_K = default_min_k
                print(f"| {name} | {B} | {K / 1024:g}k | {rname} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
