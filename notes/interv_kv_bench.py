"""KV compression by head class, NIAH quick grid (notes/interv-benchmarks.md, REPORTS.md).

    [MODEL=smollm2] [DEVICE=cuda] [RETR=L18H6,...] [LENGTHS=400,800] [DEPTHS=0,50,100] [NEW=24]
    [FRACS=0,0.25,0.5,0.75] [COMPENSATE=1] [RANDOM=N] [OUTJSON=rows.json] python notes/interv_kv_bench.py SINK RECENT

Retrieval KV heads (kept full): the KV heads holding the query heads listed in RETR (default: the 16
SmolLM2 retrieval heads of REPORTS.md "Retrieval heads"; any other model needs RETR, e.g. Gemma-3-270M's
L5H1,L11H2,L5H2). The streaming fraction is taken from the other KV heads in a fixed seeded order.
RANDOM=N adds the control the head-class claim needs: N random sets of as many streaming KV heads drawn
from ALL KV heads (retrieval ones included). Each row reports the cache the head-class cache holds,
the full cache (every layer, every position) and what HF's own DynamicCache holds for this config
(sliding-window layers keep only their window, e.g. Gemma 3's 512-token layers): the head-class cache
does not apply a layer's sliding window to its full heads, so on a sliding-window model compare with
native_cache_mb too."""
import json, os, random, re, sys, time
import torch
import headscope as hs
from headscope.heads.retrieval import Retrieval, rouge1_recall
from headscope.interventions import kv_compress
from transformers import DynamicCache

SMOLLM2_RETR = "L18H6,L17H3,L18H7,L23H2,L17H4,L20H6,L23H7,L21H5,L21H8,L22H7,L23H1,L23H8,L24H4,L19H5,L22H4,L21H7"

# MODEL / DEVICE from the environment (notes/interv_gpu.sh runs it on the device with DEVICE=cuda)
DEVICE = os.environ.get("DEVICE") or None
if DEVICE in (None, "cpu"):
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
if len(sys.argv) != 3:
    sys.exit("usage: [MODEL=...] [RETR=L5H1,...] python notes/interv_kv_bench.py SINK RECENT")
sink, recent = int(sys.argv[1]), int(sys.argv[2])
m = hs.load(os.environ.get("MODEL", "smollm2"), device=DEVICE)
L, G, rep = m.cfg.n_layers, m.cfg.n_kv_heads, m.cfg.n_heads // m.cfg.n_kv_heads
spec = os.environ.get("RETR") or (SMOLLM2_RETR if "smollm2" in m.cfg.name.lower() else None)
if not spec:
    sys.exit(f"{m.cfg.name}: set RETR to its retrieval heads (e.g. RETR=L5H1,L11H2,L5H2 for Gemma-3-270M); the "
             "default list is SmolLM2's")
retr = [(int(a), int(b)) for a, b in re.findall(r"L(\d+)H(\d+)", spec)]
if not retr or any(not (0 <= l < L and 0 <= h < m.cfg.n_heads) for l, h in retr):
    sys.exit(f"RETR={spec!r}: give heads as L<layer>H<head> within {L} layers x {m.cfg.n_heads} heads")
keep = {(l, h // rep) for l, h in retr}
others = [(l, g) for l in range(L) for g in range(G) if (l, g) not in keep]
random.Random(0).shuffle(others)
ints = lambda s, d: [float(x) for x in os.environ.get(s, d).split(",") if x]
lengths, depths = [int(x) for x in ints("LENGTHS", "400,800")], ints("DEPTHS", "0,50,100")
new_tokens, n_random = int(os.environ.get("NEW", "24")), int(os.environ.get("RANDOM", "0"))
tests = Retrieval(lengths=tuple(lengths), depths=tuple(depths)).tests(m)
comp = os.environ.get("COMPENSATE", "0") == "1"        # also run RazorAttention's compensation token
print(json.dumps(dict(model=m.cfg.name, device=str(m.device), sink=sink, recent=recent, retrieval_heads=retr,
                      retrieval_kv_heads=sorted(keep), kv_heads=L * G, windows=m.cfg.windows,
                      prompt_tokens=[t.prompt.numel() for t in tests])), flush=True)


def cache_mb(cache) -> float:
    """MB held by a transformers cache's layers (keys + values)."""
    return sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values)
               if isinstance(t, torch.Tensor)) / 2**20


for t in tests:                                        # warm-up (not timed): Triton compiles, CUDA context
    m.generate(t.prompt, max_new_tokens=2)
    kv_compress.generate_compressed(m, t.prompt.to(m.device), {others[0][0]: [others[0][1]]}, sink, recent, 2, comp)
