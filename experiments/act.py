"""ACT (Yu et al. 2024) on a harmful-request classification task (Yes/No): head selection on a
calibration split, accuracy on the held-out split against as many random heads.

    python experiments/act.py --model smollm2 [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import headscope as hs
from headscope.heads.common import random_heads
from headscope.heads.data import split_requests
from headscope.heads.scores import write_json
from headscope.interventions.act import accuracy, harm_task, prepare, select_heads


def main(argv=None):
    p = argparse.ArgumentParser(description="ACT on SmolLM2: harmful-request classification (Yes/No).")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calibration", type=int, default=10, help="examples per class for head selection")
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    m = hs.load(a.model)
    split = split_requests(a.seed, 25)
    calib = harm_task(m, split["harmful_train"][:a.calibration], split["harmless_train"][:a.calibration])
    test = harm_task(m, split["harmful_test"], split["harmless_test"])
    sel = select_heads(m, calib, beta=a.beta)
    prepared = [prepare(m, ex, sel.threshold) for ex in test]
    res = {"calibration_base": sel.base_accuracy, "kept_heads": sel.heads, "seconds_selection": sel.seconds,
           "test_base": accuracy(m, test, (), prepared=prepared),
           "test_act": accuracy(m, test, sel.heads, a.beta, prepared=prepared)}
    L, H = m.cfg.n_layers, m.cfg.n_heads
    rand = random_heads(L, H, len(sel.heads), seed=a.seed, layers=range(1, L - 1))
    res["random_heads"] = rand
    res["test_random"] = accuracy(m, test, rand, a.beta, prepared=prepared)
    res["top_gains"] = [(l, h, float(sel.gain[l, h])) for l, h in sel.heads[:20]]
    print(json.dumps(res, indent=1))
    if a.out:
        write_json(Path(a.out) / "act.json", res)
    return res


if __name__ == "__main__":
    main()
