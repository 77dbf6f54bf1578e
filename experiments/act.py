"""ACT (Yu et al. 2024, ICML, §3.3) with enough data to see an effect: head selection on a labelled
calibration split, accuracy on a disjoint held-out split, against the base model and against
``--n-random`` random head sets of the same size (bootstrap 95% CIs, paired deltas).

Task (default ``sentiment-chat``, 2,999 VADER words, ``interventions/tasks.py``): a two-way
classification read from the next-token logits of " positive" / " negative" (ACT's classification
setting). Selection is the paper's rule: calibrate each head of layers 1..L-2 alone on the
calibration split and keep those that raise its accuracy (``--min-gain``, optionally ``--top-k``).
The per-head sweep is batched (``interventions.act.task_pass``): one recorded pass per batch, then
one forward per layer for all its heads at once; the held-out conditions run the ``ScaleKeys`` edits.

    python experiments/act.py --model smollm2 --device cuda --out runs/act
    python experiments/act.py --model tiny-llama --task copy --calibration 8 --heldout 8 --max-heads 4   # smoke test
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import headscope as hs
from headscope.heads.scores import write_json
from headscope.interventions import act, controls, tasks
from headscope.interventions.edits_io import atomic_folder


def run(model, task: tasks.Task, n_cal: int, n_test: int, beta: float = 0.4, threshold: float = 0.1,
        seed: int = 0, n_random: int = 10, batch_size: int = 16, max_heads: int | None = None,
        min_gain: float = 0.0, top_k: int | None = None, progress: bool = True) -> dict:
    """The whole experiment on a loaded model: -> results dict (rows with CIs, heads, timings)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sp = task.splits(seed, n_train=0, n_calibration=n_cal, n_test=n_test)
    cal, test = sp["calibration"], sp["test"]
    layers = list(range(1, L - 1))
    cand = [(l, h) for l in layers for h in range(H)]
    if max_heads is not None:
        cand = cand[:max_heads]
        layers = sorted({l for l, _ in cand})
    t0 = time.time()
    p_cal = act.task_pass(model, cal, layers, beta, threshold, sweep=True, batch_size=batch_size,
                          progress=progress, desc="ACT sweep (calibration)")
    t_sweep = time.time() - t0
    heads, gain = act.select_from_sweep(p_cal, layers, min_gain, top_k)
    heads = [x for x in heads if x in cand]
    t1 = time.time()
    p_test = act.task_pass(model, test, layers, beta, threshold, sweep=False,
                           batch_size=batch_size, progress=progress, desc="ACT sinks (held-out)")
    rows = [controls.Row("base", p_test.correct)]
    res = {"task": task.name, "task_description": task.description, "n_calibration": len(cal),
           "n_heldout": len(test), "beta": beta, "threshold": threshold, "seed": seed,
           "candidate_heads": len(cand), "kept_heads": heads, "n_kept": len(heads),
           "calibration_base_accuracy": float(p_cal.correct.float().mean()),
           "gain_calibration": gain.tolist(),
           "heads_with_gain": int((gain > min_gain).sum()), "heads_with_loss": int((gain < 0).sum()),
           "min_gain": min_gain, "top_k": top_k}
    if heads:
        c_cal, _ = act.evaluate_heads(model, cal, p_cal.sinks, heads, beta, batch_size)
        res["calibration_act_accuracy"] = float(c_cal.float().mean())
        c, _ = act.evaluate_heads(model, test, p_test.sinks, heads, beta, batch_size)
        rows.append(controls.Row(f"ACT-selected ({len(heads)} heads)", c, n_heads=len(heads), heads=heads))
        if n_random:
            sets = controls.random_head_sets(L, H, len(heads), n_random, seed, layers=layers)
            rc = []
            for s in sets:
                rc.append(act.evaluate_heads(model, test, p_test.sinks, s, beta, batch_size)[0])
            rows.append(controls.Row(f"random {len(heads)} heads", torch.stack(rc), n_heads=len(heads), heads=sets))
        allh = [(l, h) for l in layers for h in range(H)]
        rows.append(controls.Row(f"all heads of layers {layers[0]}..{layers[-1]}",
                                 act.evaluate_heads(model, test, p_test.sinks, allh, beta, batch_size)[0],
                                 n_heads=len(allh)))
    res["seconds_sweep"] = t_sweep
    res["seconds_heldout"] = time.time() - t1
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
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--min-gain", type=float, default=0.0, help="keep heads whose calibration gain exceeds this")
    p.add_argument("--top-k", type=int, default=None, help="keep at most this many heads (best gains)")
    p.add_argument("--max-heads", type=int, default=None, help="sweep only the first N candidate heads (smoke test)")
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
    res = run(m, task, a.calibration, a.heldout, a.beta, a.threshold, a.seed, a.n_random, a.batch_size,
              a.max_heads, a.min_gain, a.top_k)
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
