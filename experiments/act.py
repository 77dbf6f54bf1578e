"""ACT (Yu et al. 2024, ICML, §3.3) with enough data to see an effect: head selection on a labelled
calibration split, accuracy on a disjoint held-out split, against the base model and against
``--n-random`` random head sets of the same size (bootstrap 95% CIs, paired deltas).

Task (default ``sentiment-chat``, 2,999 VADER words, ``interventions/tasks.py``): a two-way
classification read from the next-token logits of " positive" / " negative" (ACT's classification
setting). Selection is the paper's rule: calibrate each head of layers 2..L-2 (the reference code's;
``--first-layer 1`` for the paper's "all but the first") alone on the
calibration split and keep those that raise its accuracy (``--min-gain``, optionally ``--top-k``).
The per-head sweep is batched (``interventions.act.task_pass``): one recorded pass per batch, then
one forward per layer for all its heads at once; the held-out conditions run the ``ScaleKeys`` edits.

    python experiments/act.py --model smollm2 --device cuda --out runs/act
    python experiments/act.py --model tiny-llama --task copy --calibration 8 --heldout 8 --max-heads 4 \
        --first-layer 1   # smoke test
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import headscope as hs
from headscope.heads.scores import write_json
from headscope.interventions import act, controls, tasks
from headscope.interventions.edits_io import atomic_folder


def run(model, task: tasks.Task, n_cal: int, n_test: int, beta: float = 0.4, threshold: float | str = 0.1,
        seed: int = 0, n_random: int = 10, batch_size: int = 16, max_heads: int | None = None,
        min_gain: float = 0.0, top_k: int | None = None, progress: bool = True, first_layer: int = 2) -> dict:
    """The whole experiment on a loaded model: -> results dict (rows with CIs, heads, timings)."""
    sp = task.splits(seed, n_train=0, n_calibration=n_cal, n_test=n_test)
    rows, extra, _ = act.compare(model, sp["calibration"], sp["test"], beta, threshold, n_random, seed, batch_size,
                                 min_gain, top_k, max_heads, progress, first_layer=first_layer)
    res = {"task": task.name, "task_description": task.description, "seed": seed, **extra}
    res["rows"] = controls.table(rows, seed=seed)
    res["table_md"] = controls.format_table(res["rows"])
    return res


def load_task(name: str, model) -> tasks.Task:
    if name == "copy":                       # token-only smoke test for tokenizer-less models
        return tasks.token_task(256, length=10, vocab=min(model.cfg.vocab_size, 128))
    return tasks.load_task(name, model)


def main(argv=None):
    p = argparse.ArgumentParser(description="ACT head selection vs base vs random heads, held-out, with CIs.")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="sentiment-chat", help=f"{', '.join(tasks.TASKS)} or copy (synthetic)")
    p.add_argument("--calibration", type=int, default=400)
    p.add_argument("--heldout", type=int, default=600)
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--threshold", default="0.1", help="a number (reference: 0.1) or 'alpha/N' (paper, e.g. 5/N)")
    p.add_argument("--min-gain", type=float, default=0.0, help="keep heads whose calibration gain exceeds this")
    p.add_argument("--top-k", type=int, default=None, help="keep at most this many heads (best gains)")
    p.add_argument("--max-heads", type=int, default=None, help="sweep only the first N candidate heads (smoke test)")
    p.add_argument("--first-layer", type=int, default=2, help="first calibrated layer (2: reference code; 1: paper)")
    p.add_argument("--n-random", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    m = hs.load(a.model, device=a.device)
    task = load_task(a.task, m)
    res = run(m, task, a.calibration, a.heldout, a.beta, act.parse_threshold(a.threshold), a.seed, a.n_random, a.batch_size,
              a.max_heads, a.min_gain, a.top_k, first_layer=a.first_layer)
    res.update(model=m.cfg.name, device=str(m.device), seconds_total=time.time() - t0, args=vars(a),
               date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(res["table_md"])
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "gain_calibration", "table_md")}))
    if a.out:
        with atomic_folder(a.out) as tmp:
            write_json(tmp / "act.json", res)
            (tmp / "act.md").write_text(
                f"# ACT on {m.cfg.name}, task {task.name}\n\n{res['table_md']}\n\n"
                f"calibration {res['n_calibration']} / held-out {res['n_heldout']}; kept {res['n_kept']} of "
                f"{res['candidate_heads']} heads; sweep {res['seconds_sweep']:.1f} s, held-out "
                f"{res['seconds_heldout']:.1f} s\n", encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
