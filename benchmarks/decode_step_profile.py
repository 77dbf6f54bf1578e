"""Where a whole model's eager decode step spends its host time, with and without recording:
``cProfile`` over decode steps of a random Llama-3-8B-shaped model (``e2e_gpu.build``, 16 layers)
from a cache of K keys, nothing recorded vs argmax recorded (what the retrieval analyzer records).
Prints each mode's wall ms per step without the profiler, then the functions whose own time per
step grows most under recording. Issue 13 (the decode step that ``decode_e2e_gpu.py`` times).

    python benchmarks/decode_step_profile.py [--B 1] [--K 32768] [--steps 64] [--top 25]     # on a GPU
"""
import argparse
import cProfile
import importlib.util
import os
import pstats

import torch

_here = os.path.dirname(os.path.realpath(__file__))


def _sibling(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(_here, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def own_us_per_step(prof, steps):
    """{(file:line(function)): own µs per step} from a cProfile run."""
    st = pstats.Stats(prof)
    out = {}
    for (fn, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        out[f"{os.path.basename(fn)}:{line}({name})"] = (tt / steps * 1e6, nc / steps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--K", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    import headscope as hs
    e2e, dec = _sibling("e2e_gpu"), _sibling("decode_e2e_gpu")
    cfg = e2e.config("llama3-8b", a.layers)
    model = e2e.build(a.layers, "llama3-8b")
    hm = hs.load(model)
    dev = torch.device("cuda")
    cache = dec.random_cache(cfg, a.layers, a.B, a.K, e2e.head_dim(cfg), dev, torch.bfloat16)
    base = model.model

    def plain():
        return dec.run_steps(base, cache, a.K, a.B, a.steps, dev, cfg.vocab_size)

    def recorded():
        with hm.record(hs.Stats(argmax=True)):
            return dec.run_steps(base, cache, a.K, a.B, a.steps, dev, cfg.vocab_size)

    modes = {"nothing recorded": plain, "argmax recorded": recorded}
    for f in modes.values():            # compile and warm up
        f()
    for name, f in modes.items():
        print(f"{name}: " + ", ".join(f"{f():.2f}" for _ in range(3)) + " ms/step (wall, no profiler)")
    got = {}
    for name, f in modes.items():
        pr = cProfile.Profile()
        pr.enable()
        f()
        pr.disable()
        got[name] = own_us_per_step(pr, a.steps)
        tot = sum(v[0] for v in got[name].values())
        print(f"{name}: {tot / 1e3:.2f} ms/step of own time under cProfile")
    p, r = got["nothing recorded"], got["argmax recorded"]
    diff = sorted(((r.get(k, (0, 0))[0] - p.get(k, (0, 0))[0], k) for k in set(p) | set(r)), reverse=True)
    print(f"\n## own µs per step, argmax recorded minus nothing recorded ({a.layers} layers; B={a.B}, K={a.K})")
    print("| function | recorded | plain | difference | calls/step recorded |")
    print("|---|---|---|---|---|")
    for d, k in diff[:a.top]:
        print(f"| {k} | {r.get(k, (0, 0))[0]:.1f} | {p.get(k, (0, 0))[0]:.1f} | {d:+.1f} | {r.get(k, (0, 0))[1]:.0f} |")


if __name__ == "__main__":
    main()
