"""``headscope intervene METHOD --model M --task T --out DIR``: learn or apply a head intervention,
evaluate it on held-out data against its controls, print a before/after table, and write DIR with

- ``edits.json`` + ``edits.safetensors``: the edit list (``model.edit(hs.load_edits(DIR))``
  re-applies it),
- ``results.json``: every condition with its bootstrap 95% CI, heads, sizes, timings, arguments,
- ``table.md``: the printed table.

DIR is written in a temporary folder beside it and renamed into place at the end.

Methods: ``lofit`` (Yin et al. 2024: task-selected heads vs random heads vs heads selected for
another task vs the base model) and ``influence`` (Hua et al. 2025: relative loss increase per text
of a mixed corpus when the top retrieval heads are masked, vs as many random heads; composition of
the top vs bottom 20%). ``act``, ``var`` and ``kv`` are not wired into this command yet and say so.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

METHODS = ("act", "var", "lofit", "kv", "influence")
READY = ("lofit", "influence")


def add_parser(subparsers):
    """Add the ``intervene`` subcommand to an argparse ``subparsers`` object."""
    from ..interventions.tasks import TASKS
    p = subparsers.add_parser("intervene", help="learn/apply a head intervention and evaluate it against controls",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=METHODS)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, or a local HF folder")
    p.add_argument("--task", default="sentiment", help=f"shipped task: {', '.join(TASKS)} (lofit)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-random", type=int, default=10, help="random head sets of the same size (control)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a CPU shared with other jobs)")
    g = p.add_argument_group("lofit")
    g.add_argument("--k", type=int, default=8, help="heads kept (LoFiT step 2)")
    g.add_argument("--other-task", default="harm", help="task whose selected heads are a control ('none' to skip)")
    g.add_argument("--n-train", type=int, default=32)
    g.add_argument("--n-test", type=int, default=100)
    g.add_argument("--epochs", type=int, default=2)
    g.add_argument("--train-batch", type=int, default=8)
    g.add_argument("--lam", type=float, default=5e-4, help="L1 weight on the scales A (step 1)")
    g.add_argument("--lr-scale", type=float, default=5e-3)
    g.add_argument("--lr-offset", type=float, default=1e-2)
    g = p.add_argument_group("influence")
    g.add_argument("--heads", default=None,
                   help="heads to mask: 'L18H6,L17H3,...' or a saved HeadScores path (default: run the "
                        "retrieval analyzer's quick grid)")
    g.add_argument("--n-heads", type=int, default=None, help="top heads of --heads scores (default 5%% of heads)")
    g.add_argument("--per-kind", type=int, default=40, help="texts per kind in the mixed corpus")
    g.add_argument("--max-tokens", type=int, default=192)
    g.add_argument("--how", choices=("uniform", "zero"), default="uniform")
    p.set_defaults(func=run)
    return p


_HEAD = re.compile(r"^L(\d+)H(\d+)$")


def _parse_heads(spec: str):
    """'L18H6,L17H3' -> [(18, 6), (17, 3)], or None when ``spec`` names a file."""
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if parts and all(_HEAD.match(s) for s in parts):
        return [tuple(int(x) for x in _HEAD.match(s).groups()) for s in parts]
    return None


def validate(args) -> None:
    """Check the arguments before any model is loaded; raise SystemExit with what to do."""
    from ..interventions.tasks import TASKS
    if args.method not in READY:
        where = {"act": "ACT head selection is in the library: headscope.interventions.act.select_heads",
                 "var": "VAR is in the library: headscope.interventions.var.var_edits",
                 "kv": "KV-cache compression by head class is in the library: "
                       "headscope.interventions.kv_compress.HeadClassCache"}[args.method]
        raise SystemExit(f"headscope intervene {args.method}: not available from this command yet ({where}); "
                         f"the command runs {' and '.join(READY)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} exists and is not a folder")
    if args.n_random < 0:
        raise SystemExit("--n-random must be >= 0")
    if args.method == "lofit":
        if args.task not in TASKS:
            raise SystemExit(f"--task {args.task!r} is not a shipped task: choose one of {', '.join(TASKS)}")
        if args.other_task != "none" and args.other_task not in TASKS:
            raise SystemExit(f"--other-task {args.other_task!r}: choose one of {', '.join(TASKS)} or 'none'")
        if args.other_task == args.task:
            raise SystemExit("--other-task must differ from --task (it is the other-task control)")
        if args.threads is not None and args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        for name in ("k", "n_train", "n_test", "epochs", "train_batch"):
            if getattr(args, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.method == "influence":
        if args.heads is not None and _parse_heads(args.heads) is None:
            if not Path(args.heads).with_suffix(".json").exists():
                raise SystemExit(f"--heads {args.heads!r}: neither 'L<layer>H<head>,...' nor a saved HeadScores "
                                 "(PATH.json + PATH.safetensors, from `headscope score ... --out PATH`)")
        if args.per_kind < 5:
            raise SystemExit("--per-kind must be >= 5 (the top/bottom 20% need a few texts of each kind)")


def _lofit(args, model):
    from ..interventions import controls, lofit, tasks
    task = tasks.load_task(args.task, model)
    sp = task.splits(args.seed, n_train=args.n_train, n_calibration=0, n_test=args.n_test)
    other = None
    if args.other_task != "none":
        ot = tasks.load_task(args.other_task, model)
        n_other = min(args.n_train, len(ot.examples))
        other = ot.splits(args.seed, n_train=n_other, n_calibration=0, n_test=0)["train"]
    cfg = lofit.LoFiTConfig(k=args.k, lam=args.lam, lr_scale=args.lr_scale, lr_offset=args.lr_offset,
                            epochs=args.epochs, batch_size=args.train_batch, seed=args.seed)
    cmp = lofit.compare(model, sp["train"], sp["test"], cfg, other, args.n_random, args.batch_size,
                        dataset=args.task)
    summ = controls.table(cmp.rows, seed=args.seed)
    res = cmp.result
    extra = {"task": args.task, "other_task": args.other_task, "n_train": len(sp["train"]),
             "n_test": len(sp["test"]), "heads": res.heads, "other_heads": cmp.other_heads,
             "losses_scale": res.losses_scale, "losses_offset": res.losses_offset,
             "scale_norms": res.norms.scores.tolist(), "seconds_lofit": res.seconds,
             "total_heads": model.cfg.n_layers * model.cfg.n_heads,
             "model_params": sum(p.numel() for p in model.model.parameters())}
    return res.edits(), summ, extra


def _influence(args, model):
    import torch

    from ..heads.scores import HeadScores
    from ..interventions import controls, corpus, influence
    if args.heads is None:
        from ..heads.retrieval import Retrieval
        print("scoring retrieval heads (the retrieval analyzer's quick grid) ...", file=sys.stderr)
        scores = Retrieval().score(model)
        heads = influence.heads_from_scores(scores, args.n_heads)
        source = "retrieval analyzer (quick grid)"
    elif _parse_heads(args.heads) is not None:
        heads = _parse_heads(args.heads)
        source = "--heads"
    else:
        heads = influence.heads_from_scores(HeadScores.load(args.heads), args.n_heads)
        source = str(args.heads)
    texts = corpus.mixed_corpus(args.per_kind, args.seed)
    kinds = [t.kind for t in texts]
    res = influence.attention_influence(model, [t.text for t in texts], heads, args.how, args.max_tokens,
                                        args.batch_size)
    rows = [controls.Row("reference loss", res.loss_ref * 0), controls.Row(f"masked top-{len(heads)} retrieval",
                                                                           res.scores, res.loss_masked,
                                                                           n_heads=len(heads), heads=heads)]
    sets = controls.random_head_sets(model.cfg.n_layers, model.cfg.n_heads, len(heads), args.n_random, args.seed,
                                     exclude=heads)
    toks = influence.tokenize(model, [t.text for t in texts], args.max_tokens)
    rand, rand_comp = [], []
    for hs_ in sets:
        masked = influence.text_losses(model, toks, influence.mask_edits(hs_, args.how), args.batch_size)
        rand.append((masked - res.loss_ref) / res.loss_ref)
        rand_comp.append(corpus.composition(kinds, rand[-1].argsort(descending=True).tolist(), 0.2))
    if rand:
        rows.append(controls.Row(f"masked random-{len(heads)}", torch.stack(rand), n_heads=len(heads), heads=sets))
    summ = controls.table(rows, seed=args.seed)
    comp = corpus.composition(kinds, res.ranking(), 0.2)
    if rand_comp:       # the same ranking made with random heads: mean shares over the sets
        for part in ("top", "bottom"):
            comp[f"random_{part}"] = {k: sum(c[part].get(k, 0) for c in rand_comp) / len(rand_comp)
                                      for k in comp["all"]}
    extra = {"heads": heads, "heads_source": source, "how": args.how, "composition": comp,
             "texts": [{"kind": t.kind, "source": t.source, "score": float(s), "loss_ref": float(a),
                        "loss_masked": float(b), "text": t.text[:200]}
                       for t, s, a, b in zip(texts, res.scores, res.loss_ref, res.loss_masked)],
             "note": "accuracy column = mean relative loss increase (L_masked - L_ref) / L_ref over texts"}
    return influence.mask_edits(heads, args.how), summ, extra


def _composition_md(comp: dict) -> str:
    kinds = sorted(comp["all"])
    rnd = "random_top" in comp
    lines = [f"| kind | top 20% (n={comp['n']}) | bottom 20% | " +
             ("top 20%, random heads | bottom 20%, random heads | " if rnd else "") + "whole corpus |",
             "|---|---|---|" + ("---|---|" if rnd else "") + "---|"]
    for k in kinds:
        r = f"{comp['random_top'].get(k, 0):.2f} | {comp['random_bottom'].get(k, 0):.2f} | " if rnd else ""
        lines.append(f"| {k} | {comp['top'].get(k, 0):.2f} | {comp['bottom'].get(k, 0):.2f} | {r}{comp['all'][k]:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    """Run ``headscope intervene`` on parsed arguments: learn the edits (``lofit``) or score the corpus
    (``influence``), evaluate against the controls, print the table and write ``--out`` whole
    (edits.json/.safetensors, results.json, table.md). Returns 0; bad arguments or a model without
    a tokenizer raise SystemExit with the reason."""
    validate(args)
    import torch

    from .. import load
    from ..heads.scores import write_json
    from ..interventions.controls import format_table
    from ..interventions.edits_io import atomic_folder, write_edits
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load(args.model, device=args.device)
    if model.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer; the shipped tasks and corpus are text")
    edits, summ, extra = (_lofit if args.method == "lofit" else _influence)(args, model)
    table_md = format_table(summ)
    if args.method == "influence":
        table_md = table_md.replace("held-out accuracy", "mean relative loss increase") + \
            "\n\n" + _composition_md(extra["composition"])
    seconds = time.time() - t0
    args_d = {k: v for k, v in vars(args).items() if k != "func"}
    meta = {"method": args.method, "model": model.cfg.name, "args": args_d}
    with atomic_folder(args.out) as tmp:
        write_edits(tmp, edits, meta)
        write_json(tmp / "results.json", {**meta, "rows": summ, **extra, "seconds": seconds,
                                          "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        (tmp / "table.md").write_text(table_md + "\n", encoding="utf-8")
    print(table_md)
    print(f"\nwrote {args.out} ({seconds:.0f} s); re-apply with model.edit(hs.load_edits({str(args.out)!r}))")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m headscope.app.intervene_cli lofit ...``) until app/cli.py
    wires ``add_parser`` in."""
    import argparse
    ap = argparse.ArgumentParser(prog="headscope")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    a = ap.parse_args(["intervene", *(sys.argv[1:] if argv is None else argv)])
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
