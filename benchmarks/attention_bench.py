"""Benchmark of the Triton attention kernels (a benchmark, not a test).

    python benchmarks/attention_bench.py                 # Llama-3-8B 4k..128k and SmolLM2 4k..32k tables
    python benchmarks/attention_bench.py --sweep         # time tile configurations at 16k and print the best
    python benchmarks/attention_bench.py --sizes 4096 16384 --no-small
    python benchmarks/attention_bench.py --dry           # tiny sizes, any machine (TRITON_INTERPRET=1 on CPU)
    python benchmarks/attention_bench.py --compare       # FA4 / cuDNN / SDPA flash / Flex / ours, d64 d128 d256
    python benchmarks/attention_bench.py --decode        # Q=1 decode, Llama-3-8B shapes, B=1 and 8, K=8k..128k

``--compare`` puts our kernels beside FlashAttention-4 (``flash_attn.cute.flash_attn_func``, when
importable), PyTorch SDPA's cuDNN and flash backends and FlexAttention (torch.compile'd), all timed
in the same run, with ratios to FA4 (rows to $OUT/kernels_compare.md); and, for the optional FA4
backend (``kernels/fa4.py``), "ours masses (Triton)" (sink + recent + window distance on the Triton
kernels), "headscope plain (dispatch)" (what a layer with nothing recorded runs: FA4 when importable,
else SDPA) and "headscope masses via FA4" (the same masses from FA4's LSE). ``--decode`` times one query
against K cached keys: default SDPA, FA4, our split-key decode path plain / + argmax / + all row
statistics, the one-program-per-query-block forward it replaced, and the K/V read floor; times are
``do_bench`` medians and, in brackets, CUDA-graph replays (no Python launch overhead).

Causal, bf16, B=1. Columns: PyTorch SDPA (flash backend), our kernel plain, + all row statistics,
+ column sums (received), + both, and eager attention that materialises the probabilities (until
it runs out of memory). Median time of ``triton.testing.do_bench``; TFLOP/s counts useful FLOPs
only, 4 * N^2 * d * H / 2 for causal attention (the statistics' extra work is not counted). The
markdown table is printed and written, row by row, to $OUT/kernels_bench.md (numbers also to
$OUT/kernels_bench.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # the repository root

from headscope.kernels import fa4  # noqa: E402
from headscope.kernels import triton_attention as ta  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402


def row_request(N: int) -> StatRequest:
    """'All' row statistics: sink (4), two spans (system prompt-like 64 tokens, 256 in the middle),
    entropy, distance, window distance (W=128), recent mass (R=64), argmax/max prob."""
    return StatRequest(sink_k=4, spans=((4, 68), (N // 2, N // 2 + 256)), entropy=True, distance=True,
                       window_distance=128, recent=64, argmax=True)


def masses_request(N: int) -> StatRequest:
    """What the FlashAttention-4 backend derives from its LSE: sink (4), recent mass (R=64), window
    distance (W=128), as in ``row_request`` (and the LSE, always returned with statistics)."""
    return StatRequest(sink_k=4, recent=64, window_distance=128)


VARIANTS = {
    "plain": lambda N: None,
    "rows": row_request,
    "cols": lambda N: StatRequest(received=True),
    "rows+cols": lambda N: StatRequest(**{**row_request(N).__dict__, "received": True}),
}


def flops(N, H, d):
    return 4 * N * N * d * H / 2


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(N, H, G, d, dev=None, dtype=torch.bfloat16, seed=0):
    dev = dev or DEV
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(1, H, N, d, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, G, N, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, G, N, d, device=dev, dtype=dtype, generator=g)
    return q, k, v


def sdpa_fn(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, G = q.shape[1], k.shape[1]
    if not q.is_cuda:   # --dry on a CPU
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), "cpu (dry run)"

    def gqa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    try:
        gqa()
        return gqa, "flash, enable_gqa"
    except RuntimeError:
        ke, ve = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)

        def rep():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        rep()
        return rep, "flash, KV repeated outside the timing"


def eager_fn(q, k, v):
    """HF-style eager attention: scores, mask, fp32 softmax, probabilities in q's dtype, PV."""
    H, G, N, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    ke, ve = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    mask = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1)

    def run():
        s = torch.matmul(q, ke.transpose(-1, -2)) * d ** -0.5
        s.masked_fill_(mask, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        del s
        return torch.matmul(p, ve)
    return run


def bench(fn, dry=False):
    if dry:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _set_globals(glob):
    for name, val in (glob or {}).items():
        setattr(ta, name, val)


def _warm_one(task):
    """Compile (and run once) one kernel variant in a worker process: fills Triton's disk cache."""
    variant, N, H, G, d, fwd_cfg, recv_cfg, glob = (tuple(task) + (None,))[:8]
    _set_globals(glob)
    if fwd_cfg:
        for kind in ("plain", "stats"):
            ta.FWD_CONFIGS[kind][d] = tuple(fwd_cfg)
    if recv_cfg:
        ta.RECV_CONFIGS[d] = tuple(recv_cfg)
    q, k, v = make(N, H, G, d)
    t0 = time.perf_counter()
    try:
        ta.attention(q, k, v, scaling=d ** -0.5, stats=VARIANTS[variant](N))
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (a tile that does not fit: the sweep skips it)
        print(f"{variant} d={d} fwd {fwd_cfg} recv {recv_cfg}: {type(e).__name__}", flush=True)
    return variant, d, fwd_cfg, recv_cfg, time.perf_counter() - t0


def precompile(tasks, workers):
    if workers <= 1 or not tasks:
        return
    import multiprocessing as mp
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        for r in ex.map(_warm_one, tasks):
            pass
    print(f"precompiled {len(tasks)} kernel variants in {time.perf_counter() - t0:.1f} s ({workers} processes)",
          flush=True)


def fmt_ms(ms):
    return "OOM" if ms is None else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def emit(line=""):
    """Print a line and append it to $OUT/kernels_bench.md at once (a cut-off run keeps its rows)."""
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels_bench.md"), "a") as f:
            f.write(line + "\n")


def run_table(shape_name, H, G, d, sizes, args, out_rows):
    emit(f"\n### {shape_name}: B=1, H={H}, G={G}, d={d}, causal, bf16\n")
    header = ("| N | SDPA flash ms (TFLOP/s) | ours plain ms (TFLOP/s, ×SDPA) | + row stats | + column sums "
              "| + rows + columns | eager (materialised P) |")
    lines = [header, "|" + "---|" * 7]
    emit(header)
    emit(lines[1])
    eager_oom = [None]
    for N in sizes:
        torch.cuda.empty_cache()
        q, k, v = make(N, H, G, d)
        f = flops(N, H, d)
        res = {"shape": shape_name, "N": N, "H": H, "G": G, "d": d}
        sd, how = sdpa_fn(q, k, v)
        res["sdpa_backend"] = how
        t_sdpa = bench(sd, args.dry)
        res["sdpa_ms"] = t_sdpa
        # correctness spot check against SDPA (fresh random inputs, bf16 tolerance)
        ours, _ = ta.attention(q, k, v, scaling=d ** -0.5)
        ref = sd()
        res["max_abs_err_vs_sdpa"] = (ours.float() - ref.float()).abs().max().item()
        cells = [f"{fmt_ms(t_sdpa)} ({f / t_sdpa / 1e9:.0f})"]
        for name in VARIANTS:
            req = VARIANTS[name](N)
            t = bench(lambda: ta.attention(q, k, v, scaling=d ** -0.5, stats=req), args.dry)
            res[f"{name}_ms"] = t
            cells.append(f"{fmt_ms(t)} ({f / t / 1e9:.0f}, {t_sdpa / t:.2f}×)")
        t_eager = None
        if args.no_eager:
            cells.append("not run")
        elif eager_oom[0] is not None:
            cells.append(f"OOM (already at {eager_oom[0] // 1024}k, not retried)")
        else:
            e = None
            try:
                e = eager_fn(q, k, v)
                t_eager = bench(e, args.dry)
            except torch.OutOfMemoryError:
                eager_oom[0] = N
            e = None
            torch.cuda.empty_cache()
            cells.append(f"{fmt_ms(t_eager)}" + (f" ({t_eager / t_sdpa:.1f}× SDPA time)" if t_eager else ""))
        res["eager_ms"] = t_eager
        line = (f"| {N // 1024}k | " if N >= 1024 else f"| {N} | ") + " | ".join(cells) + " |"
        emit(line)
        lines.append(line)
        out_rows.append(res)
        del q, k, v
    return "\n".join(lines)


SWEEP = {   # d: (H, G, plain configs, row-stat configs, received configs)
    128: ((32, 8), [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3)],
          [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
          [(128, 128, 8, 3), (64, 128, 8, 3)]),
    64: ((9, 3), [(64, 64, 4, 3)], [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
         [(64, 64, 4, 3), (64, 128, 8, 3)]),
    256: ((8, 4), [(64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2)],
          [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
          [(32, 64, 8, 2), (64, 64, 8, 2)]),
}
SPLITS = (4, 0)   # RECV_MIN_PROGRAMS_PER_SM: split GQA heads over programs for short sequences, or never


def sweep(args):
    """Time tile configurations (and the argmax / head-split variants) per head dim and size."""
    tasks = []
    for d, ((H, G), plain, rows, recv) in SWEEP.items():
        for cfg in plain:
            tasks.append(("plain", 4096, H, G, d, cfg, None, None))
        for cfg in rows:
            tasks.append(("rows", 4096, H, G, d, cfg, None, None))
        for cfg in recv:
            for sp in SPLITS:
                tasks.append(("cols", 4096, H, G, d, plain[0], cfg, {"RECV_MIN_PROGRAMS_PER_SM": sp}))
    precompile(tasks, args.workers)
    best, chosen = {}, {}
    for d, ((H, G), plain, rows, recv) in SWEEP.items():
        for N in (args.sweep_sizes if d != 256 else args.sweep_sizes[-1:]):
            q, k, v = make(N, H, G, d)
            f = flops(N, H, d)
            sd, _ = sdpa_fn(q, k, v)
            t_sdpa = bench(sd)
            print(f"\nd={d} H={H} G={G} N={N}: SDPA {t_sdpa:.3f} ms ({f / t_sdpa / 1e9:.0f} TFLOP/s)", flush=True)

            def run(kind, label, key, cfg=None):
                req = VARIANTS[kind](N)
                try:
                    t = bench(lambda: ta.attention(q, k, v, scaling=d ** -0.5, stats=req))
                except Exception as e:  # noqa: BLE001
                    print(f"  {kind:5s} {label}: {type(e).__name__}", flush=True)
                    return 1e9
                print(f"  {kind:5s} {label}: {t:.3f} ms  {f / t / 1e9:.0f} TFLOP/s  {t_sdpa / t:.2f}x SDPA", flush=True)
                if t < best.get(key, (1e9,))[0]:
                    best[key] = (t, label)
                    chosen[f"{kind} {d}"] = list(cfg) if cfg else None
                return t
            t_plain, best_plain = 1e9, plain[0]
            for cfg in plain:
                ta.FWD_CONFIGS["plain"][d] = cfg
                t = run("plain", f"fwd {cfg}", (d, N, "plain"), cfg)
                if t < t_plain:
                    t_plain, best_plain = t, cfg
            ta.FWD_CONFIGS["plain"][d] = best_plain
            for cfg in rows:
                ta.FWD_CONFIGS["stats"][d] = cfg
                run("rows", f"fwd {cfg}", (d, N, "rows"), cfg)
            for cfg in recv:
                for sp in SPLITS:
                    ta.RECV_CONFIGS[d], ta.RECV_MIN_PROGRAMS_PER_SM = cfg, sp
                    t = run("cols", f"recv {cfg} split<{sp}/SM", (d, N, "cols"), cfg if sp == 4 else None)
                    print(f"        received pass alone ~{t - t_plain:.3f} ms", flush=True)
            ta.RECV_MIN_PROGRAMS_PER_SM = 4
            del q, k, v
            torch.cuda.empty_cache()
    if os.environ.get("KERNELS_BEST"):      # the tables of a later run (--compare) start from these
        with open(os.environ["KERNELS_BEST"], "w") as fh:
            json.dump(chosen, fh)
    print("\nbest:", flush=True)
    for (d, N, kind), (t, label) in best.items():
        print(f"  d={d} N={N} {kind}: {label} {t:.3f} ms", flush=True)
    return best


# ---------------------------------------------------------------------------------------------
# --compare: the best kernels on this machine beside ours
def fa4_fn(q, k, v, causal=True, **kw):
    """FlashAttention-4 (CuTe DSL) on [B, N, H, d] copies made outside the timing; None if absent.
    ``kw`` go to flash_attn_func (e.g. num_splits=0: its split-KV heuristic, for decoding)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001  (not installed, or no GPU it supports)
        print(f"FA4 not available: {type(e).__name__}: {e}", flush=True)
        return None
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    d = q.shape[-1]

    def run():
        return flash_attn_func(qt, kt, vt, softmax_scale=d ** -0.5, causal=causal, **kw)
    try:
        run()
    except Exception as e:  # noqa: BLE001
        print(f"FA4 failed on {tuple(q.shape)}: {type(e).__name__}: {e}", flush=True)
        return None
    return run


def sdpa_backend_fn(q, k, v, backend, causal=True):
    """PyTorch SDPA restricted to one backend (None = PyTorch's default choice)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, G = q.shape[1], k.shape[1]
    bk = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(backend)

    def call(kk, vv, gqa):
        if bk is None:
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)
        with sdpa_kernel([bk]):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)
    try:
        call(k, v, True)
        return lambda: call(k, v, True)
    except RuntimeError:
        ke, ve = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        try:
            call(ke, ve, False)
        except RuntimeError as e:
            print(f"SDPA {backend} failed: {e}", flush=True)
            return None
        return lambda: call(ke, ve, False)


def flex_fn(q, k, v):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        N = q.shape[2]
        bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N, device=q.device)
        fx = torch.compile(flex_attention)
        run = lambda: fx(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
        run()
        return run
    except Exception as e:  # noqa: BLE001
        print(f"FlexAttention failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


COMPARE_SHAPES = [  # name, H, G, d, sizes
    ("Llama-3-8B", 32, 8, 128, [16384, 32768, 65536, 131072]),
    ("Qwen2.5-7B", 28, 4, 128, [24576]),
    ("SmolLM2", 9, 3, 64, [32768]),
    ("Gemma-3 (d256)", 8, 4, 256, [32768]),
]


def load_best():
    """Apply the tile choices a --sweep run wrote to $KERNELS_BEST (if any), and say which."""
    path = os.environ.get("KERNELS_BEST")
    if not path or not os.path.exists(path):
        return
    with open(path) as fh:
        chosen = json.load(fh)
    for key, cfg in chosen.items():
        kind, d = key.split()
        if cfg is None:
            continue
        if kind == "plain":
            ta.FWD_CONFIGS["plain"][int(d)] = tuple(cfg)
        elif kind == "rows":
            ta.FWD_CONFIGS["stats"][int(d)] = tuple(cfg)
        elif kind == "cols":
            ta.RECV_CONFIGS[int(d)] = tuple(cfg)
    print(f"configs from {path}: fwd {ta.FWD_CONFIGS}, received {ta.RECV_CONFIGS}", flush=True)


def headscope_fns(q, k, v):
    """The new columns of --compare, on q/k/v laid out as a model's projections leave them
    ([B, N, H, d] memory seen as [B, H, N, d]; copies made outside the timing):
    "plain": ``probe.attention.plain_attention``, what a layer with nothing recorded runs
    (FlashAttention-4 when it is importable, else SDPA); "masses": ``kernels/fa4.py`` with
    ``masses_request`` (None when FA4 is absent or declines, the reason printed)."""
    d, N = q.shape[-1], q.shape[2]
    ql, kl, vl = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    fns = {"dispatch": None, "masses": None}
    try:
        from headscope.probe.attention import plain_attention
        fns["dispatch"] = lambda: plain_attention(ql, kl, vl, scaling=d ** -0.5)
        fns["dispatch"]()
    except Exception as e:  # noqa: BLE001  (headscope not importable as a package here)
        print(f"plain dispatch not timed: {type(e).__name__}: {e}", flush=True)
        fns["dispatch"] = None
    req = masses_request(N)
    if not fa4.available(q):
        print(f"FA4 backend not available ({fa4.import_error() or 'not installed / not this GPU'})", flush=True)
        return fns
    why = fa4.supports(ql, kl, vl, req, None)
    if why is not None:
        print(f"FA4 backend declines: {why}", flush=True)
        return fns
    fns["masses"] = lambda: fa4.attention(ql, kl, vl, scaling=d ** -0.5, stats=req)
    return fns


def masses_error(q, k, v):
    """Largest difference between the FA4 backend's masses and the Triton kernels' (same request)."""
    d, N = q.shape[-1], q.shape[2]
    req = masses_request(N)
    _, a = fa4.attention(q, k, v, scaling=d ** -0.5, stats=req)
    _, b = ta.attention(q, k, v, scaling=d ** -0.5, stats=req)
    return {n: (a[n].float() - b[n].float()).abs().max().item() for n in b}


def table_writer(name: str):
    """put(line): print a table line and, when $OUT is set, append it to $OUT/name."""
    out = os.environ.get("OUT")
    path = os.path.join(out, name) if out else None

    def put(line):
        print(line, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
    return put


def compare(args):
    load_best()
    out = os.environ.get("OUT")
    put = table_writer("kernels_compare.md")
    put(f"\n### bf16 causal B=1: ms (TFLOP/s, ×FA4); {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    put("| shape | N | FA4 | cuDNN SDPA | SDPA flash | Flex | ours plain | ours + rows | ours + rows + cols "
        "| ours masses (Triton) | headscope plain (dispatch) | headscope masses via FA4 | max err vs FA4 |")
    put("|" + "---|" * 13)
    print(f"masses = {masses_request(0)} (+ lse); plain dispatch = FA4 if importable here "
          f"({fa4.available()}), else SDPA", flush=True)
    res = []
    for name, H, G, d, sizes in COMPARE_SHAPES:
        if args.compare_only and name.split()[0] not in args.compare_only:
            continue
        for N in sizes:
            torch.cuda.empty_cache()
            q, k, v = make(N, H, G, d)
            f = flops(N, H, d)
            fns = {"fa4": fa4_fn(q, k, v), "cudnn": sdpa_backend_fn(q, k, v, "cudnn"),
                   "flash": sdpa_backend_fn(q, k, v, "flash"), "flex": flex_fn(q, k, v) if args.flex and N <= 32768 else None}
            for var in ("plain", "rows", "rows+cols", "masses-triton"):
                req = VARIANTS[var](N) if var in VARIANTS else masses_request(N)
                fns[var] = (lambda r: lambda: ta.attention(q, k, v, scaling=d ** -0.5, stats=r))(req)
            fns.update(headscope_fns(q, k, v))
            t = {n: (bench(fn) if fn is not None else None) for n, fn in fns.items()}
            if fns["masses"] is not None:
                print(f"{name} N={N}: FA4 masses vs Triton max abs diff {masses_error(q, k, v)}", flush=True)
            base = t["fa4"]
            err = None
            if fns["fa4"] is not None:
                r = fns["fa4"]()
                r = r[0] if isinstance(r, (tuple, list)) else r
                err = (fns["plain"]()[0].transpose(1, 2).float() - r.float()).abs().max().item()

            def cell(x):
                if x is None:
                    return "n/a"
                r = f", {base / x:.2f}×" if base else ""
                return f"{x:.2f} ({f / x / 1e9:.0f}{r})"
            put(f"| {name} H{H} G{G} d{d} | {N // 1024}k | " + " | ".join(cell(t[n]) for n in
                ("fa4", "cudnn", "flash", "flex", "plain", "rows", "rows+cols", "masses-triton", "dispatch",
                 "masses")) + f" | {err} |")
            res.append({"shape": name, "N": N, "H": H, "G": G, "d": d, **{f"{n}_ms": x for n, x in t.items()}})
            del q, k, v, fns
    if out:
        with open(os.path.join(out, "kernels_compare.json"), "w") as fh:
            json.dump(res, fh, indent=1)


# ---------------------------------------------------------------------------------------------
# --decode: one query against K cached keys
def decode(args):
    from headscope.kernels import triton_decode as td
    import triton.testing
    out = os.environ.get("OUT")
    put = table_writer("kernels_decode.md")
    H, G, d = 32, 8, 128
    put(f"\n### decode Q=1, H={H} G={G} d={d}, bf16: µs, do_bench median [CUDA graph]; ×SDPA from graphs\n")
    put("| B, K | default SDPA | FA4 | FA4 num_splits=0 | ours plain | ours + argmax | ours + all rows | old fwd + argmax "
        "| K/V floor |")
    put("|" + "---|" * 9)
    res = []
    for B in args.decode_batches:
        for K in args.decode_sizes:
            torch.cuda.empty_cache()
            g = torch.Generator(device="cuda").manual_seed(1)
            q = torch.randn(B, H, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
            sd = sdpa_backend_fn(q, k, v, None, causal=False)
            fns = {"sdpa": sd, "fa4": fa4_fn(q, k, v, causal=False),
                   "fa4-split": fa4_fn(q, k, v, causal=False, num_splits=0)}   # fa4.DECODE would need this fast
            for name, req in (("plain", None), ("argmax", StatRequest(argmax=True)), ("rows", row_request(K))):
                fns[name] = (lambda r: lambda: ta.attention(q, k, v, scaling=d ** -0.5, stats=r))(req)
            old_min = td.DECODE_MIN_K

            def old():
                td.DECODE_MIN_K = 1 << 40
                try:
                    return ta.attention(q, k, v, scaling=d ** -0.5, stats=StatRequest(argmax=True))
                finally:
                    td.DECODE_MIN_K = old_min
            fns["old"] = old
            # correctness: decode path vs SDPA output (bf16) and vs the old kernel's statistics
            o_new, s_new = ta.attention(q, k, v, scaling=d ** -0.5, stats=row_request(K))
            td.DECODE_MIN_K = 1 << 40
            o_old, s_old = ta.attention(q, k, v, scaling=d ** -0.5, stats=row_request(K))
            td.DECODE_MIN_K = old_min
            errs = {"out_vs_sdpa": (o_new.float() - sd().float()).abs().max().item()}
            errs.update({n: (s_new[n].float() - s_old[n].float()).abs().max().item() for n in s_new})
            print(f"B={B} K={K} max abs diff: {errs}", flush=True)
            t, tg = {}, {}
            for n, fn in fns.items():
                if fn is None:
                    t[n] = tg[n] = None
                    continue
                t[n] = bench(fn) * 1e3
                try:
                    tg[n] = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
                except Exception as e:  # noqa: BLE001
                    print(f"cudagraph {n}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    tg[n] = None
            floor = B * G * K * d * 2 * 2 / 4.3e12 * 1e6
            base = tg["sdpa"] or t["sdpa"]

            def cell(n):
                if t[n] is None:
                    return "n/a"
                ref = tg[n] if tg[n] is not None else t[n]
                return f"{t[n]:.0f} [{tg[n]:.0f}] {ref / base:.2f}×" if tg[n] else f"{t[n]:.0f} {t[n] / base:.2f}×"
            if fns["fa4-split"] is not None and fns["fa4"] is not None:
                r1, r2 = fns["fa4"](), fns["fa4-split"]()
                r1, r2 = (r[0] if isinstance(r, (tuple, list)) else r for r in (r1, r2))
                print(f"B={B} K={K} FA4 num_splits=0 vs 1 max abs diff {(r1.float() - r2.float()).abs().max().item()}",
                      flush=True)
            put(f"| {B}, {K // 1024}k | " + " | ".join(cell(n) for n in ("sdpa", "fa4", "fa4-split", "plain", "argmax",
                                                                         "rows", "old"))
                + f" | {floor:.0f} |")
            res.append({"B": B, "K": K, "us": t, "graph_us": tg, "floor_us": floor, "errs": errs})
            del q, k, v
    if out:
        with open(os.path.join(out, "kernels_decode.json"), "w") as fh:
            json.dump(res, fh, indent=1)


def decode_sweep(args):
    """Time the decode kernels' (BLOCK_N, warps, stages) and programs-per-SM choices (CUDA-graph
    replays, all row statistics) at B=1 and 8, K=8k and 32k; keep the best total for --decode."""
    from headscope.kernels import triton_decode as td
    import triton.testing
    H, G, d = 32, 8, 128
    total = {}
    for B in (1, 8):
        for K in (8192, 32768):
            g = torch.Generator(device="cuda").manual_seed(1)
            q = torch.randn(B, H, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
            req = row_request(K)
            line = []
            for cfg in ((64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 3), (64, 2, 3)):
                for pps in (1, 2, 4, 8):
                    td.DECODE_PROGRAMS_PER_SM = pps
                    tt = triton.testing.do_bench_cudagraph(
                        lambda: td.attention(q, k, v, scaling=d ** -0.5, stats=req, config=cfg),
                        rep=30, return_mode="median") * 1e3
                    total[(cfg, pps)] = total.get((cfg, pps), 0.0) + tt / (B * K / 8192)
                    line.append((tt, cfg, pps))
            line.sort()
            print(f"decode sweep B={B} K={K} (graph µs): " + ", ".join(f"{c}/{p}: {x:.1f}" for x, c, p in line[:6]),
                  flush=True)
    (cfg, pps) = min(total, key=total.get)
    td.DECODE_CONFIGS[128], td.DECODE_PROGRAMS_PER_SM = cfg, pps
    td.clear_plans()                                   # plans made before hold the old tiles
    print(f"decode sweep: best {cfg} at {pps} programs/SM (default was {(64, 4, 3)} at 4)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--small-sizes", type=int, nargs="*", default=[4096, 16384, 32768])
    ap.add_argument("--no-small", action="store_true", help="skip the d=64 (SmolLM2) table")
    ap.add_argument("--no-large", action="store_true", help="skip the d=128 (Llama-3-8B) table")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-sizes", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--workers", type=int, default=8, help="processes that precompile the kernels")
    ap.add_argument("--dry", action="store_true", help="tiny sizes, wall-clock timing (CPU interpreter OK)")
    ap.add_argument("--compare", action="store_true", help="FA4 / cuDNN / flash / Flex / ours, d64 d128 d256")
    ap.add_argument("--compare-only", nargs="*", default=None, help="shape names (first word) to run")
    ap.add_argument("--no-flex", dest="flex", action="store_false")
    ap.add_argument("--decode", action="store_true", help="Q=1 decode table")
    ap.add_argument("--decode-sweep", action="store_true")
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--decode-sizes", type=int, nargs="*", default=[8192, 32768, 131072])
    args = ap.parse_args()

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry:
        if dev == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        args.sizes, args.small_sizes, args.workers = [64], [48], 1
    if dev == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {__import__('triton').__version__}", flush=True)
    if args.sweep:
        sweep(args)
        return
    if args.decode_sweep:
        decode_sweep(args)
    if args.decode:
        decode(args)
    if args.compare:
        compare(args)
    if args.decode or args.compare or args.decode_sweep:
        return
    if os.environ.get("OUT"):
        open(os.path.join(os.environ["OUT"], "kernels_bench.md"), "w").close()
    print(f"configs: fwd {ta.FWD_CONFIGS}, received {ta.RECV_CONFIGS}, "
          f"received head split below {ta.RECV_MIN_PROGRAMS_PER_SM} programs/SM", flush=True)
    tasks = []
    for (H, G, d, sizes, skip) in ((32, 8, 128, args.sizes, args.no_large),
                                   (9, 3, 64, args.small_sizes, args.no_small)):
        if not skip and sizes:
            tasks += [(name, 4096, H, G, d, None, None, None) for name in VARIANTS]
    if dev == "cuda":
        precompile(tasks, args.workers)
    rows, tables = [], []
    if not args.no_large:
        tables.append(run_table("Llama-3-8B", 32, 8, 128, args.sizes, args, rows))
    if not args.no_small:
        tables.append(run_table("SmolLM2-135M", 9, 3, 64, args.small_sizes, args, rows))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels_bench.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
