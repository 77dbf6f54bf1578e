"""Induction, echo, previous-token and duplicate-token heads (RazorAttention probe; IOI detectors),
and RazorAttention's retrieval set.

    python experiments/classic.py --model smollm2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import headscope as hs
from headscope.heads.classic import DuplicateToken, PreviousToken, razor_heads, razor_retrieval_set


def main(argv=None):
    p = argparse.ArgumentParser(description="Induction, echo, previous-token and duplicate-token heads.")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--block", type=int, default=200, help="random block length (paper: 2500)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--method", default="auto", choices=["auto", "pattern", "stats"])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=None, help="folder to save the HeadScores in")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    m = hs.load(a.model)
    t0 = time.time()
    res = razor_heads(m, progress=False, block_len=a.block, n_repeats=a.repeats, n_samples=a.samples,
                      method=a.method)
    t1 = time.time() - t0
    n_tok = 1 + a.block * a.repeats
    res["previous_token"] = PreviousToken().score(m, progress=False)
    res["duplicate_token"] = DuplicateToken().score(m, progress=False)
    print(f"## {a.model}: probe BOS + {a.block} random tokens x {a.repeats} ({n_tok} tokens, "
          f"{a.samples} sample(s)); induction + echo in {t1:.1f} s")
    for name, r in res.items():
        print(f"{name} ({r.dataset}) top {a.top}: " + ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in r.top(a.top)))
        print(f"  heads > 0.3: {int((r.scores > 0.3).sum())}, > 0.5: {int((r.scores > 0.5).sum())} of "
              f"{r.scores.numel()}; median {float(r.scores.median()):.3f}")
    kv = razor_retrieval_set(res["induction"], res["echo"])
    G = m.cfg.n_kv_heads
    print(f"RazorAttention retrieval set (KV heads, top 14% induction ∪ top 1% echo): {len(kv)} of "
          f"{m.cfg.n_layers * G}: " + ", ".join(f"L{l}KV{g}" for l, g in kv))
    if a.out:
        for name, r in res.items():
            r.save(Path(a.out) / f"{name}_{a.model}")
    return res


if __name__ == "__main__":
    main()
