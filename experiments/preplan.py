"""Preplan and anchor tokens (Li et al. 2025) on one reasoning prompt: the tokens, their coupling, and
an HTML view.

    python experiments/preplan.py --model smollm2 [--out DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import headscope as hs
from headscope.heads.data import load_reasoning_prompts
from headscope.heads.preplan import Preplan


def main(argv=None):

    p = argparse.ArgumentParser(description="Preplan and anchor tokens (Li et al. 2025).")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompt", type=int, default=0, help="index of the shipped reasoning prompt")
    p.add_argument("--text", default=None, help="a prompt of your own instead")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--out", default=None, help="folder for preplan.html, preplan_plot.html, tokens.csv")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    m = hs.load(a.model)
    an = Preplan(max_new_tokens=a.max_new_tokens)
    prompt = a.text or load_reasoning_prompts()[a.prompt]
    t0 = time.time()
    r = an.analyze(m, prompt)
    print(f"{time.time() - t0:.1f}s; layers {r.layers}; local heads {r.local_heads}; global heads {r.global_heads}")
    print("response:", repr(r.response))
    print("preplan:", [f"{i}:{r.tokens[i]!r}" for i in torch.nonzero(r.preplan).flatten().tolist()])
    print("anchor:", [f"{i}:{r.tokens[i]!r}" for i in torch.nonzero(r.anchor).flatten().tolist()])
    print(f"anchor at t or t+1: after preplan tokens {r.coupling(1):.3f}, after other tokens "
          f"{r.coupling(1, preplan=False):.3f}; anchors {int(r.anchor.sum())}/{int(torch.isfinite(r.fai).sum())} "
          f"tokens with an FAI, preplan {int(r.preplan.sum())}/{len(r.tokens) - 1}")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "preplan.html").write_text(r.html(full=True), encoding="utf-8")
        r.plot().write_html(out / "preplan_plot.html", include_plotlyjs="cdn")
        r.to_frame().to_csv(out / "tokens.csv", index=False)
        print("wrote", out)


if __name__ == "__main__":
    main()
