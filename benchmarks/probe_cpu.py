"""CPU benchmark of the probe on SmolLM2 (issue #2): wall time and peak memory of one forward pass.

  (a) plain HF forward with attn_implementation="sdpa"
  (b) headscope with every statistic on every layer (O(N) memory)
  (c) TransformerLens 4.x TransformerBridge.run_with_cache of all attention patterns

Each (mode, N) runs in its own subprocess (peak RSS is per process) under an address-space limit,
so an out-of-memory case fails alone and is reported as OOM. One warm-up, then ``--repeats`` timed
forwards (median reported; TransformerLens once). Run:

    python benchmarks/probe_cpu.py --sizes 1024 2048 4096 8192 --out BENCH_probe_cpu.md
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ALL_STATS = dict(sink_k=4, spans=((0, 16), (100, 200)), entropy=True, distance=True, window_distance=10,
                 recent=256, argmax=True, received=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, n: int, repeats: int = 1) -> dict:
    import torch
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(os.cpu_count() or 1)
    import headscope as hs
    from headscope.probe.loading import load_hf
    hf, tok, _ = load_hf("smollm2")
    toks = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(0))
    if mode == "sdpa":
        hf.set_attn_implementation("sdpa")
        run = lambda x: hf(input_ids=x, use_cache=False).logits
    elif mode == "headscope":
        m = hs.load(hf, tokenizer=tok)
        def run(x):
            with m.record(hs.Stats(**ALL_STATS)) as rec:
                out = m(x)
            assert rec["entropy", 29].shape[-1] == x.shape[-1]
            return out
    elif mode == "transformerlens":
        from transformer_lens.model_bridge import TransformerBridge
        bridge = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf,
                                                     tokenizer=tok)
        run = lambda x: bridge.run_with_cache(x, names_filter=lambda nm: nm.endswith("hook_pattern"))[0]
    else:
        raise ValueError(mode)
    with torch.no_grad():
        run(toks[:, :64])                               # warm-up (allocator, first-call paths)
        base = rss_mb()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(toks)
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    return {"mode": mode, "n": n, "seconds": times[len(times) // 2], "all_seconds": times, "peak_mb": peak,
            "base_mb": base}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--modes", nargs="+", default=["sdpa", "headscope", "transformerlens"])
    ap.add_argument("--mem-limit-gb", type=float, default=22.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per (mode, N); the median is reported")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, default=None)
    a = ap.parse_args()
    if a.child:
        lim = int(a.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        try:
            print(json.dumps(child(a.child[0], int(a.child[1]), a.repeats)))
        except (MemoryError, RuntimeError) as e:
            if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            print(json.dumps({"mode": a.child[0], "n": int(a.child[1]), "oom": str(e)[:120]}))
        return
    rows = []
    for n in a.sizes:
        for mode in a.modes:
            reps = 1 if mode == "transformerlens" else a.repeats     # TL is 2-5x slower: one run tells
            p = subprocess.run([sys.executable, __file__, "--child", mode, str(n), "--mem-limit-gb",
                                str(a.mem_limit_gb), "--repeats", str(reps)], capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith("{")]
            r = json.loads(line[-1]) if line else {"mode": mode, "n": n,
                                                    "oom": f"exit {p.returncode}: {p.stderr.strip()[-200:]}"}
            rows.append(r)
            print(r, flush=True)
    by = {(r["mode"], r["n"]): r for r in rows}
    lines = ["| N | mode | time (s), median | runs (s) | × sdpa | peak RSS (GB) | peak − model (GB) |",
             "|---|---|---|---|---|---|---|"]
    for n in a.sizes:
        base = by.get(("sdpa", n), {}).get("seconds")
        for mode in a.modes:
            r = by[(mode, n)]
            if "oom" in r:
                lines.append(f"| {n} | {mode} | failed: {r['oom'][:60]} | | | | |")
                continue
            ratio = f"{r['seconds'] / base:.2f}" if base else ""
            runs = " / ".join(f"{x:.1f}" for x in r.get("all_seconds", [r["seconds"]]))
            lines.append(f"| {n} | {mode} | {r['seconds']:.1f} | {runs} | {ratio} | {r['peak_mb'] / 1024:.2f} | "
                         f"{(r['peak_mb'] - r['base_mb']) / 1024:.2f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
