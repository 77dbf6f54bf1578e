"""One launch each of plain FlashAttention-4 and the in-kernel row-statistics variants
(``kernels/fa4_stats``: LSE only, the few-key masses, entropy + distance + argmax, every row
statistic), after one warm-up launch each, for Nsight Compute to compare their warp states. Issue 13.

    ncu --kernel-name regex:Sm90 --launch-skip 5 --launch-count 5 --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section InstructionStats \
        --section ComputeWorkloadAnalysis --csv --page details python3 benchmarks/ncu_rows.py
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") not in (HERE, ROOT)]

import torch  # noqa: E402

from kernels import fa4_stats  # noqa: E402
from kernels.spec import StatRequest  # noqa: E402


def main(N: int = 16384, H: int = 32, G: int = 8, d: int = 128):
    from flash_attn.cute import flash_attn_func
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, N, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, G, G))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    sc = d ** -0.5
    rows = StatRequest(entropy=True, distance=True, argmax=True, sink_k=4, spans=((5, 40),), recent=64,
                       window_distance=128)
    variants = {
        "FA4 (pack_gqa=False)": lambda: flash_attn_func(qt, kt, vt, softmax_scale=sc, causal=True, pack_gqa=False),
        "LSE only": lambda: fa4_stats.attention(q, k, v, scaling=sc, stats=StatRequest()),
        "masses": lambda: fa4_stats.attention(q, k, v, scaling=sc, stats=StatRequest(
            sink_k=4, spans=((5, 40),), recent=64, window_distance=128)),
        "entropy+distance+argmax": lambda: fa4_stats.attention(q, k, v, scaling=sc, stats=StatRequest(
            entropy=True, distance=True, argmax=True)),
        "all rows": lambda: fa4_stats.attention(q, k, v, scaling=sc, stats=rows),
    }
    with torch.no_grad():
        for _ in range(2):                       # warm-up (compiles), then the profiled launches
            for name, fn in variants.items():
                fn()
                torch.cuda.synchronize()
    print("launch order:", ", ".join(variants), flush=True)


if __name__ == "__main__":
    main()
