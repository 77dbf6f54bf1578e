"""``headscope circuit``: find a task's circuit with one method and write circuit.html,
circuit.json and circuit.safetensors (raw tensors) into --out (a temporary folder, then renamed);
``headscope circuit --compare DIR1 DIR2`` prints ROC AUC and overlap of two saved circuits.

Wiring (app/cli.py): ``circuit_cli.add_parser(sub)`` then ``a.func(a)`` for ``a.cmd == "circuit"``.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..circuits.tasks import TASKS

METHODS = ("patching", "path", "eap", "eap-ig", "acdc", "sae")
_RECV = re.compile(r"^(\d+)\.(\d+)\.([qkv])$")


def add_parser(subparsers):
    """Add the ``circuit`` subcommand (task, ``--method``, ``--out``, the method options, ``--compare``)
    to an argparse ``subparsers`` object; returns its parser, with ``func=run`` as default."""
    p = subparsers.add_parser("circuit", help="find a task's circuit (patching, path, EAP, EAP-IG, ACDC, SAE) "
                                              "or compare two saved circuits")
    p.add_argument("task", nargs="?", help=f"one of {', '.join(sorted(TASKS))}")
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, tiny-*, or a local HF folder")
    p.add_argument("--method", default="patching", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", help="output folder (written atomically)")
    p.add_argument("--n", type=int, default=40, help="number of prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-prepend-bos", action="store_true",
                   help="tokenize the task without the BOS that model.to_tokens prepends (the sequences "
                        "headscope used before 2026-12-03)")
    p.add_argument("--how", default="mean", help="patching ablation: mean, zero or resample")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    p.add_argument("--tau", type=float, default=0.01, help="ACDC threshold")
    p.add_argument("--metric", default="kl", help="ACDC distance: kl or task")
    p.add_argument("--level", default="nodes", help="ACDC level: nodes or edges (EAP's top --candidates edges)")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--sae-design", default="shared", choices=("shared", "per_head"),
                   help="sae: one SAE for all heads (the reference code) or one per head")
    p.add_argument("--receivers", default="logits",
                   help="path patching receivers: 'logits' or comma-separated LAYER.HEAD.q|k|v (k/v: KV head)")
    p.add_argument("--compare", nargs=2, metavar=("DIR1", "DIR2"), help="compare two saved circuits")
    p.add_argument("--top", type=int, default=10, help="heads counted as 'in the circuit' for --compare / printing")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the faithfulness curve")
    p.add_argument("--force", action="store_true", help="analyse even when the model does not do the task")
    p.add_argument("--device", default=None)
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS|local",
                   help="patching only: spread the sweep over a Ray cluster (local: start one with --workers CPUs)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: every CPU/GPU of the cluster)")
    p.set_defaults(func=run)
    return p


def _fail(msg) -> int:
    print(f"headscope circuit: {msg}", file=sys.stderr)
    return 2


def _validate(a):
    """Everything that can be checked without the model; returns an error message or None."""
    if a.compare:
        for d in a.compare:
            if not (Path(d) / "circuit.json").exists():
                return f"{d} holds no circuit.json (write one with `headscope circuit TASK --out {d}`)"
        return None
    if not a.task:
        return f"give a task ({', '.join(sorted(TASKS))}) or --compare DIR1 DIR2"
    if a.task not in TASKS:
        return f"unknown task {a.task!r}; choose from {', '.join(sorted(TASKS))}"
    if a.method not in METHODS:
        return f"unknown method {a.method!r}; choose from {', '.join(METHODS)}"
    if not a.out:
        return "--out DIR is required"
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    if a.n < 2:
        return "--n must be at least 2"
    if a.steps < 1:
        return "--steps must be at least 1"
    if a.tau < 0:
        return "--tau must be >= 0"
    if a.how not in ("mean", "zero", "resample"):
        return f"--how {a.how!r}: use mean, zero or resample"
    if a.metric not in ("kl", "task"):
        return f"--metric {a.metric!r}: use kl or task"
    if a.level not in ("nodes", "edges"):
        return f"--level {a.level!r}: use nodes or edges"
    if getattr(a, "ray", None) and a.method != "patching":
        return f"--ray runs the patching method only (not {a.method!r}); drop --ray or use --method patching"
    if a.candidates < 1:
        return "--candidates must be >= 1"
    if a.receivers != "logits":
        for r in a.receivers.split(","):
            if not _RECV.match(r.strip()):
                return f"--receivers: {r!r} is not LAYER.HEAD.q|k|v (or use 'logits')"
    return None


def compute(model, task, a, progress: bool = True):
    """Run the chosen method; returns a Circuit."""
    from .. import circuits as C
    check = not a.force
    if a.method == "patching" and getattr(a, "ray", None):
        from . import distributed as D
        with D.ModelPool(a.model, address=None if a.ray == "local" else a.ray, num_workers=a.workers,
                         gpus_per_worker=1 if (a.device or "").startswith("cuda") else 0,
                         load_kwargs={"device": "cuda" if (a.device or "").startswith("cuda") else a.device}) as pool:
            return C.from_head_scores(D.patch_heads(pool, model, task, how=a.how, check=check, progress=progress), task)
    if a.method == "patching":
        return C.from_head_scores(C.patch_heads(model, task, how=a.how, check=check, progress=progress), task)
    if a.method == "path":
        recv = "logits" if a.receivers == "logits" else [
            (int(m.group(1)), int(m.group(2)), m.group(3)) for m in (_RECV.match(r.strip()) for r in a.receivers.split(","))]
        return C.from_head_scores(C.path_patch(model, task, receivers=recv, check=check, progress=progress), task)
    if a.method in ("eap", "eap-ig"):
        return C.attribute(model, task, a.method, steps=a.steps, check=check, progress=progress)
    if a.method == "acdc":
        if a.level == "nodes":
            return C.acdc_nodes(model, task, tau=a.tau, metric=a.metric, check=check, progress=progress)
        cands = C.eap(model, task, check=check).top_edges(a.candidates)
        return C.acdc_edges(model, task, cands, tau=a.tau, metric=a.metric, check=check, progress=progress)
    return C.sae_circuit(model, task, check=check, design=a.sae_design)


def write_html(circuit, path: Path):
    """circuit.html: the task report, the head map, the circuit graph and the faithfulness curve."""
    import html
    parts = []
    r = circuit.task_report or {}
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in r.items())
    parts.append(f"<h1>{html.escape(circuit.method)} circuit — {html.escape(circuit.task)} — "
                 f"{html.escape(str(circuit.model.get('name', '')))}</h1><p>{html.escape(circuit.paper)}; "
                 f"{circuit.seconds:.1f} s</p><table>{rows}</table>")
    figs = [circuit.to_head_scores().plot(title=f"{circuit.method}: head scores"), circuit.plot()]
    if circuit.faithfulness:
        figs.append(circuit.plot_faithfulness())
    for i, f in enumerate(figs):
        parts.append(f.to_html(full_html=False, include_plotlyjs="cdn" if i == 0 else False))
    top = "".join(f"<li>{html.escape(n)}: {circuit.nodes[n]:.4g}</li>" for n in circuit.top_nodes(20))
    parts.append(f"<h2>Top heads</h2><ol>{top}</ol>")
    path.write_text("<html><head><meta charset='utf-8'></head><body>" + "\n".join(parts) + "</body></html>")


def run(a) -> int:
    """Run ``headscope circuit`` on parsed arguments ``a``: compare two saved circuits (``--compare``),
    or build the task, find its circuit, compute the faithfulness curve and write ``--out`` whole.
    Returns the exit code: 0 done, 2 bad arguments (one line on stderr), 3 the model does not solve
    the task (``TaskNotSolved``, unless ``--force``)."""
    err = _validate(a)
    if err:
        return _fail(err)
    from ..circuits import Circuit, overlap, roc_auc
    if a.compare:
        c1, c2 = Circuit.load(a.compare[0]), Circuit.load(a.compare[1])
        res = roc_auc(c1, c2, n_truth=a.top)
        ov = overlap(c1, c2, n=a.top)
        print(f"{c1.method} ({c1.task}) vs {c2.method} ({c2.task}) top-{a.top} heads as ground truth")
        # at k = |true set| precision equals recall (R-precision): one number
        print(f"ROC AUC {res['auc']:.3f}  precision = recall at k={a.top}: {res['precision']:.3f}")
        print(f"overlap: {len(ov['shared'])} shared heads ({ov['fraction_of_a']:.0%} of the first), "
              f"Jaccard {ov['jaccard']:.3f}: {', '.join(ov['shared'])}")
        return 0
    from .. import load
    from ..circuits import TaskNotSolved, make_task
    model = load(a.model, device=a.device)
    try:
        task = make_task(a.task, model, n=a.n, seed=a.seed, prepend_bos=not a.no_prepend_bos)
    except ValueError as e:                      # no tokenizer, too few single-token words, ...
        return _fail(str(e))
    r = task.evaluate(model)
    print(f"{a.task} on {model.cfg.name}: clean accuracy {r['clean_accuracy']:.2f} (chance {r['chance']:.2f}, "
          f"binomial p {r['p_value']:.2g}), {r['metric']} clean {r['clean_metric']:.3f} / corrupted "
          f"{r['corrupt_metric']:.3f}")
    try:
        t0 = time.time()
        circuit = compute(model, task, a)
    except TaskNotSolved as e:
        print(str(e), file=sys.stderr)
        return 3
    if not a.no_faithfulness:
        circuit.faithfulness_curve(model, task)
    print(f"{a.method}: {time.time() - t0:.1f} s; top heads: {', '.join(circuit.top_nodes(a.top))}")
    if circuit.faithfulness:
        n80 = circuit.smallest_circuit(0.8)
        print(f"smallest circuit keeping >= 80% of the metric: {n80} heads" if n80 is not None
              else "no circuit on the curve keeps 80% of the metric")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        circuit.save(tmp)
        write_html(circuit, tmp / "circuit.html")
        if out.exists():
            old = out.with_name(f".{out.name}.old.{int(time.time())}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}/circuit.html, circuit.json, circuit.safetensors")
    return 0
