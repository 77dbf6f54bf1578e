"""Scale-out on several GPUs of one host (issue 14). NOT RUN YET: needs nvidia-h200-x2 or larger.

1. Retrieval grid on Ray (``--grid``): the retrieval-head analyzer (Wu et al. 2024, §2) on a
   Llama-3-8B-shaped model with random weights (32 layers, H=32, G=8, d=128, bf16; weights do not
   matter for speed) over a grid of needle tests (``--lengths`` × ``--depths`` synthetic token-id
   prompts; every test counted: rouge_gate=-1), in one process on one GPU and on a local Ray
   cluster with one actor per GPU (1 and ``--gpus`` workers). Scaling efficiency =
   T(1 GPU, one process) / (W × T(W workers)); the target is >= 90% at 2 GPUs. The merged
   HeadScores are checked to equal the single-process run.
2. Model split over the GPUs (``--census``): the same model with ``device_map="balanced"`` over
   every visible GPU (``hs.load(..., device_map=...)``), full head census at ``--census-n`` tokens
   (every statistic on every layer in one forward, as benchmarks/e2e_gpu.py), wall time, peak
   memory per GPU, and a check against the same census on one GPU (when it fits).

    python benchmarks/scale_gpu.py --grid --census --gpus 2 --out $OUT
    # quick smoke (4 layers, small grid): --layers 4 --lengths 1000 2000 --depths 0 50 100 --census-n 4096

Writes scale_gpu.json and scale_gpu.md to --out.
"""
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

VOCAB = 128256


def build(layers: int, device="cuda", seed: int = 0):
    """A Llama-3-8B-shaped LlamaForCausalLM with seeded random bf16 weights on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=VOCAB,
                      max_position_embeddings=131072, rope_theta=500000.0)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval()


class Loader:
    """Picklable model loader for the Ray workers (each builds the same seeded model on its GPU)."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self):
        import headscope as hs
        return hs.load(build(self.layers))


def needle_tests(lengths, depths, seed=0):
    from headscope.heads.retrieval import NeedleTest
    g = torch.Generator().manual_seed(seed)
    answer = list(range(1000, 1016))
    tests = []
    for n in lengths:
        for d in depths:
            hay = torch.randint(2000, 100000, (n - len(answer),), generator=g).tolist()
            p = int(len(hay) * d / 100)
            q = torch.randint(2000, 100000, (24,), generator=g).tolist()
            prompt = torch.tensor([128000] + hay[:p] + answer + hay[p:] + q)
            tests.append(NeedleTest(prompt, (1 + p, 1 + p + len(answer)), answer, n, float(d), 0))
    return tests


def grid(a, res):
    from headscope.app import distributed as D
    from headscope.heads.retrieval import Retrieval
    tests = needle_tests(a.lengths, a.depths)
    an = Retrieval(max_new_tokens=a.new_tokens, batch_size=1, rouge_gate=-1.0)
    model = Loader(a.layers)()
    an.score(model, data=tests[:1], progress=False)                               # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    one = an.score(model, data=tests, progress=False)
    torch.cuda.synchronize()
    res["grid_tests"] = len(tests)
    res["grid_1gpu_process_s"] = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    D.connect(None, a.gpus)
    for w in sorted({1, a.gpus}):
        with D.ModelPool(Loader(a.layers), num_workers=w, gpus_per_worker=1) as pool:
            D.retrieval(pool, _driver_model(a.layers), an, data=tests[:w], progress=False)   # warm-up
            t0 = time.perf_counter()
            many = D.retrieval(pool, _driver_model(a.layers), an, data=tests, progress=False)
            res[f"grid_ray_{w}gpu_s"] = time.perf_counter() - t0
            res[f"grid_ray_{w}gpu_identical"] = bool(torch.equal(one.extra["test_scores"], many.extra["test_scores"]))
    res["scaling_efficiency"] = res["grid_1gpu_process_s"] / (a.gpus * res[f"grid_ray_{a.gpus}gpu_s"])


def _driver_model(layers):
    """What ``distributed.retrieval`` reads in this process (cfg, tokenizer): no weights here."""
    import types

    import headscope as hs
    cfg = hs.ModelInfo("llama3-8b-shaped-random", layers, 32, 8, 128, 4096, 131072, VOCAB, (None,) * layers,
                       "LlamaForCausalLM")
    return types.SimpleNamespace(cfg=cfg, tokenizer=None)


def census(a, res):
    import headscope as hs
    st = hs.Stats(sink_k=4, spans=((0, 64), (1000, 2000)), entropy=True, distance=True, window_distance=10,
                  recent=256, argmax=True, received=True)
    toks = torch.randint(0, VOCAB, (1, a.census_n), generator=torch.Generator().manual_seed(0))
    hf = build(a.layers, device="cpu")
    sd = {k: v.clone() for k, v in hf.state_dict().items()} if a.check_one_gpu else None
    m = hs.load(hf, device_map="balanced")
    res["census_device_map"] = sorted({str(d) for d in m.model.hf_device_map.values()})
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)

    def run():
        with torch.no_grad(), m.record(st) as rec:
            m.model.model(input_ids=toks.to(m.device), use_cache=False)
        return rec
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rec = run()
    torch.cuda.synchronize()
    res["census_split_s"] = time.perf_counter() - t0
    res["census_split_peak_gb"] = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
    ent = rec.stack("entropy")
    res["census_stats_device"] = str(ent.device)
    res["census_entropy_finite"] = bool(torch.isfinite(ent).all())
    if a.check_one_gpu:
        del m, hf
        torch.cuda.empty_cache()
        one = build(a.layers, device="cpu")
        one.load_state_dict(sd)
        m1 = hs.load(one.cuda())
        with torch.no_grad(), m1.record(st) as rec1:
            m1.model.model(input_ids=toks.cuda(), use_cache=False)
        res["census_max_abs_diff_entropy"] = float((rec1.stack("entropy").float() - ent.float()).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--census", action="store_true")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 8000, 16000, 32000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0, 25, 50, 75, 100])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--census-n", type=int, default=32768)
    ap.add_argument("--check-one-gpu", action="store_true", help="also run the census on one GPU and compare")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if torch.cuda.device_count() < a.gpus:
        raise SystemExit(f"needs {a.gpus} GPUs, {torch.cuda.device_count()} visible")
    res = {"gpus": a.gpus, "layers": a.layers, "device": torch.cuda.get_device_name(),
           "date": time.strftime("%Y-%m-%d")}
    if a.grid:
        grid(a, res)
    if a.census:
        census(a, res)
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "scale_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
