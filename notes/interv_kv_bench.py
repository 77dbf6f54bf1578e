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
rows = []
for frac in (0.0, 0.25, 0.5, 0.75):
    n = round(frac * L * G)
    stream = {}
    for l, g in others[:n]:
        stream.setdefault(l, []).append(g)
    edits = kv_compress.streaming_edits(m, stream, sink, recent)
    rec, tok_s, bytes_, full_bytes = [], [], [], []
    for t in tests:
        cache = kv_compress.HeadClassCache(stream, L, sink, recent)
        with m.edit(edits):
            t0 = time.time()
            out = m.generate(t.prompt, max_new_tokens=24, cache=cache)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.time() - t0
        new = out[0, t.prompt.numel():]
        rec.append(rouge1_recall(t.answer, m.tokenizer.decode(new, skip_special_tokens=True)))
        tok_s.append(new.numel() / dt)
        bytes_.append(cache.nbytes())
        full_bytes.append(2 * L * G * cache.get_seq_length() * m.cfg.d_head * 4)   # a full fp32 cache
    rows.append(dict(frac=frac, streaming_kv_heads=n, niah_recall=sum(rec) / len(rec),
                     cache_mb=sum(bytes_) / len(bytes_) / 2**20, full_cache_mb=sum(full_bytes) / len(full_bytes) / 2**20,
                     tokens_per_s=sum(tok_s) / len(tok_s), prompt_tokens=[t.prompt.numel() for t in tests]))
    print(json.dumps(rows[-1]), flush=True)
