"""One decode step of a whole model, eager, as a generation loop under recording pays it (issue 13):
a Llama-3-8B-shaped model with random weights (``--shape`` as ``e2e_gpu.py``), a KV cache of K
random keys per layer, B rows, one new token per row a step. Modes, taking turns in one process:

- ``sdpa``: a second model of the same shape that headscope never loaded, SDPA attention (the
  baseline: loading adds the TransformerLens hook points' torch hooks, which cost host time too);
- ``plain``: the headscope attention path with nothing recorded;
- ``argmax``: ``hm.record(Stats(argmax=True))`` around the steps (argmax and max_prob, every layer);
- ``all rows``: every row statistic on every layer (sink 4, two spans, entropy, distance, window
  distance 10, recent 256, argmax; ``e2e_gpu.row_stats``, the census' row statistics).

Each mode runs ``--steps`` back-to-back steps from the same cache (grown by one key a step, cropped
back to K after), GPU drained before and after: wall ms per step, host launch cost included. The
per-call grid (``decode_host.py --targets``) times the attention call alone; here the rest of the
layer (projections, MLP, norms, the cache's copy) runs too, and the host's launches overlap the GPU's
work where the step is GPU-bound. The LM head is left out (the final norm's output is used), which
makes attention's share, and so the ratios, larger than in a real model.

    python benchmarks/decode_e2e_gpu.py [--shape llama3-8b] [--grid 1:8192 1:32768 1:131072 8:8192 8:32768 8:131072]
    python benchmarks/decode_e2e_gpu.py --smoke      # tiny model on the CPU: the loop works, no timing claims

Layers: ``--layers`` (default 16, so that B = 8 at 128k keys fits: 69 GB of cache); a cell whose
cache would pass ``--kv-gb`` GB is skipped with a message.
"""
import os as _os

