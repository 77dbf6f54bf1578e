"""VAR (Kang et al. 2025, ICLR, §4) on a context-grounded QA task below the model's ceiling: pet
facts ("Note: NAME keeps a pet ANIMAL.") scattered among real prose passages, the question "What pet
does NAME keep?", the answer read among the context's animals (``interventions.tasks.context_qa_task``).
VAR's token group is the context. Conditions, all on the same held-out examples (bootstrap 95% CIs,
deltas paired with the base model):

- base;
- VAR as in the paper: every head of layers 2..L-2, the row rule deciding per query;
- VAR on the "target-centric" heads only: heads whose last-query row meets the rule (and whose layer
  has sink tokens in the context) on >= ``--select-rate`` of a disjoint calibration split;
- VAR on ``--n-random`` random head sets of that size from layers 2..L-2.

The edit runs as a per-example pattern hook (``interventions.var.evaluate_var``), equal to the
``var_edits`` ScaleKeys path (tests). Each layer's sink tokens come from its input in the edited pass,
as the reference's (``--sinks-from edited``); ``--sinks-from unedited`` takes them from one unedited
forward. ``--via edits`` runs the ScaleKeys path instead, one example at a time (unedited sinks only).

    python experiments/var.py --model smollm2 --device cuda --out runs/var
    python experiments/var.py --model smollm2 --calibration 8 --heldout 8 --passages 1 --n-random 2   # CPU check
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import headscope as hs
from headscope.heads.scores import write_json
from headscope.interventions import controls, tasks, var
from headscope.interventions.edits_io import atomic_folder


def run(model, n_cal: int, n_test: int, n_facts: int = 6, n_passages: int = 3, seed: int = 0, p: float = 0.6,
        rho: float = 0.5, min_target: float = 0.2, tau: float | None = 20.0, select_rate: float = 0.5,
        n_random: int = 10, batch_size: int = 8, via: str = "hooks", progress: bool = True,
        queries: str = "after_target", sinks_from: str = "edited") -> dict:
    task = tasks.context_qa_task(model, n_cal + n_test, n_facts, n_passages, seed)
    sp = task.splits(seed, n_train=0, n_calibration=n_cal, n_test=n_test)
    cal, test = sp["calibration"], sp["test"]
    t0 = time.time()
    try:
        rows, extra = var.compare(model, cal, test, p, rho, min_target, tau, select_rate, n_random, seed,
                                  batch_size, via, progress, queries=queries, sinks_from=sinks_from)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    extra.pop("sinks_example0", None)
    res = {"task": task.name, "task_description": task.description, "n_calibration": len(cal), "n_heldout": len(test),
           "n_facts": n_facts, "n_passages": n_passages, "chance": 1 / n_facts,
           "mean_tokens": sum(len(e.tokens) for e in test) / len(test), "seed": seed, **extra}
    res["seconds"] = time.time() - t0
    res["rows"] = controls.table(rows, seed=seed)
    res["table_md"] = controls.format_table(res["rows"])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description="VAR on context-grounded QA (facts among prose passages), with controls.")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calibration", type=int, default=100, help="examples for the target-centric head selection")
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--facts", type=int, default=6, help="facts (answer candidates) per context")
    ap.add_argument("--passages", type=int, default=3, help="distractor prose passages per context")
    ap.add_argument("--p", type=float, default=0.6, help="VAR's sink scale")
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--min-target", type=float, default=0.2)
    ap.add_argument("--tau", default="20", help="massive-activation threshold on the RMS-normalised hidden state: "
                    "a number (paper: 20) or 'auto' = min(20, 0.8 x the first token's peak value over layers >= 2), "
                    "for models whose massive activations stay below 20")
    ap.add_argument("--select-rate", type=float, default=0.5)
    ap.add_argument("--n-random", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--via", choices=("hooks", "edits"), default="hooks")
    ap.add_argument("--queries", choices=("after_target", "all"), default="after_target",
                    help="query rows VAR edits: after the context (the reference) or all")
    ap.add_argument("--sinks-from", choices=("edited", "unedited"), default="edited",
                    help="sink tokens per layer from the edited pass (the reference) or the unedited forward "
                         "(needed with --via edits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    m = hs.load(a.model, device=a.device)
    tau = float(a.tau) if a.tau != "auto" else None
    res = run(m, a.calibration, a.heldout, a.facts, a.passages, a.seed, a.p, a.rho, a.min_target, tau,
              a.select_rate, a.n_random, a.batch_size, a.via, queries=a.queries, sinks_from=a.sinks_from)
    res.update(model=m.cfg.name, device=str(m.device), seconds_total=time.time() - t0, args=vars(a),
               date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(res["table_md"])
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "table_md", "rule_rate_calibration")}))
    if a.out:
        with atomic_folder(a.out) as tmp:
            write_json(tmp / "var.json", res)
            (tmp / "var.md").write_text(
                f"# VAR on {m.cfg.name}, {res['task_description']}\n\n{res['table_md']}\n\n"
                f"calibration {res['n_calibration']} / held-out {res['n_heldout']}, mean {res['mean_tokens']:.0f} "
                f"tokens, chance {res['chance']:.3f}; {res['n_selected']} target-centric heads; "
                f"{res['seconds']:.1f} s\n", encoding="utf-8")
    return res


if __name__ == "__main__":
    main()
