"""Compare the head scores of two `headscope report` folders analyzer by analyzer: the same model
run on two devices or attention paths (CPU chunked path vs CUDA Triton kernels, say).

    python benchmarks/compare_reports.py REPORT_A REPORT_B [--top 10] [--markdown]

Per analyzer: the largest |score difference| over heads (and relative to the largest |score|), the
Spearman correlation over all [layer, head] scores, whether the top head agrees, and how many of
the top-k heads the two share. Reads `raw/NAME` (HeadScores) of both folders; analyzers present in
only one are listed as such.
"""
import argparse
from pathlib import Path

import torch

from headscope.heads import HeadScores


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two flat tensors (average ranks for ties), NaN-free entries only."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].double(), b[ok].double()

    def ranks(x):
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=x.dtype)
        for v in torch.unique(x):                 # ties: the mean rank of the tied block
            m = x == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def compare(dir_a: Path, dir_b: Path, top: int = 10) -> list[dict]:
    """One dict per analyzer found in either folder's raw/."""
    names = sorted({p.stem for d in (dir_a, dir_b) for p in (d / "raw").glob("*.json")})
    rows = []
    for name in names:
        pa, pb = dir_a / "raw" / name, dir_b / "raw" / name
        if not (pa.with_suffix(".json").exists() and pb.with_suffix(".json").exists()):
            rows.append({"analyzer": name, "missing": str(dir_b if pa.with_suffix(".json").exists() else dir_a)})
            continue
        a, b = HeadScores.load(pa).scores.float(), HeadScores.load(pb).scores.float()  # [L, H]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        fa, fb = a.flatten(), b.flatten()
        ok = torch.isfinite(fa) & torch.isfinite(fb)
        diff = (fa[ok] - fb[ok]).abs()
        scale = float(torch.maximum(fa[ok].abs(), fb[ok].abs()).max()) if ok.any() else 0.0
        k = min(top, int(ok.sum()))
        ta = set(torch.topk(torch.where(ok, fa, -torch.inf), k).indices.tolist())
        tb = set(torch.topk(torch.where(ok, fb, -torch.inf), k).indices.tolist())
        H = a.shape[1]
        ia, ib = int(torch.where(ok, fa, -torch.inf).argmax()), int(torch.where(ok, fb, -torch.inf).argmax())
        rows.append({"analyzer": name, "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
                     "max_rel_diff": float(diff.max()) / scale if scale > 0 else 0.0,
                     "spearman": spearman(fa, fb), "top_a": f"L{ia // H}H{ia % H}", "top_b": f"L{ib // H}H{ib % H}",
                     "top_k_shared": len(ta & tb), "k": k,
                     "nan_mismatch": int((torch.isfinite(fa) != torch.isfinite(fb)).sum())})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    rows = compare(args.a, args.b, args.top)
    print(f"| analyzer | max abs diff | max diff / max abs score | Spearman | top head A / B | top-{args.top} shared |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "missing" in r:
            print(f"| {r['analyzer']} | missing in {r['missing']} | | | | |")
            continue
        nan = f" ({r['nan_mismatch']} NaN mismatches)" if r["nan_mismatch"] else ""
        print(f"| {r['analyzer']} | {r['max_abs_diff']:.3g}{nan} | {r['max_rel_diff']:.3g} | {r['spearman']:.4f} | "
              f"{r['top_a']} / {r['top_b']} | {r['top_k_shared']}/{r['k']} |")


if __name__ == "__main__":
    main()
