"""End-to-end on one GPU (issue #3): a Llama-3-8B-shaped model with random weights (32 layers,
H=32, G=8, d=128, bf16; ``--shape`` picks Qwen2.5-7B, SmolLM2 (d64) or a d256 attention) at N
tokens: full head census (every statistic on every layer, through the headscope attention path
and its kernels) versus the same model's plain SDPA forward, and
HF eager attention with output_attentions=True (what TransformerLens and nnsight rely on).

    python benchmarks/e2e_gpu.py --n 32768 --layers 32 [--no-eager]

Ratios are to the model's default SDPA forward (PyTorch picks cuDNN on an H200): the full census,
row statistics only (no column sums), the masses FlashAttention-4's LSE gives (sink, recent, window
distance: ``kernels/fa4.py`` when FA4 is importable, else the Triton kernels), and the headscope path
with nothing recorded (FA4 when importable, else SDPA).

    python benchmarks/e2e_gpu.py --n 32768 --layers 8 --no-eager --masses-only   # SDPA, masses, plain

Weights do not matter for speed; the final norm output is used (no 128k-vocab logits).
"""
import argparse
import json
import os
import time

import torch


# model shapes (random weights): attention as in the named model, Llama architecture except Qwen2.5
# (its own, with q/k/v biases). "d256" has Gemma-3-1B's attention (4 heads, 1 KV head, head dim 256)
# without its sliding-window layers, which the in-kernel statistics do not take.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, rope_theta=1000000.0),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, rope_theta=100000.0),
    "d256": dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
                 head_dim=256, vocab_size=262144, rope_theta=1000000.0),
}


def config(shape: str, layers: int):
    """The transformers config of ``shape`` (a key of SHAPES) with ``layers`` layers."""
    from transformers import LlamaConfig, Qwen2Config
    cls = Qwen2Config if shape == "qwen2.5-7b" else LlamaConfig
    return cls(num_hidden_layers=layers, max_position_embeddings=131072, **SHAPES[shape])


def head_dim(cfg) -> int:
    """The attention head dim of a transformers config (its ``head_dim``, else hidden / heads)."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def row_stats(hs):
    """Every row statistic, as the census records them (no column sums)."""
    return hs.Stats(sink_k=4, spans=((0, 64), (1000, 2000)), entropy=True, distance=True,
                    window_distance=10, recent=256, argmax=True)


def build(layers: int, shape: str = "llama3-8b"):
    from transformers import AutoModelForCausalLM
    cfg = config(shape, layers)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[32768])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                    help="attention shape of the random model (default Llama-3-8B)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--masses-only", action="store_true",
                    help="time only the default SDPA forward, the masses record and the plain headscope path")
    a = ap.parse_args()
    import headscope as hs
    from headscope.kernels import fa4
    model = build(a.layers, a.shape)
    rows = []
    for n in a.n:
        toks = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        base = model.model
        res = {"n": n, "layers": a.layers, "shape": a.shape, "device": torch.cuda.get_device_name()}
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            torch.cuda.reset_peak_memory_stats()
            res["sdpa_s"] = timed(lambda: base(input_ids=toks, use_cache=False))
            res["sdpa_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            hm = hs.load(model)                                     # switches to the headscope path
            res["fa4"] = fa4.available(toks.device)
            # the masses FlashAttention-4's LSE gives (the census' sink, recent and window values)
            masses = hs.Stats(sink_k=4, window_distance=10, recent=256)

            def census_masses():
                with hm.record(masses) as rec:
                    base(input_ids=toks, use_cache=False)
                return rec
            res["masses_s"] = timed(census_masses)
            res["masses_ratio"] = res["masses_s"] / res["sdpa_s"]
            res["masses_finite"] = bool(torch.isfinite(census_masses().stack("window_distance")).all())
            res["headscope_plain_s"] = timed(lambda: base(input_ids=toks, use_cache=False))
            res["headscope_plain_ratio"] = res["headscope_plain_s"] / res["sdpa_s"]
            if a.masses_only:
                model.set_attn_implementation("sdpa")
                rows.append(res)
                print(json.dumps(res), flush=True)
                continue
            st = hs.Stats(sink_k=4, spans=((0, 64), (1000, 2000)), entropy=True, distance=True,
                          window_distance=10, recent=256, argmax=True, received=True)

            def census():
                with hm.record(st) as rec:
                    base(input_ids=toks, use_cache=False)
                return rec
            torch.cuda.reset_peak_memory_stats()
            res["census_s"] = timed(census)
            res["census_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            rec = census()
            res["census_ratio"] = res["census_s"] / res["sdpa_s"]
            rows_only = row_stats(hs)

            def census_rows():
                with hm.record(rows_only):
                    base(input_ids=toks, use_cache=False)
            res["rows_s"] = timed(census_rows)
            res["rows_ratio"] = res["rows_s"] / res["sdpa_s"]
            res["entropy_finite"] = bool(torch.isfinite(rec.stack("entropy")).all())
            res["sink_mass_l0_mean"] = float(rec["sink_mass", 0].mean())
            model.set_attn_implementation("eager")
            try:
                if a.no_eager:
                    raise RuntimeError("not run (--no-eager)")
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                base(input_ids=toks, use_cache=False, output_attentions=True)
                torch.cuda.synchronize()
                res["eager_output_attentions"] = f"{time.perf_counter() - t0:.1f}s"
            except torch.OutOfMemoryError as e:
                res["eager_output_attentions"] = "out of memory: " + str(e).split(".")[0][:120]
            except RuntimeError as e:
                res["eager_output_attentions"] = str(e)
            torch.cuda.empty_cache()
            model.set_attn_implementation("sdpa")
        rows.append(res)
        print(json.dumps(res), flush=True)
    lines = ["| shape | N | layers | default SDPA forward (s) | census, all stats all layers (s, ×SDPA) | row stats only "
             "(s, ×SDPA) | sink + recent + window distance (s, ×SDPA) | headscope, nothing recorded (×SDPA) "
             "| FA4 backend | census peak GB | eager + output_attentions |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, key):
        return f"{r[key + '_s']:.3f} ({r[key + '_ratio']:.2f}×)" if key + "_s" in r else "not run"
    for r in rows:
        lines.append(f"| {r['shape']} | {r['n']} | {r['layers']} | {r['sdpa_s']:.3f} | {cell(r, 'census')} | {cell(r, 'rows')} | "
                     f"{cell(r, 'masses')} | {r['headscope_plain_ratio']:.2f}× | {'yes' if r['fa4'] else 'no'} | "
                     f"{r.get('census_peak_gb', float('nan')):.1f} | {r.get('eager_output_attentions', 'not run')} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "e2e_gpu.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
