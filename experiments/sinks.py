"""Attention sinks (Gu et al. 2024) and hidden sinks (ACT, Yu et al. 2024) on a model: the Sink_1^eps
metric, per-layer sink shares, the top heads, and the hidden-sink tokens.

    python experiments/sinks.py --model smollm2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import headscope as hs
from headscope.heads.common import received_importance
from headscope.heads.data import text_samples
from headscope.heads.sinks import HiddenSinks, Sinks, hidden_sinks_from_importance, sink_metric


def main(argv=None):

    p = argparse.ArgumentParser(description="Attention sinks (Gu et al. 2024) and hidden sinks (ACT).")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=20, help="natural-text samples (paper: 100)")
    p.add_argument("--tokens", type=int, default=64, help="T (paper: 64)")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--hidden-samples", type=int, default=8)
    p.add_argument("--hidden-tokens", type=int, default=128)
    p.add_argument("--min-queries", type=int, default=16,
                   help="also report hidden sinks among keys seen by >= this many queries (1 = ACT's rule)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=None, help="folder to save the HeadScores in")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    m = hs.load(a.model)
    sk = Sinks(eps=a.eps, n_tokens=a.tokens, n_samples=a.samples).score(m, progress=False)
    print(f"## {a.model}: Sink_1^{a.eps} = {sink_metric(sk):.2f}% of (layer, head) pairs "
          f"({int(sk.extra['n_samples'])} samples x {a.tokens} tokens, {sk.seconds:.1f} s)")
    by_k = sk.extra["sink_metric_by_position"]
    print("Sink_k for k = 1..5: " + ", ".join(f"{float(v):.2f}%" for v in by_k[:5]))
    per_layer = (sk.extra["sink_rate"]).mean(1) * 100
    print("per-layer share of heads with alpha_1 > eps (%): " + " ".join(f"{float(v):.0f}" for v in per_layer))
    print(f"top {a.top} heads by alpha_1: " + ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in sk.top(a.top)))
    print(f"bottom {min(a.top, 5)} heads by alpha_1: " + ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in
                                                                sk.top(min(a.top, 5), largest=False)))
    hsk = HiddenSinks(n_samples=a.hidden_samples, n_tokens=a.hidden_tokens, min_queries=a.min_queries)
    htoks, hds = text_samples(m, None, a.hidden_samples, a.hidden_tokens)
    imp = received_importance(m, htoks, progress=False)
    for mq in sorted({1, a.min_queries}):
        r = hidden_sinks_from_importance(m, htoks, imp, min_queries=mq, dataset=hds)
        _print_hidden(m, r, a, mq)
    sc = hsk.from_result(m, r, time.time())
    print("heads with most hidden sinks: " + ", ".join(f"L{l}H{h} {v:.2f}" for l, h, v in sc.top(a.top)))
    if a.out:
        sk.save(Path(a.out) / f"sinks_{a.model}")
        sc.save(Path(a.out) / f"hidden_sinks_{a.model}")
    return sk, r


def _print_hidden(m, r, a, mq):
    S = r.count.shape[0]
    print(f"\n## hidden sinks (ACT, a_j > {r.params['threshold']:.3g}, min_queries {mq}, "
          f"{S} samples x {a.hidden_tokens} tokens)")
    print(f"first-found sink is position 0 in {100 * float((r.first == 0).float().mean()):.1f}% of (sample, head); "
          f"heads with >= 1 hidden sink: {100 * float((r.count > 0).float().mean()):.1f}%; "
          f"mean hidden sinks per head: {float(r.count.mean()):.2f}")
    print("most frequent hidden-sink tokens: " + ", ".join(f"{t!r} x{c}" for t, c in r.by_token(12)))
    print("most frequent positions: " + ", ".join(f"{pos} x{c}" for pos, c in r.by_position(10)))
    top = sorted(r.sinks, key=lambda s: -s.score)[:a.top]
    for s in top:
        ctx = m.to_string(r.tokens[s.sample, max(0, s.position - 6):s.position + 1]) if m.tokenizer else ""
        print(f"  sample {s.sample} L{s.layer}H{s.head} pos {s.position} token {s.token!r} a={s.score:.3f} "
              f"context …{ctx!r}")


if __name__ == "__main__":
    main()
