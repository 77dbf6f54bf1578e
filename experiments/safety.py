"""Safety heads: Ships and Sahara (Zhou et al. 2025), then the attack-success-rate check with the top
heads ablated against a random head.

    python experiments/safety.py --model smollm2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import headscope as hs
from headscope.heads.common import random_heads
from headscope.heads.safety import SHIPS_TEMPLATE, Sahara, Ships, attack_success_rate
from headscope.heads.scores import write_json


def main(argv=None):
    p = argparse.ArgumentParser(description="Safety heads: Ships and Sahara (Zhou et al. 2025) + ASR check.")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--queries", type=int, default=4, help="harmful requests for Ships (quick 4)")
    p.add_argument("--sahara-queries", type=int, default=8, help="harmful requests for Sahara (quick 8)")
    p.add_argument("--screen-layers", type=int, default=4,
                   help="quick layer screen: score heads of this many layers only (0 = every layer, the paper)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--candidates", type=int, default=8, help="heads tried after round 1 (0 = all)")
    p.add_argument("--template", default="chat", choices=("chat", "none", "ships"),
                   help="Ships' prompt: 'chat' (default here, as reports/safety.md was made), 'none' (the raw "
                        "request: the reference's and the library's default) or 'ships' (## Query:{q} \\n## Answer:)")
    p.add_argument("--system", default=None, help="system prompt for the chat template (default: template's)")
    p.add_argument("--asr-queries", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of parts to skip: ships,sahara,asr")
    p.add_argument("--out", default=None, help="folder to save HeadScores and answers in")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    skip = set(filter(None, a.skip.split(",")))
    m = hs.load(a.model)
    out = Path(a.out) if a.out else None
    screen = a.screen_layers or None
    heads = {}
    if "ships" not in skip:
        template = {"chat": "chat", "none": None, "ships": SHIPS_TEMPLATE}[a.template]
        r = Ships(n_queries=a.queries, template=template, system=a.system, screen_layers=screen).score(m)
        print(f"Ships ({r.seconds:.1f}s, {r.dataset}, layers scored "
              f"{torch.nonzero(r.extra['scored_layers'][:, 0]).flatten().tolist()}) top heads:")
        for l, h, s in r.top(10):
            print(f"  L{l} H{h}  mean KL {s:.4f}  in top-10 of {int(r.extra['top_count'][l, h])}/{len(r.extra['per_query'])} queries")
        heads["ships top"] = r.top(1)[0][:2]
        if out:
            r.save(out / "ships")
    if "sahara" not in skip:
        r = Sahara(n_queries=a.sahara_queries, rounds=a.rounds, candidates=a.candidates or None,
                   screen_layers=screen).score(m)
        print(f"Sahara ({r.seconds:.1f}s, {r.dataset}) first-round top heads:")
        for l, h, s in r.top(10):
            print(f"  L{l} H{h}  angle {s:.2f} deg")
        print("  greedy set: " + ", ".join(f"L{l}H{h} ({ang:.2f} deg)" for (l, h), ang in r.info["greedy"]))
        heads["sahara top"] = r.info["greedy"][0][0]
        if len(r.info["greedy"]) > 1:
            heads["sahara set"] = [x for x, _ in r.info["greedy"]]
        if out:
            r.save(out / "sahara")
    if "asr" not in skip:
        t0 = time.time()
        conds = {"none": []}
        for k, v in heads.items():
            conds[k] = list(v) if isinstance(v, list) else [tuple(v)]
        used = {tuple(x) for v in conds.values() for x in v}
        conds[f"random (seed {a.seed})"] = random_heads(m.cfg.n_layers, m.cfg.n_heads, 1, exclude=used, seed=a.seed)
        res, seen = {}, set()
        for k, hs_ in conds.items():
            if tuple(hs_) in seen:          # e.g. Sahara's first head is Ships' top head
                continue
            seen.add(tuple(hs_))
            res[k] = attack_success_rate(m, heads=hs_, n=a.asr_queries, max_new_tokens=a.max_new_tokens,
                                         system=a.system)
            print(f"  ASR {k:16s} heads={res[k]['heads']}  {res[k]['asr']:.3f}", flush=True)
        print(f"ASR check took {time.time() - t0:.0f}s ({a.asr_queries} requests, {a.max_new_tokens} new tokens)")
        if out:
            write_json(out / "asr.json", res)


if __name__ == "__main__":
    main()
