"""DuoAttention streaming/retrieval heads: the training-free proxy and the gate training.

    python experiments/streaming.py --model smollm2 [--gates quick]
"""
from __future__ import annotations

import argparse
import torch

import headscope as hs
from headscope.heads.streaming import DuoGates, StreamingProxy


def main(argv=None):
    p = argparse.ArgumentParser(prog="python experiments/streaming.py",
                                description="DuoAttention streaming/retrieval heads: proxy and gate training")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--proxy", action="store_true", help="run the training-free proxy (default if no --gates)")
    p.add_argument("--gates", choices=["quick", "default", "paper"], default=None, help="train the gates")
    p.add_argument("--length", type=int, default=None, help="proxy: tokens per text")
    p.add_argument("--n-texts", type=int, default=None)
    p.add_argument("--sink", type=int, default=None)
    p.add_argument("--recent", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="gates: optimisation steps")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", default=None, help="prefix for PATH_proxy / PATH_gates HeadScores files")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    m = hs.load(a.model)
    win = m.cfg.windows
    common = {k: v for k, v in dict(sink=a.sink, recent=a.recent).items() if v is not None}

    def by_type(res):
        if any(w is not None for w in win):
            for kind, ls in (("sliding", [i for i, w in enumerate(win) if w is not None]),
                             ("full", [i for i, w in enumerate(win) if w is None])):
                sub = res.scores[ls]
                print(f"  {kind} layers {ls}: mean {float(sub.mean()):.4f} min {float(sub.min()):.4f} "
                      f"max {float(sub.max()):.4f}")
        print("  per layer mean:", " ".join(f"{float(x):.3f}" for x in res.scores.mean(1)))
        st = res.extra["streaming"].bool()
        print(f"  split at sparsity {a.sparsity}: threshold {res.threshold:.4f}, streaming heads "
              f"{int(st.sum())}/{st.numel()}; top 10 retrieval-like:",
              ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in res.top(10)))

    if a.proxy or a.gates is None:
        kw = dict(common, sparsity=a.sparsity)
        if a.length:
            kw["length"] = a.length
        if a.n_texts:
            kw["n_texts"] = a.n_texts
        res = StreamingProxy(**kw).score(m)
        print(f"proxy on {m.cfg.name} ({res.dataset}, sink {res.params['sink']}, recent {res.params['recent']}): "
              f"{res.seconds:.1f} s; mean outside mass {float(res.scores.mean()):.4f}, mean sink mass "
              f"{float(res.extra['sink_mass'].mean()):.4f}")
        by_type(res)
        if a.save:
            res.save(a.save + "_proxy")
    if a.gates:
        kw = dict(common, sparsity=a.sparsity)
        if a.steps:
            kw["steps"] = a.steps
        an = {"quick": DuoGates.quick, "default": DuoGates, "paper": DuoGates.paper_config}[a.gates](**kw)
        res = an.score(m)
        lo = res.extra["loss"]
        print(f"gates on {m.cfg.name} ({res.dataset}; {an.steps} steps, sink {an.sink}, recent {an.recent}): "
              f"{res.seconds:.1f} s; loss {float(lo[:5].mean()):.4f} -> {float(lo[-5:].mean()):.4f}, distill "
              f"{float(res.extra['distill_loss'][-5:].mean()):.5f}")
        print("  alpha per layer [KV heads]:")
        for l, row in enumerate(res.extra["alpha_kv"]):
            print(f"   L{l}: " + " ".join(f"{float(x):.2f}" for x in row))
        by_type(res)
        if a.save:
            res.save(a.save + "_gates")


if __name__ == "__main__":
    main()
