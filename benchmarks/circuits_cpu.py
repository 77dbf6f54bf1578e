"""Circuit methods on a real model: run time of each method on IOI (default 40 prompts) and, with
--report, the analysis numbers (task accuracy/metric, head patching map, faithfulness curve and the
smallest circuit keeping 80% of the IOI logit difference, Spearman agreement of patching / EAP /
EAP-IG, SAE ROC AUC against the patching circuit, IOI vs Colored Objects overlap).

    PYTHONPATH=... python benchmarks/circuits_cpu.py --model smollm2 [--methods patching,eap-ig,sae]
    python benchmarks/circuits_cpu.py --model smollm2 --report --device cuda --out DIR

--gguf FILE loads a GGUF file directly (for a machine without the embedded-model packages).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


import torch  # noqa: E402


def load_model(a):
    import headscope as hs
    if a.gguf:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder, name = os.path.split(os.path.abspath(a.gguf))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        if a.device:
            hf = hf.to(a.device)
        m = hs.load(hf, tokenizer=tok)
        m.cfg = type(m.cfg)(**{**m.cfg.to_dict(), "name": a.model})
        return m
    return hs.load(a.model, device=a.device)


LOAD = {}


def timed(fn, *args, label=None, **kw):
    """(result, wall seconds); with ``label``, also records the process CPU time and the 1-minute load
    average before and after in LOAD[label] (the CPU is shared: wall time alone can mislead)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    load0, c0, t0 = os.getloadavg()[0], time.process_time(), time.time()
    r = fn(*args, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.time() - t0
    if label:
        LOAD[label] = {"wall_s": round(wall, 1), "cpu_s": round(time.process_time() - c0, 1),
                       "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}
        print(f"[{label}] wall {wall:.1f} s, process CPU {LOAD[label]['cpu_s']} s, load {load0:.2f} -> "
              f"{LOAD[label]['load_after']}", flush=True)
    return r, wall


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--methods", default="patching,eap,eap-ig,sae,acdc-nodes,path",
                    help="comma list of patching, patching-resample, patching-zero, eap, eap-ig, edges (edge-level "
                         "EAP), sae, acdc-nodes, acdc-edges (needs edges), path, co-patching, gt-patching")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--sae-designs", default="shared", help="sae: comma-separated designs (shared, per_head)")
    ap.add_argument("--sae-seeds", default="0", help="sae: comma-separated seeds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--candidates", type=int, default=100, help="acdc-edges: EAP's top edges to search")
    a = ap.parse_args(argv)
    from headscope import circuits as C
    model = load_model(a)
    print(f"model {model.cfg.name} on {model.device}; torch threads {torch.get_num_threads()}", flush=True)
    res = {"model": model.cfg.name, "device": str(model.device), "n": a.n, "date": time.strftime("%Y-%m-%d %H:%M")}
    ioi = C.make_task("ioi", model, n=a.n)
    res["tasks"] = {"ioi": ioi.evaluate(model)}
    print(res["tasks"]["ioi"], flush=True)
    times, out = {}, {}
    methods = a.methods.split(",")
    if a.report:
        for t in ("greater-than", "colored-objects"):
            task = C.make_task(t, model, n=a.n)
            res["tasks"][t] = task.evaluate(model)
            print(res["tasks"][t], flush=True)
    for m in ("eap", "eap-ig"):
        if m in methods:
            c, times[m] = timed(C.attribute, model, ioi, m, edges=False, label=m)
            out[m] = c
            print(m, times[m], c.top_nodes(10), flush=True)
    if "edges" in methods:                                   # edge-level EAP (node scores come with it)
        c, times["eap_edges"] = timed(C.attribute, model, ioi, "eap", edges=True, label="eap_edges")
        out["eap_edges"] = c
        res["top_edges_eap"] = c.top_edges(20)
        print("eap edges", times["eap_edges"], c.top_edges(10), flush=True)
    sae_runs = {}
    if "sae" in methods:                                     # every design x seed; the first is "sae"
        for design in a.sae_designs.split(","):
            for seed in (int(s) for s in a.sae_seeds.split(",")):
                label = f"sae_{design}_seed{seed}"
                c, times[label] = timed(C.sae_circuit, model, ioi, design=design, seed=seed, label=label)
                sae_runs[label] = c
                out.setdefault("sae", c)
                print(label, times[label], c.top_nodes(10), flush=True)
    if "patching" in methods:
        hs_mean, times["patching_mean"] = timed(C.patch_heads, model, ioi, how="mean", label="patching_mean")
        out["patching_mean"] = hs_mean
        print("patching mean", times["patching_mean"], hs_mean.top(10), flush=True)
    for how in ("resample", "zero"):
        if f"patching-{how}" in methods:
            s, times[f"patching_{how}"] = timed(C.patch_heads, model, ioi, how=how, label=f"patching_{how}")
            out[f"patching_{how}"] = s
            print("patching", how, times[f"patching_{how}"], s.top(10), flush=True)
    if "acdc-nodes" in methods:
        c, times["acdc_nodes"] = timed(C.acdc_nodes, model, ioi, tau=0.01, label="acdc_nodes")
        out["acdc_nodes"] = c
        print("acdc nodes", times["acdc_nodes"], len(c.params["kept"]), c.params["kept"][:20], flush=True)
    if "path" in methods:
        c, times["path_logits"] = timed(C.path_patch, model, ioi, label="path_logits")
        out["path_logits"] = c
        print("path patching -> logits", times["path_logits"], c.top(10), flush=True)
    res["seconds"] = times
    if a.report and "patching_mean" in out:
        pc = C.from_head_scores(out["patching_mean"], ioi)
        f, t = timed(pc.faithfulness_curve, model, ioi, label="faithfulness_curve")
        res["faithfulness_patching_mean"] = f
        res["smallest_80_patching"] = pc.smallest_circuit(0.8)
        first = res["smallest_80_patching"]
        if first:                                # the curve is on a geometric grid: fill in below its first n >= 80%
            below = max([n for n in f["n"] if n < first], default=0)
            if first - below > 1:
                fine = dict(pc.faithfulness_curve(model, ioi, ns=list(range(below + 1, first))))
                res["faithfulness_patching_mean_fine"] = fine
                hit = [n for n, k in zip(fine["n"], fine["kept"]) if k >= 0.8]
                res["smallest_80_patching"] = hit[0] if hit else first
                pc.faithfulness = f
        L, H = model.cfg.n_layers, model.cfg.n_heads
        print("faithfulness", f, "smallest >= 80%:", res["smallest_80_patching"], "of", L * H, flush=True)
        res["head_map_patching_mean"] = out["patching_mean"].scores.tolist()
        res["top_patching_mean"] = out["patching_mean"].top(20)
        sp = {}
        ref = {k: out[k] for k in ("patching_resample", "patching_mean") if k in out}
        for rn, r in ref.items():
            for m in ("eap", "eap-ig"):
                if m in out:
                    sp[f"{rn}~{m}"] = C.spearman(r, out[m].head_scores())
        if "eap" in out and "eap-ig" in out:
            sp["eap~eap-ig"] = C.spearman(out["eap"].head_scores(), out["eap-ig"].head_scores())
        res["spearman"] = sp
        print("spearman", sp, flush=True)
        if "eap-ig" in out:
            ec = out["eap-ig"]
            ec.faithfulness_curve(model, ioi)
            res["faithfulness_eap_ig"] = ec.faithfulness
            res["smallest_80_eap_ig"] = ec.smallest_circuit(0.8)
            print("eap-ig faithfulness", ec.faithfulness, res["smallest_80_eap_ig"], flush=True)
        n_truth = max(1, round(0.1 * L * H))
        if "sae" in out:
            res["sae_vs_patching"] = C.roc_auc(out["sae"], pc, n_truth=n_truth)
            res["sae_runs_vs_patching"] = {k: C.roc_auc(c, pc, n_truth=n_truth) for k, c in sae_runs.items()}
            for k, v in res["sae_runs_vs_patching"].items():
                print(k, "vs patching top-10%", v, flush=True)
        if "path_logits" in out:
            sp["patching_mean~path_logits"] = C.spearman(out["patching_mean"], out["path_logits"])
        for m in ("eap", "eap-ig", "acdc_nodes"):
            if m in out:
                res[f"{m}_vs_patching"] = C.roc_auc(out[m], pc, n_truth=n_truth)
                print(m, "vs patching", res[f"{m}_vs_patching"], flush=True)
        co = C.make_task("colored-objects", model, n=a.n)
        if res["tasks"]["colored-objects"]["solved"] and "co-patching" in methods:
            s, times["patching_mean_colored"] = timed(C.patch_heads, model, co, how="mean", label="patching_mean_colored")
            cc = C.from_head_scores(s, co)
            res["overlap_ioi_colored"] = {n: C.overlap(pc, cc, n=n) for n in (n_truth, 2 * n_truth)}
            res["top_colored"] = s.top(20)
            print("overlap", res["overlap_ioi_colored"], flush=True)
        gt = C.make_task("greater-than", model, n=a.n)
        if res["tasks"]["greater-than"]["solved"] and "gt-patching" in methods:
            s, times["patching_mean_greater"] = timed(C.patch_heads, model, gt, how="mean", label="patching_mean_greater")
            res["top_greater_than"] = s.top(20)
            print("greater-than top", s.top(10), flush=True)
    if "acdc-edges" in methods and "eap_edges" in out:
        cands = out["eap_edges"].top_edges(a.candidates)
        c, times["acdc_edges"] = timed(C.acdc_edges, model, ioi, cands, tau=0.01, label="acdc_edges")
        out["acdc_edges"] = c
        print("acdc edges", times["acdc_edges"], len(c.params["kept"]), c.params["kept"][:20], flush=True)
    res["seconds"] = times
    res["load"] = LOAD
    print(json.dumps({"seconds": times, "load": LOAD}, indent=1))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, "circuits_results.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
