"""One attention layer on the CPU: F.scaled_dot_product_attention vs headscope's chunked path with
every statistic, with the fused C row pass (``cpu_rows.c``) and with plain PyTorch ops.

SmolLM2 shapes by default (9 heads, 3 KV heads, d = 64, causal, fp32); q/k/v are transposed views
of [B, N, H, d] tensors, as the model hands them over. Median of ``--repeats`` calls after a warm-up.

    python benchmarks/layer_cpu.py --sizes 2048 4096 8192
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from headscope.kernels import chunked, cpu_native
from headscope.kernels.spec import StatRequest

ALL = StatRequest(sink_k=4, spans=((0, 16), (100, 200)), entropy=True, distance=True, window_distance=10,
                  recent=256, argmax=True, received=True)


def median_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    H, G, d = a.heads, a.kv_heads, a.d
    print(f"native row kernel available: {cpu_native.available()}; threads {a.threads}")
    print("| N | sdpa (s) | headscope, fused rows (s) | × sdpa | headscope, PyTorch ops (s) | × sdpa |")
    print("|---|---|---|---|---|---|")
    for n in a.sizes:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, n, H, d, generator=g).transpose(1, 2)
        k = torch.randn(1, n, G, d, generator=g).transpose(1, 2)
        v = torch.randn(1, n, G, d, generator=g).transpose(1, 2)
        t_sdpa = median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5,
                                                                     enable_gqa=G != H), a.repeats)
        run = lambda: chunked.attention(q, k, v, scaling=d ** -0.5, stats=ALL)
        t_native = median_time(run, a.repeats)
        os.environ["HEADSCOPE_NATIVE"] = "0"
        t_torch = median_time(run, a.repeats)
        os.environ.pop("HEADSCOPE_NATIVE")
        print(f"| {n} | {t_sdpa:.3f} | {t_native:.3f} | {t_native / t_sdpa:.2f} | {t_torch:.3f} | "
              f"{t_torch / t_sdpa:.2f} |", flush=True)


if __name__ == "__main__":
    main()
