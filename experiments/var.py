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
``var_edits`` ScaleKeys path (tests). ``--via edits`` runs that path instead, one example at a time.

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
        n_random: int = 10, batch_size: int = 8, via: str = "hooks", progress: bool = True) -> dict:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    task = tasks.context_qa_task(model, n_cal + n_test, n_facts, n_passages, seed)
    sp = task.splits(seed, n_train=0, n_calibration=n_cal, n_test=n_test)
    cal, test = sp["calibration"], sp["test"]
    t0 = time.time()
    peak = var.first_token_peak(model, cal[0].tokens)
    if tau is None:
        tau = min(20.0, 0.8 * peak)
    dims = var.massive_dims(model, cal[0].tokens, tau)
    if not dims:
        raise SystemExit(f"no massive-activation dimension above tau = {tau:.2f} on {model.cfg.name} (VAR finds no "
                         "sink tokens, so it cannot change anything); try --tau auto or a lower --tau")
    vc = var.var_pass(model, cal, dims, tau, rho, min_target, batch_size, progress, "VAR pass (calibration)")
    rate = vc.applies.float().mean(0)                                                  # [L, H]
    heads = sorted((l, h) for l in range(2, L - 1) for h in range(H) if rate[l, h] >= select_rate)
    vt = var.var_pass(model, test, dims, tau, rho, min_target, batch_size, progress, "VAR pass (held-out)")
    kw = dict(p=p, rho=rho, min_target=min_target, batch_size=batch_size, via=via)
    rows = [controls.Row("base", vt.correct)]
    c_all, m_all = var.evaluate_var(model, test, vt.sinks, None, **kw)
    n_all = (L - 3) * H
    rows.append(controls.Row(f"VAR, all heads of layers 2..{L - 2} (paper)", c_all, n_heads=n_all))
    res = {"task": task.name, "task_description": task.description, "n_calibration": len(cal), "n_heldout": len(test),
           "n_facts": n_facts, "n_passages": n_passages, "chance": 1 / n_facts,
           "mean_tokens": sum(len(e.tokens) for e in test) / len(test), "massive_dims": dims,
           "first_token_peak": peak,
           "p": p, "rho": rho, "min_target": min_target, "tau": tau, "seed": seed, "select_rate": select_rate,
           "selected_heads": heads, "n_selected": len(heads),
           "rule_rate_calibration": rate.tolist(),
           "mean_sinks_in_context_per_layer": [
               sum(sum(1 for t in s.get(l, ()) if ex.target[0] <= t < ex.target[1]) for s, ex in zip(vt.sinks, test))
               / len(test) for l in range(L)],
           "share_rows_rule_holds_last_query": float(vt.applies[:, 2:L - 1].float().mean()),
           "margin_base": float(vt.margin.mean()), "margin_var_all": float(m_all.mean())}
    if heads:
        c_sel, m_sel = var.evaluate_var(model, test, vt.sinks, heads, **kw)
        rows.append(controls.Row(f"VAR, target-centric heads ({len(heads)})", c_sel, n_heads=len(heads), heads=heads))
        res["margin_var_selected"] = float(m_sel.mean())
        if n_random:
            sets = controls.random_head_sets(L, H, len(heads), n_random, seed, layers=range(2, L - 1))
            rc, rm = [], []
            for s in sets:
                c, m = var.evaluate_var(model, test, vt.sinks, s, **kw)
                rc.append(c)
                rm.append(m)
            rows.append(controls.Row(f"VAR, random {len(heads)} heads", torch.stack(rc), n_heads=len(heads), heads=sets))
            res["margin_var_random"] = float(torch.stack(rm).mean())
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
              a.select_rate, a.n_random, a.batch_size, a.via)
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
