"""One launch each of plain FlashAttention-4 and variants of ``kernels/fa4_stats``, after one
warm-up launch each, for Nsight Compute to compare their warp states. Issue 13. Sets (``--set``):

- ``rows`` (default): LSE only, the few-key masses, entropy + distance + argmax, every row statistic;
- ``split``: entropy, distance and argmax one at a time, and entropy + distance;
- ``cols``: the transposed column-sum pass (``received_sums``), without and with its P.V product.

The script prints how many launches come before the profiled ones (``--launch-skip``) and how many
are profiled (``--launch-count``); for the default set:

    ncu --kernel-name regex:Sm90 --launch-skip 5 --launch-count 5 --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section InstructionStats \
        --section ComputeWorkloadAnalysis --csv --page details python3 benchmarks/ncu_rows.py
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from headscope.kernels import fa4_stats  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402


def main(which: str = "rows", N: int = 16384, H: int = 32, G: int = 8, d: int = 128):
    from flash_attn.cute import flash_attn_func
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, N, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, G, G))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    sc = d ** -0.5
    fa4 = {"FA4 (pack_gqa=False)": lambda: flash_attn_func(qt, kt, vt, softmax_scale=sc, causal=True, pack_gqa=False)}

    def ours(**kw):
        return lambda: fa4_stats.attention(q, k, v, scaling=sc, stats=StatRequest(**kw))

    def colsum(pv: str):
        def fn():
            saved, fa4_stats.COLSUM_PV = fa4_stats.COLSUM_PV, pv
            try:
                return fa4_stats.received_sums(q, k, lse, scaling=sc)
            finally:
                fa4_stats.COLSUM_PV = saved
        return fn

    before = 0                                   # launches of a matching kernel before the warm-up
    lse = None
    if which == "cols":
        lse = fa4_stats.attention(q, k, v, scaling=sc, stats=StatRequest())[1]["lse"]
        before = 1
    sets = {
        "split": {**fa4, "entropy": ours(entropy=True), "distance": ours(distance=True),
                  "argmax": ours(argmax=True), "entropy+distance": ours(entropy=True, distance=True)},
        "cols": {**fa4, "transposed pass (no P.V)": colsum("skip"), "transposed pass with P.V": colsum("keep")},
    }
    masses = dict(sink_k=4, spans=((5, 40),), recent=64, window_distance=128)
    variants = sets.get(which) or {
        **fa4, "LSE only": ours(), "masses": ours(**masses),
        "entropy+distance+argmax": ours(entropy=True, distance=True, argmax=True),
        "all rows": ours(entropy=True, distance=True, argmax=True, **masses),
    }
    with torch.no_grad():
        for _ in range(2):                       # warm-up (compiles), then the profiled launches
            for name, fn in variants.items():
                fn()
                torch.cuda.synchronize()
    print("launch order:", ", ".join(variants), flush=True)
    print(f"ncu: --launch-skip {before + len(variants)} --launch-count {len(variants)}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="rows", choices=["rows", "split", "cols"])
    main(ap.parse_args().set)
