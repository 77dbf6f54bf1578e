"""Row statistics inside FlashAttention-4's Hopper forward (``kernels/fa4_stats.py``), on the GPU:
(1) every statistic (and the column sums of the transposed pass) against the fp32 reference (``kernels/reference.py``) on odd shapes, GQA, d 64 /
128 / 256, two batches with shifted positions; (2) time against FA4 itself, cuDNN SDPA and our
Triton row-statistics kernel, in one run. Issue 13.

    python benchmarks/fa4_stats_gpu.py [--check-only | --no-check] [--shapes Llama-3-8B,...]
        [--sizes 16384,32768] [--only "ours: all rows,transposed pass alone"] [--rep 100]
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)   # the repository root: benchmarks.*

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu_clock import bench as clocked_bench  # noqa: E402
from headscope.kernels import fa4_stats, reference  # noqa: E402
from headscope.kernels import triton_attention as ta  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402

SHAPES = {  # H, G, d
    "Llama-3-8B": (32, 8, 128), "Qwen2.5-7B": (28, 4, 128), "SmolLM2": (9, 3, 64), "Gemma-3": (8, 4, 256),
}


def rows_request(N):
    """benchmarks/attention_bench.py's "all row statistics"."""
    return StatRequest(sink_k=4, spans=((4, 68), (N // 2, N // 2 + 256)), entropy=True, distance=True,
                       window_distance=128, recent=64, argmax=True)


def check(B, H, G, N, d, seed, key_pos0=None, temp=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, H, N, d, device="cuda", generator=g) * temp).bfloat16()
    k = torch.randn(B, G, N, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, G, N, d, device="cuda", generator=g).bfloat16()
    req = StatRequest(sink_k=5, spans=((3, 40), (N // 2, N // 2 + 77)), entropy=True, distance=True,
                      window_distance=100, recent=37, argmax=True, received=True)
    kp0 = None if key_pos0 is None else torch.tensor(key_pos0, device="cuda")
    out, st = fa4_stats.attention(q, k, v, scaling=d ** -0.5, stats=req, key_pos0=kp0)
    ro, rs, p = reference.attention(q.float(), k.float(), v.float(), scaling=d ** -0.5, stats=req,
                                    key_pos0=kp0, want_probs=True)
    from flash_attn.cute import flash_attn_func
    o4 = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=d ** -0.5,
                         causal=True)
    o4 = (o4[0] if isinstance(o4, tuple) else o4).transpose(1, 2)
    o0, s0 = fa4_stats.attention(q, k, v, scaling=d ** -0.5, stats=StatRequest(), key_pos0=kp0)
    errs = {"out": (out.float() - ro).abs().max().item(), "out_fa4": (o4.float() - ro).abs().max().item(),
            "out_nostats": (o0.float() - ro).abs().max().item(), "lse_nostats": (s0["lse"] - rs["lse"]).abs().max().item()}
    for name in ("lse", "entropy", "distance", "window_distance", "recent_mass", "max_prob", "sink_mass", "span_mass"):
        errs[name] = (st[name].float() - rs[name].float()).abs().max().item()
    errs["received_rel"] = ((st["received_sum"] - rs["received_sum"]).abs().max() / rs["received_sum"].abs().max()).item()
    errs["count"] = (st["received_count"] - rs["received_count"]).abs().max().item()
    saved = fa4_stats.COLSUM_MASK
    for mask in ("local", "causal"):
        fa4_stats.COLSUM_MASK = mask
        r = fa4_stats.received_sums(q, k, rs["lse"], scaling=d ** -0.5)
        errs[f"received_rel_{mask}"] = ((r - rs["received_sum"]).abs().max() / rs["received_sum"].abs().max()).item()
    fa4_stats.COLSUM_MASK = saved
    same = (st["argmax"] == rs["argmax"])
    # where they differ, our key's probability must equal the max (a tie in fp32)
    p_ours = p.gather(-1, st["argmax"].clamp(0, N - 1).unsqueeze(-1)).squeeze(-1)
    errs["argmax_p_gap"] = (p.amax(-1) - p_ours).abs().max().item() if key_pos0 is None else 0.0
    errs["argmax_agree"] = same.float().mean().item()
    bad = ~torch.isfinite(o0.float()).all(-1)                                   # [B, H, N] rows with NaN/inf
    if bad.any():
        rows = bad.nonzero()[:, 2]
        print(f"  non-finite rows (no statistic): {bad.float().mean().item():.3f} of rows; positions "
              f"{sorted(set(rows.tolist()))[:12]}... mod 128: {sorted(set((rows % 128).tolist()))[:12]}", flush=True)
    print(f"check B{B} H{H} G{G} N{N} d{d} pos0={key_pos0} temp={temp}: " +
          " ".join(f"{n}={v:.2e}" for n, v in errs.items()), flush=True)
    return errs


REP_MS = 100     # do_bench's time budget per column (--rep; at 64k-128k one call takes 50-300 ms)


def bench(fn):
    """(median ms, mean SM clock in MHz or None)."""
    t, c = clocked_bench(fn, rep=REP_MS)
    return t, c.mhz


def timing(shapes, sizes, only=None):
    from flash_attn.cute import flash_attn_func
    labels = ["FA4", "FA4 pack_gqa=False", "cuDNN SDPA", "ours: all rows", "all rows + column sums",
              "column sums only (LSE kernel + transposed pass)", "transposed pass alone", "same, local mask, tile_m 128", "masses",
              "entropy+distance+argmax", "Triton all rows", "Triton rows + column sums", "entropy+distance", "argmax"]
    keep = range(len(labels))
    if only is not None:     # the two FA4 calls (the reference) and the columns asked for
        keep = [i for i, lab in enumerate(labels) if i < 2 or lab in only]
        if len(keep) - 2 != len(only):
            raise SystemExit(f"--only: unknown column in {sorted(only)}; columns: {labels}")
    print("| shape | N | " + " | ".join(labels[i] for i in keep) + " |")
    print("|---" * (len(keep) + 2) + "|")
    for name in shapes:
        H, G, d = SHAPES[name]
        for N in sizes:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, H, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, G, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, G, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            sc = d ** -0.5
            full = rows_request(N)
            cols = StatRequest(**{**full.__dict__, "received": True})
            edarg = StatRequest(entropy=True, distance=True, argmax=True)
            masses = StatRequest(sink_k=4, spans=full.spans, recent=64, window_distance=128)
            lse = fa4_stats.attention(q, k, v, scaling=sc, stats=StatRequest())[1]["lse"]

            def ours(req):
                return lambda: fa4_stats.attention(q, k, v, scaling=sc, stats=req)

            def colsum_local():
                saved = fa4_stats.COLSUM_MASK, fa4_stats.COLSUM_TILE_M
                fa4_stats.COLSUM_MASK, fa4_stats.COLSUM_TILE_M = "local", 0
                try:
                    return fa4_stats.received_sums(q, k, lse, scaling=sc)
                finally:
                    fa4_stats.COLSUM_MASK, fa4_stats.COLSUM_TILE_M = saved

            def cudnn():
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            fns = [
                lambda: flash_attn_func(qt, kt, vt, softmax_scale=sc, causal=True),
                lambda: flash_attn_func(qt, kt, vt, softmax_scale=sc, causal=True, pack_gqa=False),
                cudnn, ours(full), ours(cols), ours(StatRequest(received=True)),
                lambda: fa4_stats.received_sums(q, k, lse, scaling=sc), colsum_local,
                ours(masses), ours(edarg),
                lambda: ta.attention(q, k, v, scaling=sc, causal=True, stats=full),
                lambda: ta.attention(q, k, v, scaling=sc, causal=True, stats=cols),
                ours(StatRequest(entropy=True, distance=True)), ours(StatRequest(argmax=True)),
            ]
            fns = [fns[i] for i in keep]
            times, clocks = [], []
            for fn in fns:
                try:
                    with torch.no_grad():
                        t, mhz = bench(fn)
                    times.append(t)
                    clocks.append(f"{mhz:.0f}" if mhz else "-")
                except Exception as e:  # noqa: BLE001
                    times.append(None)
                    clocks.append("-")
                    print(f"  {name} {N}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            best = min(t for t in times[:2] if t is not None)      # the faster of FA4's two calls
            cells = [f"{t:.2f} ({best / t:.2f}×)" if t is not None else "failed" for t in times]
            print(f"| {name} H{H} G{G} d{d} | {N // 1024}k | " + " | ".join(cells) + " |", flush=True)
            print(f"  SM clock (MHz), same order: {' '.join(clocks)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated column labels to time (FA4's two calls always run)")
    ap.add_argument("--shapes", default="Llama-3-8B,Qwen2.5-7B,SmolLM2,Gemma-3")
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--rep", type=int, default=100, help="ms of timed calls per column (do_bench's rep)")
    a = ap.parse_args()
    global REP_MS
    REP_MS = a.rep
    worst = {}
    cases = () if a.no_check else ((2, 8, 2, 1000, 128, 0, [0, 3]), (1, 9, 3, 777, 64, 1, None),
                                   (1, 8, 4, 600, 256, 2, None), (1, 32, 8, 4096, 128, 3, None),
                                   (2, 4, 4, 1531, 64, 4, [7, 0]))
    for args in cases:
        for temp in (1.0, 4.0):
            e = check(*args[:6], key_pos0=args[6], temp=temp)
            for n, v in e.items():
                worst[n] = min(worst.get(n, 1.0), v) if n == "argmax_agree" else max(worst.get(n, 0.0), v)
    if worst:
        print("worst: " + " ".join(f"{n}={v:.2e}" for n, v in worst.items()), flush=True)
    if not a.check_only:
        timing(a.shapes.split(","), [int(x) for x in a.sizes.split(",")],
               only=None if a.only is None else set(a.only.split(",")))


if __name__ == "__main__":
    main()
