"""``headscope intervene METHOD --model M --task T --out DIR``: learn or apply a head intervention,
evaluate it on held-out data against its controls, print a before/after table, and write DIR with

- ``edits.json`` + ``edits.safetensors``: the edit list (``model.edit(hs.load_edits(DIR))``
  re-applies it),
- ``results.json``: every condition with its bootstrap 95% CI, heads, sizes, timings, arguments,
- ``table.md``: the printed table.

DIR is written in a temporary folder beside it and renamed into place at the end.

Methods:
- ``act`` (Yu et al. 2024, ACT §3.3): select heads on a labelled calibration split by calibrating
  each head of layers 2..L-2 alone (``--first-layer``; batched sweep), evaluate on held-out data: base vs ACT-selected
  vs random head sets of the same size vs all heads. ACT's sinks depend on the input, so the edit
  file holds the calibration as built for the first held-out example, and ``results.json`` the
  heads, beta and threshold that rebuild it for any input (``act.online_act_edits``).
- ``var`` (Kang et al. 2025, VAR §4) on the context-QA task (facts among prose passages): base vs VAR
  (all heads, the paper) vs VAR on the target-centric heads vs random head sets of that size. The
  edit file holds VAR as built for the first held-out example (sinks and context span are per input).
- ``kv`` (DuoAttention / RazorAttention): ``--frac`` of the KV heads keep only sink + recent tokens,
  drawn from outside the retrieval heads' KV groups, vs as many random KV heads, vs the full cache:
  accuracy, cache bytes and decode tokens/s. ``--preset duo`` (default) is DuoAttention's budget
  (sink 64, recent 256, half the KV heads); ``--preset razor`` RazorAttention's (§3.2-3.3: its own
  retrieval set of induction and echo heads keeps the full cache, every other KV head 4 sink tokens
  + the last max(4000, N/5) with the compensation token). The edit file is the mask-only equivalent
  (``StreamingGate(alpha=0)`` on the streaming heads), which applies to any input; ``results.json``
  holds the head sets.
- ``lofit`` (Yin et al. 2024: task-selected heads vs random heads vs heads selected for another task
  vs the base model) and ``influence`` (Hua et al. 2025: relative loss increase per text of a mixed
  corpus when the top retrieval heads are masked, vs as many random heads; composition of the top vs
  bottom 20%).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

METHODS = ("act", "var", "lofit", "kv", "influence")
READY = METHODS
ACT_TASKS = ("sentiment", "sentiment-chat", "harm", "copy")
KV_TASKS = ("niah", "tokens")


def add_parser(subparsers):
    """Add the ``intervene`` subcommand to an argparse ``subparsers`` object."""
    from ..interventions.tasks import TASKS
    p = subparsers.add_parser("intervene", help="learn/apply a head intervention and evaluate it against controls",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=METHODS)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, or a local HF folder")
    p.add_argument("--task", default=None,
                   help=f"lofit: {', '.join(TASKS)} (default sentiment); act: {', '.join(ACT_TASKS)} (default "
                        "sentiment-chat; copy = synthetic token task for models without a tokenizer); var: context-qa; "
                        f"kv: {', '.join(KV_TASKS)} (default niah; tokens = synthetic key-value recall on token ids)")
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
    g.add_argument("--schedule", choices=("linear", "constant"), default="linear",
                   help="learning-rate schedule of both steps: linear decay to 0 (the reference's) or constant")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip each update's gradient to this total norm (the reference's 1.0); 0 = no clipping")
    g = p.add_argument_group("act / var")
    g.add_argument("--n-calibration", type=int, default=200, help="calibration examples (head selection)")
    g.add_argument("--beta", type=float, default=0.4, help="ACT: scale of the hidden sinks' attention")
    g.add_argument("--threshold", default="0.1",
                   help="ACT: hidden sink if a_j > threshold: a number (the reference's 0.1) or 'alpha/N' (the paper's, e.g. 5/N)")
    g.add_argument("--top-k", type=int, default=None, help="ACT: keep at most the K best heads")
    g.add_argument("--first-layer", type=int, default=2,
                   help="ACT: first layer whose heads are calibrated (2, the reference code; 1, the paper's "
                        "'not the first layer')")
    g.add_argument("--facts", type=int, default=4, help="VAR: facts (answer candidates) per context")
    g.add_argument("--passages", type=int, default=3, help="VAR: prose passages per context")
    g.add_argument("--tau", default="20", help="VAR: massive-activation threshold, or 'auto' = min(20, 0.8 x peak)")
    g.add_argument("--select-rate", type=float, default=0.5, help="VAR: target-centric head if the rule holds this often")
    g.add_argument("--sinks-from", choices=("edited", "unedited"), default="edited",
                   help="VAR: find each layer's sink tokens in the edited pass (the reference) or once in the "
                        "unedited forward")
    g = p.add_argument_group("kv")
    g.add_argument("--preset", choices=("duo", "razor"), default="duo",
                   help="duo: DuoAttention's deployment (--frac 0.5 of the KV heads outside the retrieval heads' "
                        "groups stream, sink 64, recent 256); razor: RazorAttention's (retrieval set = top 14%% "
                        "induction u top 1%% echo KV heads unless --heads; every other KV head keeps 4 sink "
                        "tokens + the last max(4000, N/5), with the compensation token). The flags below override")
    g.add_argument("--frac", type=float, default=None, help="share of KV heads that become streaming "
                   "(duo 0.5, razor 1 = all outside the retrieval set)")
    g.add_argument("--sink", type=int, default=None, help="sink tokens kept (duo 64, razor 4)")
    g.add_argument("--recent", type=int, default=None, help="recent tokens kept (duo 256, razor max(4000, N/5))")
    g.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="RazorAttention's compensation token (razor: on)")
    g.add_argument("--max-new-tokens", type=int, default=24)
    g = p.add_argument_group("influence")
    g.add_argument("--heads", default=None,
                   help="influence: heads to mask; kv: retrieval heads whose KV groups keep the full cache. "
                        "'L18H6,L17H3,...' or a saved HeadScores path (default: run the retrieval analyzer's quick grid)")
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
    if args.task is None:
        args.task = {"lofit": "sentiment", "act": "sentiment-chat", "var": "context-qa", "kv": "niah"}.get(args.method)
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
    if args.method in ("act", "var"):
        allowed = ACT_TASKS if args.method == "act" else ("context-qa",)
        if args.task not in allowed:
            raise SystemExit(f"--task {args.task!r}: {args.method} runs on {', '.join(allowed)}")
        for name in ("n_calibration", "n_test"):
            if getattr(args, name) < 2:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 2 (use >= 200 for a powered comparison)")
        if args.top_k is not None and args.top_k < 1:
            raise SystemExit("--top-k must be >= 1")
        if not 0.0 <= args.beta <= 1.0:
            raise SystemExit("--beta must be in [0, 1]")
        if args.method == "act":
            from ..interventions.act import parse_threshold
            try:
                args.threshold = parse_threshold(str(args.threshold))
            except ValueError as e:
                raise SystemExit(f"--threshold: {e}") from None
        if args.tau != "auto":
            try:
                float(args.tau)
            except ValueError:
                raise SystemExit(f"--tau {args.tau!r}: a number or 'auto'") from None
        if args.facts < 2 or args.passages < 0:
            raise SystemExit("--facts must be >= 2 and --passages >= 0")
    if args.method == "kv":
        if args.task not in KV_TASKS:
            raise SystemExit(f"--task {args.task!r}: kv runs on {', '.join(KV_TASKS)}")
        _kv_preset(args)
        if not 0.0 < args.frac <= 1.0:
            raise SystemExit("--frac must be in (0, 1]")
        if args.sink < 0 or (args.recent is not None and args.recent < 1) or args.max_new_tokens < 1 \
                or args.n_test < 1:
            raise SystemExit("--sink must be >= 0, --recent, --max-new-tokens and --n-test >= 1")
    if args.method in ("influence", "kv"):
        if args.heads is not None and _parse_heads(args.heads) is None:
            if not Path(args.heads).with_suffix(".json").exists():
                raise SystemExit(f"--heads {args.heads!r}: neither 'L<layer>H<head>,...' nor a saved HeadScores "
                                 "(PATH.json + PATH.safetensors, from `headscope score ... --out PATH`)")
        if args.method == "influence" and args.per_kind < 5:
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
                            epochs=args.epochs, batch_size=args.train_batch, seed=args.seed,
                            schedule=args.schedule, max_grad_norm=args.max_grad_norm or None)
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


def _heads_arg(args, model, progress_note: str):
    """--heads -> [(layer, head)] (a list, a saved HeadScores' top heads, or the retrieval quick grid)."""
    from ..heads.scores import HeadScores
    from ..interventions import influence
    if args.heads is None:
        from ..heads.retrieval import Retrieval
        print(f"scoring retrieval heads (the retrieval analyzer's quick grid) {progress_note}...", file=sys.stderr)
        return influence.heads_from_scores(Retrieval().score(model), args.n_heads), "retrieval analyzer (quick grid)"
    if _parse_heads(args.heads) is not None:
        return _parse_heads(args.heads), "--heads"
    return influence.heads_from_scores(HeadScores.load(args.heads), args.n_heads), str(args.heads)


def _act(args, model):
    from ..interventions import act, controls, tasks
    if args.task == "copy":
        task = tasks.token_task(max(64, args.n_calibration + args.n_test), length=10,
                                vocab=min(model.cfg.vocab_size, 128), seed=args.seed)
    else:
        task = tasks.load_task(args.task, model)
    sp = task.splits(args.seed, n_train=0, n_calibration=args.n_calibration, n_test=args.n_test)
    rows, extra, p_test = act.compare(model, sp["calibration"], sp["test"], args.beta, args.threshold,
                                      args.n_random, args.seed, args.batch_size, top_k=args.top_k,
                                      first_layer=args.first_layer)
    edits = act.online_act_edits(model, sp["test"][0].tokens, extra["kept_heads"], args.beta, args.threshold)
    extra.update(task=task.name, task_description=task.description,
                 edit_file="ACT as built for held-out example 0 (its hidden sinks, found layer by layer in the "
                           "calibrated forward as the reference does); for another input x: "
                           "act.online_act_edits(model, x, kept_heads, beta, threshold)")
    return edits, controls.table(rows, seed=args.seed), extra


def _var(args, model):
    from ..interventions import controls, tasks, var
    task = tasks.context_qa_task(model, args.n_calibration + args.n_test, args.facts, args.passages, args.seed)
    sp = task.splits(args.seed, n_train=0, n_calibration=args.n_calibration, n_test=args.n_test)
    tau = None if args.tau == "auto" else float(args.tau)
    try:
        rows, extra = var.compare(model, sp["calibration"], sp["test"], tau=tau, select_rate=args.select_rate,
                                  n_random=args.n_random, seed=args.seed, batch_size=args.batch_size,
                                  sinks_from=args.sinks_from)
    except ValueError as e:
        raise SystemExit(f"headscope intervene var: {e}") from None
    ex0 = sp["test"][0]
    s0 = extra.pop("sinks_example0")
    edits = var.var_edits(model, s0, [tuple(ex0.target)], rho=extra["rho"], p=extra["p"], min_target=extra["min_target"])
    extra.update(task=task.name, task_description=task.description, chance=1 / args.facts,
                 edit_file="VAR as built for held-out example 0 (its sink tokens, found in the unedited forward since "
                           "an edit names its keys, and its context span); for another "
                           "input: var.var_edits(model, var.sink_tokens(model, x, massive_dims, tau), [context span])")
    return edits, controls.table(rows, seed=args.seed), extra


def _kv_tests(args, model):
    """[(prompt [N], scorer(new tokens) -> float in [0, 1])] for --task niah | tokens."""
    import torch
    if args.task == "niah":
        from ..heads.retrieval import Retrieval, rouge1_recall
        tests = Retrieval().tests(model)[:args.n_test]
        return [(t.prompt, lambda new, t=t: rouge1_recall(
            t.answer, model.tokenizer.decode(new, skip_special_tokens=True))) for t in tests]
    g = torch.Generator().manual_seed(args.seed)
    out = []
    V = min(model.cfg.vocab_size, 128)
    for i in range(args.n_test):                   # key k, value v at some depth; the prompt ends with k
        body = torch.randint(10, V, (96,), generator=g)
        k, v = int(torch.randint(10, V, (1,), generator=g)), int(torch.randint(10, V, (1,), generator=g))
        at = int(torch.randint(1, 80, (1,), generator=g))
        body[at], body[at + 1] = k, v
        out.append((torch.cat([body, torch.tensor([k])]), lambda new, v=v: float(int(new[0]) == v)))
    return out


def _kv_preset(args) -> None:
    """Fill the kv flags left unset from ``--preset`` (``args.recent`` stays None under razor: it is
    max(4000, N/5) per prompt)."""
    from ..interventions import kv_compress as kv
    razor = args.preset == "razor"
    if args.frac is None:
        args.frac = 1.0 if razor else 0.5
    if args.sink is None:
        args.sink = kv.RAZOR_SINK if razor else kv.DUO_SINK
    if args.recent is None and not razor:
        args.recent = kv.DUO_RECENT
    if args.compensate is None:
        args.compensate = razor


def _kv_keep(args, model):
    """The query heads named (None under razor's own set), the (layer, KV head) pairs that keep the
    full cache, and where they came from: the KV groups
    of --heads; else, under razor, RazorAttention's retrieval set (§3.2, ranked per KV head); else the
    KV groups of the retrieval analyzer's top heads."""
    from ..interventions import kv_compress
    if args.preset == "razor" and args.heads is None:
        from ..heads.classic import razor_heads, razor_retrieval_set
        print("scoring induction and echo heads (RazorAttention's retrieval set) ...", file=sys.stderr)
        r = razor_heads(model, block_len=min(200, model.cfg.vocab_size // 2))    # the analyzers' default probe
        keep = razor_retrieval_set(r["induction"], r["echo"], level="kv")
        return None, set(keep), "RazorAttention retrieval set: top 14% induction u top 1% echo KV heads (heads.classic)"
    heads, source = _heads_arg(args, model, "to find the KV groups that keep the full cache ")
    return heads, kv_compress.kv_groups(heads, model.cfg.n_heads, model.cfg.n_kv_heads), source


def _kv(args, model):
    import torch

    from ..interventions import controls, kv_compress
    from tqdm.auto import tqdm
    L, G = model.cfg.n_layers, model.cfg.n_kv_heads
    heads, keep, source = _kv_keep(args, model)
    stream = kv_compress.head_class_stream(L, G, keep, args.frac, args.seed)
    n = sum(len(v) for v in stream.values())
    if n == 0:
        raise SystemExit(f"--frac {args.frac}: no KV head becomes streaming (all {L * G} hold retrieval heads?)")
    tests = _kv_tests(args, model)
    conds = [("full cache", {})] + [(f"head class: {n} of {L * G} KV heads streaming", stream)]
    sets = kv_compress.random_stream(L, G, n, args.n_random, args.seed) if args.n_random else []
    stats = {}
    rows = []
    for name, st in conds + [(f"random {n} KV heads streaming", s) for s in sets]:
        sc, nb, tps = [], [], []
        for prompt, score in tqdm(tests, desc=name[:40], leave=False):
            recent = args.recent if args.recent is not None else kv_compress.razor_recent(prompt.numel())
            new, b, sec = kv_compress.generate_compressed(model, prompt, st, args.sink, recent,
                                                          args.max_new_tokens, args.compensate)
            sc.append(score(new))
            nb.append(b)
            tps.append(new.numel() / max(sec, 1e-9))
        stats.setdefault(name, []).append({"cache_bytes": sum(nb) / len(nb), "tokens_per_s": sum(tps) / len(tps)})
        rows.append((name, torch.tensor(sc), st))
    out = [controls.Row(rows[0][0], rows[0][1]), controls.Row(rows[1][0], rows[1][1], n_heads=n,
                                                               heads=[[l, g] for l, gs in stream.items() for g in gs])]
    if sets:
        out.append(controls.Row(rows[2][0], torch.stack([r[1] for r in rows[2:]]), n_heads=n,
                                heads=[[[l, g] for l, gs in s.items() for g in gs] for s in sets]))
    summ = controls.table(out, seed=args.seed)
    for srow in summ:
        key = srow["condition"]
        recs = stats[key]
        srow["cache_mb"] = sum(r["cache_bytes"] for r in recs) / len(recs) / 2**20
        srow["tokens_per_s"] = sum(r["tokens_per_s"] for r in recs) / len(recs)
    extra = {"task": args.task, "retrieval_heads": heads, "heads_source": source, "kept_kv_groups": sorted(keep),
             "stream": {str(k): v for k, v in stream.items()}, "random_streams": [{str(k): v for k, v in s.items()}
                                                                                 for s in sets],
             "preset": args.preset, "sink": args.sink,
             "recent": args.recent if args.recent is not None else "max(4000, N // 5) per prompt",
             "compensate": args.compensate, "frac": args.frac,
             "n_tests": len(tests), "note": "accuracy column = mean score per test (niah: ROUGE-1 recall of the "
                                              "needle; tokens: first new token = the value)"}
    recent = args.recent
    if recent is None:                 # razor: the edit file holds the first test prompt's window
        recent = kv_compress.razor_recent(tests[0][0].numel())
        extra["edit_file"] = (f"StreamingGate with recent {recent} = max(4000, N // 5) for the first test prompt; "
                              "prompts up to sink + recent tokens lose nothing")
    edits = kv_compress.streaming_edits(model, stream, args.sink, recent)
    return edits, summ, extra


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
    if model.tokenizer is None and args.task not in ("copy", "tokens"):
        raise SystemExit(f"{args.model} has no tokenizer; the shipped tasks and corpus are text "
                         "(act: --task copy, kv: --task tokens run on token ids)")
    fn = {"lofit": _lofit, "influence": _influence, "act": _act, "var": _var, "kv": _kv}[args.method]
    edits, summ, extra = fn(args, model)
    table_md = format_table(summ)
    if args.method == "kv":
        table_md = table_md.replace("held-out accuracy", "accuracy") + "\n\n" + "\n".join(
            ["| condition | cache MB | decode tokens/s |", "|---|---|---|"] +
            [f"| {r['condition']} | {r['cache_mb']:.2f} | {r['tokens_per_s']:.1f} |" for r in summ])
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
    ap = argparse.ArgumentParser(prog="headscope")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    a = ap.parse_args(["intervene", *(sys.argv[1:] if argv is None else argv)])
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
