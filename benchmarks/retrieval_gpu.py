"""`headscope report`'s retrieval analyzer (Wu et al. 2024, retrieval heads) on a GPU model, before
and after the split-key decode path (issue 13): the same needle tests scored twice, once with
``kernels/triton_decode.py`` taking the decode steps (the default: K >= DECODE_MIN_K keys) and once
with it switched off (DECODE_MIN_K set beyond any context, so every decode step runs the
one-program-per-query-block forward kernel, as before the decode path existed). The scores must
agree (argmax ties aside); the time per mode is printed as JSON lines.

    python benchmarks/retrieval_gpu.py --model PATH_OR_NAME [--lengths 2000,4000,7000]
"""
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.realpath(__file__))   # benchmarks/kernels.py would shadow transformers'
_sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or ".") != _here]   # probe of a "kernels" package

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
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a = ap.parse_args()
    m = hs.load(a.model, device="cuda", dtype=getattr(torch, a.dtype))
    lengths = tuple(int(x) for x in a.lengths.split(","))
    depths = tuple(float(x) for x in a.depths.split(","))
    analyzer = Retrieval(lengths=lengths, depths=depths)
    default_min_k = triton_decode.DECODE_MIN_K
    timed(Retrieval(lengths=(lengths[0],), depths=(50.0,)), m)          # warm-up: compile both paths
    triton_decode.DECODE_MIN_K = 1 << 40
    timed(Retrieval(lengths=(lengths[0],), depths=(50.0,)), m)
    out = {}
    for mode, min_k in (("split-key decode (now)", default_min_k), ("query-block forward (before)", 1 << 40)):
        triton_decode.DECODE_MIN_K = min_k
        res, sec = timed(analyzer, m)
        out[mode] = res.scores.float()
        print(json.dumps(dict(mode=mode, seconds=round(sec, 2), lengths=lengths, depths=depths, dtype=a.dtype,
                              tests=len(lengths) * len(depths), top5=res.top(5)),
                         default=str), flush=True)
    triton_decode.DECODE_MIN_K = default_min_k
    a_, b_ = out.values()
    print(json.dumps(dict(max_abs_score_diff=float((a_ - b_).abs().max()),
                          heads_differing=int(((a_ - b_).abs() > 1e-6).sum()))), flush=True)


if __name__ == "__main__":
    main()
