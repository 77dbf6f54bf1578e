"""Per-call time of one decode step (Q = 1 against K cached keys) as a generation loop sees it:
eager wall time per call (host launch cost included) and GPU time (CUDA-graph replays), for default
SDPA, the split-key decode path (``kernels/triton_decode.py``, chosen automatically) and the
one-program-per-query-block forward it replaced (``DECODE_MIN_K`` set beyond any context). Shapes of
SmolLM2 (batch 3, left-padded, as the retrieval analyzer decodes) and Llama-3-8B (batch 1). Issue 13.

    python benchmarks/decode_host.py [--min-k N] # on a GPU; prints a markdown table
    python benchmarks/decode_host.py --targets  # issue 13's decode grid: Llama-3-8B, B = 1 and 8,
                                                # K = 8k, 32k, 128k; argmax and every row statistic,
                                                # eager and graph, as ratios to default SDPA
    [--merge fused,kernel] [--rounds 3]         # both merges of the key splits, taking turns
"""
import argparse
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.realpath(__file__))
_sys.path.insert(0, _os.path.dirname(_here))   # the repository root: benchmarks.host_timing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks.host_timing import decode_inputs, wall_us, with_merge  # noqa: E402
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


def timed(fns, rounds):
    """(eager µs, graph µs) of each function: eager the median of ``rounds`` rounds of 300 calls with
    the functions taking turns (the host drifts), graph one CUDA-graph timing each."""
    eager = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            eager[i].append(wall_us(fn, 300))
    return [(sorted(e)[len(e) // 2], graph_us(fn)) for e, fn in zip(eager, fns)]


def targets(merges, rounds):
    """Issue 13's decode targets: with argmax <= 1.3x and every row statistic <= 1.5x default SDPA's
    decode time (Llama-3-8B shapes, B = 1 and 8, K = 8k-128k), eager wall and CUDA-graph time; the
    split-key path as chosen automatically (``DECODE_MIN_K``), once per merge in ``merges``."""
    print(f"eager: median of {rounds} rounds, SDPA and each merge taking turns")
    print("| B | K | request | SDPA eager µs [graph] | " + " | ".join(
        f"ours ({m}) eager µs [graph] | eager ratio | graph ratio" for m in merges) + " | target |")
    print("|---|---|---|---|" + "---|---|---|" * len(merges) + "---|")
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
                    (se, sg), *mine = timed([sdpa] + [with_merge(ours, m) for m in merges], rounds)
                print(f"| {B} | {K / 1024:g}k | {rname} | {se:.0f} [{sg:.0f}] | " + " | ".join(
                    f"{oe:.0f} [{og:.0f}] | {oe / se:.2f} | {og / sg:.2f}" for oe, og in mine)
                      + f" | ≤ {target} |", flush=True)
            del q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", action="store_true", help="issue 13's decode grid (module docstring)")
    ap.add_argument("--min-k", type=int, default=None,
                    help="the decode-path column's DECODE_MIN_K (default the library's; 0 forces the split-key "
                         "path at every K, to re-pick the threshold)")
    ap.add_argument("--merge", default=td.MERGE,
                    help="comma-separated merges of the key splits to time in turns: fused, kernel "
                         "(triton_decode.MERGE; default the library's)")
    ap.add_argument("--rounds", type=int, default=1, help="eager rounds per cell, the columns taking turns")
    args = ap.parse_args()
    merges = args.merge.split(",")
    if args.targets:
        return targets(merges, args.rounds)
    default_min_k = td.DECODE_MIN_K
    split_min_k = default_min_k if args.min_k is None else args.min_k
    print(f"decode-path column: DECODE_MIN_K = {split_min_k}")
    print(f"eager: median of {args.rounds} rounds, the columns taking turns")
    print("| shape | B | K | request | SDPA eager µs [graph] | " + " | ".join(
        f"decode path ({m}) eager µs [graph]" for m in merges) + " | query-block fwd eager µs [graph] |")
    print("|---|---|---|---|---|" + "---|" * len(merges) + "---|")
    for name, B, H, G, d, Ks, pad in SHAPES:
        for K in Ks:
            q, k, v, kp, mask = decode_inputs(B, H, G, d, K, pad)

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if pad else None, enable_gqa=True)
            for rname, req in REQUESTS.items():
                def ours():
                    return ta.attention(q, k, v, scaling=d ** -0.5, causal=True, key_padding=kp if pad else None,
                                        stats=req)
                def at_min_k(fn, min_k):
                    def run():
                        td.DECODE_MIN_K = min_k
                        try:
                            return fn()
                        finally:
                            td.DECODE_MIN_K = default_min_k
                    return run
                fns = [sdpa] + [at_min_k(with_merge(ours, m), split_min_k) for m in merges] + [at_min_k(ours, 1 << 40)]
                with torch.no_grad():
                    cells = [f"{e:.0f} [{g:.0f}]" for e, g in timed(fns, args.rounds)]
                print(f"| {name} | {B} | {K / 1024:g}k | {rname} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
