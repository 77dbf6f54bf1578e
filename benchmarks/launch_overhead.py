"""Host cost of one eager decode step, taken apart on the GPU: the whole call
(``triton_attention.attention`` -> ``triton_decode``) with the compiled-kernel launch of
``kernels/launch.py`` (the default) and without it, with the key splits merged by a second kernel
(``triton_decode.MERGE = "kernel"``), the two Triton launches alone through
``JITFunction`` (``kernel[grid](...)``, with the same arguments), the same two launches through the
compiled kernels (``CompiledKernel[grid]``, no argument binding or cache-key work), the same
with each tensor passed as its address (``launch.addresses``: no driver query per pointer), and the
three buffers' ``torch.empty`` calls; default SDPA for scale. Wall µs per call over back-to-back calls;
SDPA and the whole call with and without the fast launch take turns (9 rounds, medians).
Issue 13.

    python benchmarks/launch_overhead.py [--calls 2000]          # on a GPU
    python benchmarks/launch_overhead.py --baseline .baseline/kernels_7547907

``--baseline DIR``: a ``kernels/`` folder of another commit (``git archive REV kernels`` unpacked
under a package name of its own; it imports nothing outside itself) whose whole call takes turns
with this checkout's, in the same process: a before/after on one machine start.
"""
import argparse
import importlib
import inspect
import os as _os
import sys as _sys
_here = _os.path.dirname(_os.path.realpath(__file__))
_sys.path.insert(0, _os.path.dirname(_here))   # the repository root: benchmarks.host_timing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.host_timing import decode_inputs, wall_us, with_merge  # noqa: E402
from headscope.kernels import launch  # noqa: E402
from headscope.kernels import triton_attention as ta  # noqa: E402
from headscope.kernels import triton_decode as td  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid and arguments, then launches."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))
            return self.fn[grid](*args, **kw)
        return launch


def interleaved_us(fns, n, rounds=9):
    """Median over ``rounds`` of each function's wall µs per call (``n`` calls), the functions taking
    turns, so that a slow spell of the host touches all of them."""
    got = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            got[i].append(wall_us(fn, n, warmup=50))
    return [sorted(g)[len(g) // 2] for g in got]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--baseline", default=None, help="a kernels/ folder of another commit (module docstring)")
    a = ap.parse_args()
    base = None
    if a.baseline:
        path = _os.path.realpath(a.baseline)
        _sys.path.insert(0, _os.path.dirname(path))
        base = importlib.import_module(_os.path.basename(path) + ".triton_attention")
        print(f"baseline: {path}")
    print(f"whole call: triton_decode.MERGE = {td.MERGE!r}; the launches taken apart are those of MERGE = 'kernel'")
    print("| case | SDPA | whole call | whole call, merge kernel | whole call, fast launch off | "
          + ("whole call, baseline | " if base else "")
          + "2 launches, JITFunction | 2 launches, compiled kernel | "
          "2 launches, compiled kernel, tensors as addresses | torch.empty x3 |")
    print("|---|---|---|---|---|" + ("---|" if base else "") + "---|---|---|---|")
    for name, K, req in (("Llama-3-8B 8k plain", 8192, None), ("Llama-3-8B 8k argmax", 8192, StatRequest(argmax=True)),
                         ("Llama-3-8B 32k all rows", 32768, StatRequest(sink_k=4, entropy=True, distance=True,
                                                                         recent=64, argmax=True))):
        B, H, G, d = 1, 32, 8, 128
        q, k, v, _, _ = decode_inputs(B, H, G, d, K)

        def whole():
            return ta.attention(q, k, v, scaling=d ** -0.5, causal=True, stats=req)

        whole_two_launches = with_merge(whole, "kernel")     # the splits merged by a second kernel
        saved = td.decode_partial_kernel, td.decode_merge_kernel
        rec = [Recorder(f) for f in saved]
        td.decode_partial_kernel, td.decode_merge_kernel = rec
        td.clear_plans()
        with torch.no_grad():
            whole_two_launches()                      # the two launches, taken apart below
        td.decode_partial_kernel, td.decode_merge_kernel = saved
        td.clear_plans()                               # the plan made above is bound to the recorders
        (g1, a1, k1), (g2, a2, k2) = rec[0].calls[0], rec[1].calls[0]

        def jit_launches():
            saved[0][g1](*a1, **k1)
            saved[1][g2](*a2, **k2)
        compiled = []
        try:
            for f, gr, args, kw in ((saved[0], g1, a1, k1), (saved[1], g2, a2, k2)):
                kern = f[gr](*args, **kw)                   # JITFunction.run returns the compiled kernel
                params = inspect.signature(f.fn).parameters
                bound = inspect.signature(f.fn).bind(*args, **{n: x for n, x in kw.items() if n in params})
                bound.apply_defaults()
                compiled.append((kern[tuple(gr) + (1,) * (3 - len(gr))], tuple(bound.arguments.values())))
        except Exception as e:  # noqa: BLE001
            print(f"  compiled kernels: {type(e).__name__}: {str(e)[:300]}", flush=True)

        def compiled_launches():
            if not compiled:
                raise RuntimeError("no compiled kernels (above)")
            for run, vals in compiled:
                run(*vals)

        by_address = [(run, tuple(launch.addresses(vals))) for run, vals in compiled]

        def compiled_launches_by_address():      # the tensors passed as their addresses (launch.addresses)
            if not by_address:
                raise RuntimeError("no compiled kernels (above)")
            for run, vals in by_address:
                run(*vals)

        def whole_jit():
            fl = [launch.fast(f) for f in saved]
            on = [f.on for f in fl]
            for f in fl:
                f.on = False
            try:
                return whole()
            finally:
                for f, o in zip(fl, on):
                    f.on = o

        def empties():
            for _ in range(3):
                torch.empty(4096, dtype=torch.float32, device="cuda")

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        def whole_baseline():
            return base.attention(q, k, v, scaling=d ** -0.5, causal=True, stats=req)
        turns = (sdpa, whole, whole_two_launches, whole_jit) + ((whole_baseline,) if base else ())
        cells = []
        with torch.no_grad():
            try:
                cells += [f"{c:.1f}" for c in interleaved_us(turns, a.calls // 4)]
            except Exception as e:  # noqa: BLE001
                cells += ["failed"] * len(turns)
                print(f"  whole call: {type(e).__name__}: {str(e)[:300]}", flush=True)
            for f in (jit_launches, compiled_launches, compiled_launches_by_address, empties):
                try:
                    cells.append(f"{wall_us(f, a.calls, warmup=50):.1f}")
                except Exception as e:  # noqa: BLE001
                    cells.append("failed")
                    print(f"  {f.__name__}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