t0, plain, native = time.time(), [], []               # plain HF generate (DynamicCache), the baseline
for t in tests:
    cache = DynamicCache(config=m.model.config)
    plain.append(m.generate(t.prompt, max_new_tokens=new_tokens, cache=cache))
    native.append(cache_mb(cache))
if torch.cuda.is_available():
    torch.cuda.synchronize()
dt = time.time() - t0
plain_rec = [rouge1_recall(t.answer, m.tokenizer.decode(o[0, t.prompt.numel():], skip_special_tokens=True))
             for o, t in zip(plain, tests)]
print(json.dumps(dict(cache="plain DynamicCache", niah_recall=sum(plain_rec) / len(plain_rec),
                      native_cache_mb=sum(native) / len(native),
                      tokens_per_s=sum(o.shape[1] - t.prompt.numel() for o, t in zip(plain, tests)) / dt)), flush=True)
rows = []


def measure(stream: dict, **info):
    n = sum(len(v) for v in stream.values())
    for compensate in ((False, True) if comp and n and info.get("kind") == "head-class" else (False,)):
        rec, tok_s, bytes_, full_bytes = [], [], [], []
        for t in tests:
            new, nb, dt = kv_compress.generate_compressed(m, t.prompt.to(m.device), stream, sink, recent,
                                                          new_tokens, compensate)
            rec.append(rouge1_recall(t.answer, m.tokenizer.decode(new, skip_special_tokens=True)))
            tok_s.append(new.numel() / dt)
            bytes_.append(nb)
            full_bytes.append(2 * L * G * (t.prompt.numel() + new.numel() - 1) * m.cfg.d_head * 4)   # full fp32 cache
        rows.append(dict(**info, streaming_kv_heads=n, stream={int(k): v for k, v in sorted(stream.items())},
                         compensate=compensate, niah_recall=sum(rec) / len(rec), recall_per_test=rec,
                         cache_mb=sum(bytes_) / len(bytes_) / 2**20,
                         full_cache_mb=sum(full_bytes) / len(full_bytes) / 2**20,
                         native_cache_mb=sum(native) / len(native),
                         tokens_per_s=sum(tok_s) / len(tok_s)))
        print(json.dumps(rows[-1]), flush=True)


for frac in ints("FRACS", "0,0.25,0.5,0.75"):
    n = min(round(frac * L * G), len(others))
    stream = {}
    for l, g in others[:n]:
        stream.setdefault(l, []).append(g)
    measure(stream, kind="head-class", frac=frac)
    if n and n_random:                                 # control: random streaming sets over ALL KV heads
        for i, s in enumerate(kv_compress.random_stream(L, G, n, n_random, seed=0)):
            measure(s, kind="random", frac=frac, set=i)
if os.environ.get("OUTJSON"):
    tmp = os.environ["OUTJSON"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(model=m.cfg.name, sink=sink, recent=recent, retrieval_heads=retr, lengths=lengths,
                       depths=depths, plain_recall=plain_rec, native_cache_mb=native, rows=rows), f, indent=1)
    os.replace(tmp, os.environ["OUTJSON"])
    md = [f"# KV cache by head class, {m.cfg.name}, sink {sink} / recent {recent}, NIAH lengths {lengths} x depths "
          f"{depths} ({len(tests)} tests, {new_tokens} new tokens)", "",
          f"plain DynamicCache: NIAH recall {sum(plain_rec) / len(plain_rec):.3f}, native cache "
          f"{sum(native) / len(native):.2f} MB", "",
          "| streaming KV heads | kind | compensate | NIAH recall (mean; min-max over sets) | cache held MB | "
          "full cache MB | native cache MB | new tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["frac"], r["kind"], r["compensate"]) for r in rows):
        rs = [r for r in rows if (r["frac"], r["kind"], r["compensate"]) == key]
        rec = [r["niah_recall"] for r in rs]
        mean = lambda k: sum(r[k] for r in rs) / len(rs)
        spread = f" ({min(rec):.3f}-{max(rec):.3f}, {len(rs)} sets)" if len(rs) > 1 else ""
        md.append(f"| {rs[0]['streaming_kv_heads']} / {L * G} ({key[0]:.0%}) | {key[1]} | {key[2]} | "
                  f"{sum(rec) / len(rec):.3f}{spread} | {mean('cache_mb'):.2f} | {mean('full_cache_mb'):.2f} | "
                  f"{mean('native_cache_mb'):.2f} | {mean('tokens_per_s'):.2f} |")
    md_path = os.path.splitext(os.environ["OUTJSON"])[0] + ".md"
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(md_path + ".tmp", md_path)
