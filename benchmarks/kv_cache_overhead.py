"""What a KV cache costs per decode step, without the model: ``update`` of every layer with one new
token's keys and values after a prefill of N tokens, for transformers' DynamicCache and for
``interventions.kv_compress.HeadClassCache`` at 0 / 25 / 50 / 75% streaming KV heads (SmolLM2-135M
shapes: 30 layers, 3 KV heads, head dim 64). Prints µs per layer per step.

    python benchmarks/kv_cache_overhead.py [--device cpu|cuda] [--n 600] [--steps 64] [--dtype bfloat16]
"""
import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from headscope.interventions.kv_compress import HeadClassCache  # noqa: E402


def stream_at(frac, L, G, seed=0):
    """A seeded set of round(frac * L * G) streaming KV heads, as {layer: [heads]}."""
    pairs = [(l, g) for l in range(L) for g in range(G)]
    random.Random(seed).shuffle(pairs)
    out = {}
    for l, g in sorted(pairs[:round(frac * len(pairs))]):
        out.setdefault(l, []).append(g)
    return out


def per_step_us(make, L, G, d, n, steps, dev, dtype):
    cache = make()
    g = torch.Generator(device=dev).manual_seed(0)
    kv = lambda q: (torch.randn(1, G, q, d, generator=g, device=dev, dtype=dtype),   # noqa: E731
                    torch.randn(1, G, q, d, generator=g, device=dev, dtype=dtype))
    for l in range(L):
        cache.update(*kv(n), l)
    new = [kv(1) for _ in range(steps)]
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k, v in new:
        for l in range(L):
            cache.update(k, v, l)
    if dev == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (steps * L) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    L, G, d = 30, 3, 64
    dtype = getattr(torch, a.dtype)
    rows = [("DynamicCache", lambda: DynamicCache())]
    for frac in (0.0, 0.25, 0.5, 0.75):
        s = stream_at(frac, L, G)
        rows.append((f"HeadClassCache {frac:.0%} streaming", lambda s=s: HeadClassCache(s, L, sink=64, recent=256)))
    print(f"| cache | µs per layer per step (N={a.n}, {a.device}, {a.dtype}) |\n|---|---|")
    for name, make in rows:
        per_step_us(make, L, G, d, a.n, 8, a.device, dtype)               # warm-up
        t = min(per_step_us(make, L, G, d, a.n, a.steps, a.device, dtype) for _ in range(3))
        print(f"| {name} | {t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
