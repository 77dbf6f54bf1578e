"""Retrieval-head scores (Wu et al. 2024) on the needle-in-a-haystack grid, and the masking experiment.

    python experiments/retrieval.py --model smollm2 [--mask-k 5 10]
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import headscope as hs
from headscope.heads.retrieval import Retrieval, masking_experiment


def main(argv=None):
    p = argparse.ArgumentParser(prog="python experiments/retrieval.py",
                                description="Retrieval-head scores (Wu et al. 2024) and the masking experiment")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="haystack+needle tokens (default: quick)")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths in percent")
    p.add_argument("--needles", type=int, default=None, help="number of shipped needles (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--paper", action="store_true", help="the reference grid (20 lengths x 10 depths, all needles)")
    p.add_argument("--mask-k", type=int, nargs="*", default=[], help="run the masking experiment with these k")
    p.add_argument("--n-random", type=int, default=3)
    p.add_argument("--mask-lengths", type=int, nargs="+", default=None, help="masking grid (default: the scoring grid)")
    p.add_argument("--mask-depths", type=float, nargs="+", default=None)
    p.add_argument("--stop-at-eos", action="store_true",
                   help="also stop decoding at EOS / end of turn (headscope's earlier rule; default: the "
                        "reference's, the newline token only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", default=None, help="write the HeadScores here (PATH.json + PATH.safetensors)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    m = hs.load(a.model)
    kw = {}
    if a.lengths:
        kw["lengths"] = tuple(a.lengths)
    if a.depths:
        kw["depths"] = tuple(a.depths)
    if a.needles:
        kw["needles"] = a.needles
    if a.max_new_tokens:
        kw["max_new_tokens"] = a.max_new_tokens
    kw["stop_at_eos"] = a.stop_at_eos
    an = Retrieval.paper_config(**kw) if a.paper else Retrieval(**kw)
    res = an.score(m)
    if a.save:
        res.save(a.save)
    n = res.scores.numel()
    thr = res.threshold
    print(f"model {m.cfg.name}: {len(res.extra['test_recall'])} tests, {int(res.extra['test_counted'].sum())} "
          f"passed the ROUGE gate; mean recall {float(res.extra['test_recall'].mean()):.3f}; {res.seconds:.1f} s")
    print(f"retrieval heads (> {thr}): {int(res.classify().sum())}/{n} = {res.fraction():.1%}; "
          f"exactly 0: {int((res.scores == 0).sum())}/{n} = {float((res.scores == 0).float().mean()):.1%}")
    print("top 10:", ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in res.top(10)))
    win = m.cfg.windows
    if any(w is not None for w in win):
        for kind, ls in (("sliding", [i for i, w in enumerate(win) if w is not None]),
                         ("full", [i for i, w in enumerate(win) if w is None])):
            sub = res.scores[ls]
            print(f"  {kind} layers {ls}: mean {float(sub.mean()):.4f} max {float(sub.max()):.4f} "
                  f"(> 0.1: {int((sub > 0.1).sum())}/{sub.numel()})")
    print("per layer max:", " ".join(f"{float(x):.2f}" for x in res.scores.max(1).values))
    print("grid recall [length x depth]:", res.extra["grid_lengths"].tolist(), res.extra["grid_depths"].tolist())
    print(res.extra["grid_recall"])
    print("prompt tokens:", res.extra["test_prompt_tokens"].tolist())
    print("outputs:", res.info["outputs"])
    man = an
    if a.mask_lengths or a.mask_depths:
        man = replace(an, lengths=tuple(a.mask_lengths) if a.mask_lengths else an.lengths,
                      depths=tuple(a.mask_depths) if a.mask_depths else an.depths)
    base = None
    for k in a.mask_k:
        r = masking_experiment(m, res, k=k, n_random=a.n_random, seed=a.seed, analyzer=man, baseline=base)
        base = r["baseline_run"]
        print(f"masking k={k}: no mask {r['baseline']:.3f} | top-{k} retrieval heads {r['top_k']:.3f} | "
              f"random {k} heads {r['random_mean']:.3f} ± {r['random_std']:.3f} ({', '.join(f'{x:.3f}' for x in r['random'])})")
        print("  top heads:", r["top_heads"])
        print(f"  {r['n_tests']} tests; recall per test: no mask {[round(x, 2) for x in r['baseline_recall']]}, "
              f"top-k {[round(x, 2) for x in r['top_k_recall']]}")
        print("  top-k outputs:", r["outputs"]["top_k"])


if __name__ == "__main__":
    main()
