"""KV compression by head class on SmolLM2, NIAH quick grid (notes/interv-benchmarks.md).
Retrieval KV heads: the KV heads holding the 16 retrieval heads of reports/retrieval.md; the
streaming fraction is taken from the other KV heads in a fixed seeded order."""
import json, os, random, sys, time
import torch
import headscope as hs
from headscope.heads.retrieval import Retrieval, rouge1_recall
from headscope.interventions import kv_compress

# MODEL / DEVICE from the environment (notes/interv_gpu.sh runs it on the device with DEVICE=cuda)
DEVICE = os.environ.get("DEVICE") or None
if DEVICE in (None, "cpu"):
    torch.set_num_threads(1)
m = hs.load(os.environ.get("MODEL", "smollm2"), device=DEVICE)
L, G, rep = m.cfg.n_layers, m.cfg.n_kv_heads, m.cfg.n_heads // m.cfg.n_kv_heads
retr = [(18, 6), (17, 3), (18, 7), (23, 2), (17, 4), (20, 6), (23, 7), (21, 5), (21, 8), (22, 7), (23, 1),
        (23, 8), (24, 4), (19, 5), (22, 4), (21, 7)]
keep = {(l, h // rep) for l, h in retr}
others = [(l, g) for l in range(L) for g in range(G) if (l, g) not in keep]
random.Random(0).shuffle(others)
sink, recent = int(sys.argv[1]), int(sys.argv[2])
tests = Retrieval(lengths=(400, 800), depths=(0.0, 50.0, 100.0)).tests(m)
comp = os.environ.get("COMPENSATE", "0") == "1"        # also run RazorAttention's compensation token
rows = []
for t in tests:                                        # warm-up (not timed): Triton compiles, CUDA context
    m.generate(t.prompt, max_new_tokens=2)
    kv_compress.generate_compressed(m, t.prompt.to(m.device), {others[0][0]: [others[0][1]]}, sink, recent, 2, comp)
t0 = time.time()                                       # plain HF generate (DynamicCache), the baseline
plain = [m.generate(t.prompt, max_new_tokens=24) for t in tests]
if torch.cuda.is_available():
    torch.cuda.synchronize()
print(json.dumps(dict(cache="plain DynamicCache", tokens_per_s=sum(o.shape[1] - t.prompt.numel() for o, t in
                                                               zip(plain, tests)) / (time.time() - t0))), flush=True)
for frac in (0.0, 0.25, 0.5, 0.75):
    n = round(frac * L * G)
    stream = {}
    for l, g in others[:n]:
        stream.setdefault(l, []).append(g)
    for compensate in ((False, True) if comp and n else (False,)):
        rec, tok_s, bytes_, full_bytes = [], [], [], []
        for t in tests:
            new, nb, dt = kv_compress.generate_compressed(m, t.prompt.to(m.device), stream, sink, recent, 24, compensate)
            rec.append(rouge1_recall(t.answer, m.tokenizer.decode(new, skip_special_tokens=True)))
            tok_s.append(new.numel() / dt)
            bytes_.append(nb)
            full_bytes.append(2 * L * G * (t.prompt.numel() + new.numel() - 1) * m.cfg.d_head * 4)   # full fp32 cache
        rows.append(dict(frac=frac, streaming_kv_heads=n, compensate=compensate, niah_recall=sum(rec) / len(rec),
                         cache_mb=sum(bytes_) / len(bytes_) / 2**20,
                         full_cache_mb=sum(full_bytes) / len(full_bytes) / 2**20,
                         tokens_per_s=sum(tok_s) / len(tok_s), prompt_tokens=[t.prompt.numel() for t in tests]))
        print(json.dumps(rows[-1]), flush=True)
