"""A/B of the transposed column-sum pass (``kernels/fa4_stats.received_sums``) on the GPU: mask
(FA4 local window vs reversed sequences + causal), tile_m (128 vs 192), whether the P.V product
is issued at all, and how many of every 8 exp2 run as a polynomial on the FMA pipe, each checked
against the fp32 reference first (d128 and d256), then timed against FA4 in the same run. Issue 13.

    python benchmarks/colsum_ab.py [--sizes 16384,32768] [--shapes Llama-3-8B,Qwen2.5-7B]
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)   # the repository root: benchmarks.*

import torch  # noqa: E402

from benchmarks.gpu_clock import bench  # noqa: E402
from headscope.kernels import fa4_stats, reference  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402

SHAPES = {"Llama-3-8B": (32, 8, 128), "Qwen2.5-7B": (28, 4, 128), "Gemma-3": (8, 4, 256)}
# (mask, tile_m at d <= 128 (0: FA4's), P.V "keep" | "skip", exp2 on the FMA pipe per 8 columns)
VARIANTS = [("causal", 192, "keep", 0), ("causal", 192, "skip", 0), ("causal", 192, "skip", 1),
            ("causal", 192, "skip", 2), ("causal", 192, "skip", 3), ("causal", 0, "skip", 2)]
DEFAULT = (fa4_stats.COLSUM_MASK, fa4_stats.COLSUM_TILE_M, fa4_stats.COLSUM_PV, fa4_stats.COLSUM_EX2_EMU)


def use(mask, tile_m, pv, emu):
    fa4_stats.COLSUM_MASK, fa4_stats.COLSUM_TILE_M, fa4_stats.COLSUM_PV = mask, tile_m, pv
    fa4_stats.COLSUM_EX2_EMU = emu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="Llama-3-8B,Qwen2.5-7B,Gemma-3")
    ap.add_argument("--sizes", default="16384,32768")
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    for B, H, G, N, d in ((2, 8, 2, 1531, 128), (1, 4, 2, 1000, 256)):
        q = (torch.randn(B, H, N, d, device="cuda", generator=g) * 2).bfloat16()
        k = torch.randn(B, G, N, d, device="cuda", generator=g).bfloat16()
        _, ref, _ = reference.attention(q.float(), k.float(), k.float(), scaling=d ** -0.5,
                                        stats=StatRequest(received=True))
        cases.append((q, k, ref))
    ok = []
    for var in VARIANTS:
        use(*var)
        try:
            errs = []
            for q, k, ref in cases:
                r = fa4_stats.received_sums(q, k, ref["lse"], scaling=q.shape[-1] ** -0.5)
                errs.append(((r - ref["received_sum"]).abs().max() / ref["received_sum"].abs().max()).item())
            print(f"check {var}: rel err d128 {errs[0]:.2e}, d256 {errs[1]:.2e}", flush=True)
            if max(errs) < 1e-5:
                ok.append(var)
        except Exception as e:  # noqa: BLE001
            print(f"check {var}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    from flash_attn.cute import flash_attn_func
    units = {}
    print("| shape | N | FA4 ms | " + " | ".join("/".join(map(str, v)) for v in ok) + " |")
    print("|---" * (len(ok) + 3) + "|")
    for name in a.shapes.split(","):
        H, G, d = SHAPES[name]
        for N in (int(x) for x in a.sizes.split(",")):
            q = torch.randn(1, H, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, G, N, d, device="cuda", dtype=torch.bfloat16, generator=g)
            qt, kt = q.transpose(1, 2), k.transpose(1, 2)
            lse = fa4_stats.attention(q, k, k, scaling=d ** -0.5, stats=StatRequest())[1]["lse"]
            t4, c4 = bench(lambda: flash_attn_func(qt, kt, kt, softmax_scale=d ** -0.5, causal=True), rep=300)
            cells = []
            for var in ok:
                use(*var)
                t, c = bench(lambda: fa4_stats.received_sums(q, k, lse, scaling=d ** -0.5), rep=300)
                cells.append(f"{t:.2f} ({t / t4:.2f} FA4; {c})")
                if d <= 128:
                    units.setdefault(var, []).append(t / t4)
            print(f"| {name} | {N // 1024}k | {t4:.2f} ({c4}) | " + " | ".join(cells) + " |", flush=True)
    use(*DEFAULT)
    if units:
        best = min(units, key=lambda v: sum(units[v]) / len(units[v]))
        print("mean FA4 units at d <= 128: " + ", ".join(f"{v}: {sum(u) / len(u):.3f}" for v, u in units.items()))
        print("BEST HEADSCOPE_FA4S_COLSUM=%s HEADSCOPE_FA4S_COLSUM_TILE_M=%d HEADSCOPE_FA4S_COLSUM_PV=%s "
              "HEADSCOPE_FA4S_COLSUM_EMU=%d" % best)


if __name__ == "__main__":
    main()
