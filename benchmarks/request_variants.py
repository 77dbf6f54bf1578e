"""How many distinct attention requests `headscope report` makes, by analyzer, and what a first GPU
run compiles for them. Runs the quick report's analyzers on the CPU with the chunked path wrapped to
record each call's request.

With ``--triton`` each recorded call also goes through the Triton path's host code with the launches
recorded, not run (as ``tests/hopper_compile.py`` does), and each launch gets the key Triton 3.x's
own launcher computes for sm_90 (its binder: constexprs, options, and each runtime argument's type
and specialisation: ints equal to 1 or divisible by 16, 16-byte aligned pointers, minus the
``do_not_specialize`` arguments). The distinct keys are the kernels a fresh GPU compiles. With
``--compile`` each is compiled for sm_90 with Triton's ptxas into an empty cache and timed. The
process must run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).

    python benchmarks/request_variants.py --model gemma3-270m [--only retrieval,ships] [--triton [--compile]]
"""
import argparse
import dataclasses
import os
import tempfile
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

import headscope as hs
from headscope.kernels import chunked
from headscope.probe.attention import has_sliding_layers


def _set(x) -> bool:
    """Whether a request field asks for something (None, False, 0 and empty containers do not)."""
    if x is None:
        return False
    if isinstance(x, torch.Tensor):
        return x.numel() > 0
    if isinstance(x, (list, tuple, dict, set)):
        return len(x) > 0
    return bool(x)


def request_key(q, k, stats, edits, sliding_window, key_padding, softcap, causal) -> tuple:
    """What selects a kernel variant: prefill/decode, window, padding, softcap, causal, head dim, and
    which statistics and edits are asked for (their kinds, not their values)."""
    st = () if stats is None else tuple(f.name for f in dataclasses.fields(stats) if _set(getattr(stats, f.name)))
    ed = () if edits is None else tuple(f.name for f in dataclasses.fields(edits) if _set(getattr(edits, f.name)))
    return ("decode" if q.shape[2] <= 16 and k.shape[2] > q.shape[2] else "prefill", sliding_window is not None,
            key_padding is not None, softcap is not None, bool(causal), q.shape[-1], st, ed)