_here = _os.path.dirname(_os.path.realpath(__file__))   # _sibling() loads e2e_gpu.py by file

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def _sibling(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(_here, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def random_cache(cfg, layers: int, B: int, K: int, d: int, device, dtype, seed: int = 0):
    """A DynamicCache holding K random keys and values per layer ([B, G, K, d] each)."""
    from transformers import DynamicCache
    G = cfg.num_key_value_heads
    g = torch.Generator(device=device).manual_seed(seed)
    cache = DynamicCache()
    for layer in range(layers):
        k = torch.randn(B, G, K, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, G, K, d, device=device, dtype=dtype, generator=g)
        cache.update(k, v, layer)
    return cache


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(base, cache, K: int, B: int, steps: int, device, vocab: int) -> float:
    """``steps`` decode steps from a cache of K keys (then cropped back to K): wall ms per step."""
    ids = torch.randint(0, vocab, (B, steps), device=device)
    pos = torch.arange(K, K + steps, device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            base(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True,
                 position_ids=pos[i:i + 1].expand(B, 1), cache_position=pos[i:i + 1])
    sync(device)
    dt = (time.perf_counter() - t0) / steps * 1e3
    cache.crop(-steps)                # back to K keys (a negative count: transformers 5.x takes both forms)
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--grid", nargs="+", default=["1:8192", "1:32768", "1:131072", "8:8192", "8:32768", "8:131072"],
                    help="B:K cells")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--rounds", type=int, default=5, help="runs per mode, modes taking turns; the median and the fastest are reported")
    ap.add_argument("--kv-gb", type=float, default=90.0, help="largest KV cache to allocate (GB)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, 2 cells, 2 rounds of 2 steps")
    ap.add_argument("--merge-ab", action="store_true",
                    help="also time argmax and all rows with the decode path's key splits merged by the merge "
                         "kernel (triton_decode.MERGE = 'kernel'), taking turns with the default")
    a = ap.parse_args()
    import headscope as hs
    e2e = _sibling("e2e_gpu")
    timing = _sibling("host_timing")

    if a.smoke:
        from transformers import AutoModelForCausalLM, LlamaConfig
        device, dtype = torch.device("cpu"), torch.float32
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=256, max_position_embeddings=4096)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        clean = AutoModelForCausalLM.from_config(cfg).eval()
        grid, steps, rounds = ["1:300", "2:1100"], 2, 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = e2e.config(a.shape, a.layers)
        model = e2e.build(a.layers, a.shape)
        clean = e2e.build(a.layers, a.shape)             # never loaded into headscope: the SDPA baseline
        grid, steps, rounds = a.grid, a.steps, a.rounds
    base = model.model
    d = e2e.head_dim(cfg)
    kv_bytes_per_layer_key = 2 * cfg.num_key_value_heads * d * torch.finfo(dtype).bits // 8
    clean.set_attn_implementation("sdpa")
    hm = hs.load(model)                                  # registers the headscope attention path
    layers = cfg.num_hidden_layers
    fa4 = False
    if device.type == "cuda":
        from headscope.kernels import fa4 as fa4_mod
        fa4 = fa4_mod.available(device)
    requests = {"argmax": hs.Stats(argmax=True), "all rows": e2e.row_stats(hs)}
    rows = []
    for cell in grid:
        B, K = map(int, cell.split(":"))
        need = kv_bytes_per_layer_key * B * (K + steps) * layers / 2**30
        if need > a.kv_gb:
            print(f"skipping B={B} K={K}: its cache over {layers} layers is {need:.0f} GB, over --kv-gb "
                  f"{a.kv_gb:g} (give fewer --layers)", flush=True)
            continue
        cache = random_cache(cfg, layers, B, K, d, device, dtype)

        def mode_fn(name):
            def f():
                if name == "sdpa":
                    return run_steps(clean.model, cache, K, B, steps, device, cfg.vocab_size)
                if name == "plain":
                    return run_steps(base, cache, K, B, steps, device, cfg.vocab_size)
                def steps_recorded():
                    with hm.record(requests[name.split("/")[0]]) as rec:
                        return run_steps(base, cache, K, B, steps, device, cfg.vocab_size), rec
                if name.endswith("/kernel"):
                    steps_recorded = timing.with_merge(steps_recorded, "kernel")
                ms, rec = steps_recorded()
                got = rec.stack("argmax")                                   # [layer, B, H, steps]
                if got.shape[0] != layers or got.shape[-1] != steps:
                    raise RuntimeError(f"recorded argmax of shape {tuple(got.shape)}, ran {layers} layers x {steps} steps")
                return ms
            return f
        names = ["sdpa", "plain", "argmax", "all rows"] + (["argmax/kernel", "all rows/kernel"] if a.merge_ab else [])
        fns = {n: mode_fn(n) for n in names}
        for n in names:                                                   # warm-up (compiles)
            fns[n]()
        times = {n: [] for n in names}
        for _ in range(rounds):
            for n in names:
                times[n].append(fns[n]())
        med = {n: statistics.median(v) for n, v in times.items()}
        res = {"B": B, "K": K, "layers": layers, "steps": steps, "rounds": rounds, "fa4": fa4,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               **{f"{n}_ms": med[n] for n in names}, **{f"{n}_min_ms": min(times[n]) for n in names},
               **{f"{n}_all_ms": times[n] for n in names}}
        rows.append(res)
        print(json.dumps(res), flush=True)
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # the host is noisy (other work on the machine): the median and the fastest of the rounds, each
    # mode against SDPA's of the same statistic
    shown = ["plain", "argmax", "all rows"] + (["argmax/kernel", "all rows/kernel"] if a.merge_ab else [])
    lines = ["| B | K | layers | statistic | SDPA ms/step | headscope, nothing recorded | argmax recorded (× SDPA) | "
             "all rows recorded (× SDPA) |" + (" argmax, merge kernel | all rows, merge kernel |" if a.merge_ab else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if a.merge_ab else "")]
    for r in rows:
        for stat, suf in (("median", "_ms"), ("fastest", "_min_ms")):
            s = r["sdpa" + suf]
            cells = " | ".join(f"{r[n + suf]:.2f} ({r[n + suf] / s:.2f}×)" for n in shown)
            lines.append(f"| {r['B']} | {r['K']} | {r['layers']} | {stat} | {s:.2f} | {cells} |")
    table = "\n".join(lines)
    print(table)
    if not a.smoke:
        with open(os.path.join(a.out, "decode_e2e_gpu.md"), "w") as f:
            f.write(f"{a.shape}, {cfg.num_hidden_layers} layers asked, {steps} steps x {rounds} rounds, "
                    f"FA4 {'importable' if fa4 else 'not importable'}\n\n" + table + "\n")


if __name__ == "__main__":
    main()
