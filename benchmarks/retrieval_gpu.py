"""`headscope report`'s retrieval analyzer (Wu et al. 2024, retrieval heads) on a GPU model, before
and after the split-key decode path (issue 13): the same needle tests scored with
``kernels/triton_decode.py`` taking every decode step from ``--split-min-k`` keys on (1024: the
default until 2026-12-02; now DECODE_MIN_K = 8192) and with it switched off (DECODE_MIN_K beyond any
context, so every decode step runs the one-program-per-query-block forward kernel, as before the
decode path existed). Both modes are warmed up with the whole analyzer, then timed ``--repeats``
times in alternating order. The scores must agree (near-tied maxima aside); the time per mode is
printed as JSON lines.

    python benchmarks/retrieval_gpu.py --model PATH_OR_NAME [--lengths 2000,4000,7000]
"""
import argparse
import json
import time

import torch

import headscope as hs
from headscope.heads.retrieval import Retrieval
from headscope.kernels import triton_decode


def timed(analyzer, model):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = analyzer.score(model, progress=False)
    torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="2000,4000,7000")
    ap.add_argument("--depths", default="0,50,100")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--split-min-k", type=int, default=1024, help="DECODE_MIN_K of the split-key mode")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a = ap.parse_args()
    m = hs.load(a.model, device="cuda", dtype=getattr(torch, a.dtype))
    lengths = tuple(int(x) for x in a.lengths.split(","))
    depths = tuple(float(x) for x in a.depths.split(","))
    analyzer = Retrieval(lengths=lengths, depths=depths)
    default_min_k = triton_decode.DECODE_MIN_K
    modes = ((f"split-key decode from {a.split_min_k} keys", a.split_min_k), ("query-block forward", 1 << 40))
    for _, min_k in modes:             # warm-up: the whole analyzer once per path (compiles, test data)
        triton_decode.DECODE_MIN_K = min_k
        timed(analyzer, m)
    out, secs = {}, {name: [] for name, _ in modes}
    for rep in range(a.repeats):       # alternate the order, so neither path gains from going second
        for mode, min_k in (modes if rep % 2 == 0 else modes[::-1]):
            triton_decode.DECODE_MIN_K = min_k
            res, sec = timed(analyzer, m)
            out[mode] = res.scores.float()
            secs[mode].append(round(sec, 3))
            print(json.dumps(dict(mode=mode, rep=rep, seconds=round(sec, 3), lengths=lengths, depths=depths,
                                  dtype=a.dtype, tests=len(lengths) * len(depths), top5=res.top(5)),
                             default=str), flush=True)
    print(json.dumps(dict(min_seconds={k: min(v) for k, v in secs.items()})), flush=True)
    triton_decode.DECODE_MIN_K = default_min_k
    a_, b_ = out.values()
    print(json.dumps(dict(max_abs_score_diff=float((a_ - b_).abs().max()),
                          heads_differing=int(((a_ - b_).abs() > 1e-6).sum()))), flush=True)


if __name__ == "__main__":
    main()