class TritonKeys:
    """The Triton compile keys of the calls ``record`` is given (module docstring, ``--triton``)."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        from headscope.kernels import triton_attention as ta
        from headscope.kernels import triton_decode as td
        self.ta, self.td = ta, td
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.binders: dict = {}
        self.keys: dict = {}           # key -> (kernel, options, signature, constexprs, attrs)
        self.calls = 0
        self.declined: dict[str, int] = defaultdict(int)
        self.launches: list = []
        keys = self

        class Recorder:                # stands in for launch.fast(kernel) and its bind()
            def __init__(self, kernel, constants=None):
                self.kernel, self.constants = kernel, constants or {}

            def bind(self, **constants):
                return Recorder(self.kernel, constants)

            def __getitem__(self, grid):
                return lambda *args, **kwargs: keys.launches.append((self.kernel, args, {**self.constants, **kwargs}))

            def run_keyed(self, caller_key, grid, args):      # launch.Bound.run_keyed
                return self[grid](*args)

            keyed: dict = {}                   # launch.Bound.keyed: nothing kept, no fast path

        ta.fast = td.fast = Recorder
        ta._check = lambda *args, **kwargs: None      # it refuses CPU tensors outside the interpreter

    def record(self, q, k, v, kw, window_switch: bool) -> None:
        """The launches the Triton path makes for this call (nothing when it declines it);
        ``window_switch`` as the probe sets it (``has_sliding_layers``)."""
        ta = self.ta
        kw = {n: x for n, x in kw.items() if n != "native"}
        reason = ta.supports(kw.get("stats"), kw.get("edits"), sinks=kw.get("sinks") is not None)
        if reason is not None:
            self.declined[reason] += 1
            return
        self.launches.clear()
        try:
            ta.attention(q, k, v, window_switch=window_switch, **kw)
        except ta.Unsupported as e:
            self.declined[str(e)] += 1
            return
        except Exception:     # host code past the launches reading their (unwritten) outputs
            pass
        self.calls += 1
        for kernel, args, kwargs in self.launches:
            self._key(kernel, args, kwargs)

    def _key(self, kernel, args, kwargs) -> None:
        from triton.runtime.jit import compute_cache_key, create_function_from_signature
        binder = self.binders.get(kernel)
        if binder is None:
            binder = self.binders[kernel] = create_function_from_signature(kernel.signature, kernel.params,
                                                                            self.backend)
        kwargs = dict(kwargs, debug=False)
        bound, spec, options = binder(*args, **kwargs)
        key = (kernel.__name__, compute_cache_key({}, spec, options))
        if key not in self.keys:
            self.keys[key] = (kernel, *kernel._pack_args(self.backend, kwargs, bound, spec, options))

    def by_kernel(self) -> dict[str, int]:
        n: dict[str, int] = defaultdict(int)
        for name, _ in self.keys:
            n[name] += 1
        return dict(n)

    def compile_all(self) -> float:
        """Compile every key for sm_90 into an empty cache; seconds in all (printed per kernel)."""
        import triton
        total = 0.0
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            for i, ((name, _), (kernel, options, sig, constexprs, attrs)) in enumerate(self.keys.items()):
                t0 = time.perf_counter()
                triton.compile(triton.compiler.ASTSource(kernel, sig, constexprs, attrs), target=self.target,
                               options=options.__dict__)
                dt = time.perf_counter() - t0
                total += dt
                print(f"  compiled {i + 1}/{len(self.keys)} {name}: {dt:.1f} s", flush=True)
        return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--only", default="", help="comma-separated analyzers (default: the quick report's)")
    ap.add_argument("--triton", action="store_true", help="count the Triton kernels a fresh GPU compiles")
    ap.add_argument("--compile", action="store_true", help="with --triton: compile each for sm_90, timed")
    a = ap.parse_args()
    if a.triton and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("--triton: run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    triton_keys = TritonKeys() if a.triton else None
    from headscope.app.report import default_names, make_analyzer
    names = [n for n in a.only.split(",") if n] if a.only else default_names("quick")
    model = hs.load(a.model)
    switch = has_sliding_layers(SimpleNamespace(config=model.model.config.get_text_config()))
    seen: dict[str, set] = defaultdict(set)
    calls: dict[str, int] = defaultdict(int)
    new_keys: dict[str, int] = defaultdict(int)
    current = [""]
    real = chunked.attention

    def wrapped(q, k, v, **kw):
        seen[current[0]].add(request_key(q, k, kw.get("stats"), kw.get("edits"), kw.get("sliding_window"),
                                         kw.get("key_padding"), kw.get("softcap"), kw.get("causal", True)))
        calls[current[0]] += 1
        if triton_keys is not None:
            n0 = len(triton_keys.keys)
            triton_keys.record(q, k, v, kw, switch)
            new_keys[current[0]] += len(triton_keys.keys) - n0
        return real(q, k, v, **kw)

    chunked.attention = wrapped
    try:
        for n in names:
            current[0] = n
            t0 = time.time()
            make_analyzer(n, "quick").score(model, progress=False)
            more = f", {new_keys[n]} new Triton kernels" if triton_keys is not None else ""
            print(f"{n}: {calls[n]} attention calls, {len(seen[n])} distinct requests{more} ({time.time() - t0:.0f} s)")
    finally:
        chunked.attention = real
    union = set().union(*seen.values())
    print(f"all analyzers: {sum(calls.values())} calls, {len(union)} distinct requests")
    for key in sorted(union, key=str):
        print("  ", key)
    if triton_keys is not None:
        print(f"Triton (sm_90): {triton_keys.calls} calls taken, {len(triton_keys.keys)} distinct compiled kernels "
              f"{triton_keys.by_kernel()}")
        for reason, n in triton_keys.declined.items():
            print(f"   declined {n}x: {reason}")
        if a.compile:
            print(f"compile for sm_90, one process, empty cache: {triton_keys.compile_all():.0f} s in all")


if __name__ == "__main__":
    main()
