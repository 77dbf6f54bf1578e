"""Row-statistics kernel timing for an A/B of two versions of kernels/flash_stats.py (run once per
version, in separate processes): Llama-3-8B shapes (H32 G8 d128), bf16 causal B=1, plain forward,
every row statistic, and argmax alone; ms from triton.testing.do_bench medians, with the argmax
index and max_prob of the all-rows call checked against an fp32 eager reference on the first rows.

    python benchmarks/rows_ab.py LABEL [N ...]
"""
import sys as _sys


import torch
import triton.testing

from headscope.kernels import triton_attention as ta
from headscope.kernels.spec import StatRequest


def main():
    label = _sys.argv[1]
    sizes = [int(x) for x in _sys.argv[2:]] or [16384, 65536]
    H, G, d = 32, 8, 128
    for N in sizes:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, h, N, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, G, G))
        rows = StatRequest(sink_k=4, spans=((4, 68), (N // 2, N // 2 + 256)), entropy=True, distance=True,
                           window_distance=128, recent=64, argmax=True)
        res = {}
        for name, req in (("plain", None), ("rows", rows), ("argmax", StatRequest(argmax=True))):
            res[name] = triton.testing.do_bench(lambda: ta.attention(q, k, v, scaling=d ** -0.5, stats=req),
                                                warmup=25, rep=100, return_mode="median")
        _, st = ta.attention(q, k, v, scaling=d ** -0.5, stats=rows)
        n = 256                                                     # check the last 256 query rows
        s = (q[:, :, -n:].float() @ k.float().repeat_interleave(H // G, 1).transpose(-1, -2)) * d ** -0.5
        s[..., N - n:] = s[..., N - n:].masked_fill(
            torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        am = s.argmax(-1)
        p = s.softmax(-1)
        agree = (st["argmax"][:, :, -n:] == am).float().mean().item()
        pdiff = (st["max_prob"][:, :, -n:] - p.amax(-1)).abs().max().item()
        print(f"| {label} | {N // 1024}k | " + " | ".join(f"{res[x]:.2f}" for x in ("plain", "rows", "argmax"))
              + f" | {res['rows'] / res['plain']:.3f} | {agree:.4f} | {pdiff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
