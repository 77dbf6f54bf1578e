"""Compile every Triton kernel of the fast paths for Hopper (sm_90) on a machine without a GPU.

Run as a script (``tests/test_triton_compile.py`` does, in a process without TRITON_INTERPRET: under
the interpreter ``@triton.jit`` gives interpreted functions, which Triton cannot compile). CPU tensors
go through the host code of ``triton_attention`` / ``triton_decode`` as on the GPU; each launch is
recorded instead of run (``launch.fast`` replaced), and every recorded (kernel, arguments,
constexprs, options) is compiled to a cubin with Triton's own ptxas for ``GPUTarget("cuda", 90, 32)``.
The interpreter runs the kernels' arithmetic on the CPU, but not their lowering to the GPU (pointer
casts, layouts, shared memory): this catches a kernel that the CPU tests pass and the GPU cannot
compile. Prints one line per compiled kernel and exits non-zero on the first failure.

    python tests/hopper_compile.py [REPO_PARENT]   # REPO_PARENT: a folder holding headscope/
"""
import os
import sys

import torch

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
           torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}


def signature_type(x) -> str:
    """Triton's signature string of a runtime argument value."""
    if isinstance(x, torch.Tensor):
        return "*" + _DTYPES[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -(1 << 31) <= x < (1 << 31) else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"no signature type for {type(x).__name__}")


class Recorder:
    """Stands in for ``launch.fast(kernel)`` (and its ``bind``): records each launch."""

    calls: list = []

    def __init__(self, kernel, constants=None):
        self.kernel, self.constants = kernel, constants or {}

    def bind(self, **constants):
        return Recorder(self.kernel, constants)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            Recorder.calls.append((self.kernel, args, {**self.constants, **kwargs}))
        return launch

    def run_keyed(self, caller_key, grid, args):      # launch.Bound.run_keyed
        return self[grid](*args)

    keyed: dict = {}                   # launch.Bound.keyed: nothing kept, no fast path


def record_launches():
    """The launches of a few calls that reach every kernel: decode (plain, every row statistic),
    the query-block forward (row statistics; a redistribution edit with the gate; column sums)."""
    from headscope.kernels import triton_attention as ta
    from headscope.kernels import triton_decode as td
    from headscope.kernels.spec import LayerEdits, Redistribution, StatRequest

    ta.fast = td.fast = Recorder
    ta._check = lambda *args, **kwargs: None          # it refuses CPU tensors outside the interpreter
    td.DECODE_MIN_K = 64
    rows = StatRequest(sink_k=2, spans=((3, 9),), entropy=True, distance=True, window_distance=5, recent=4,
                       argmax=True)
    g = torch.Generator().manual_seed(0)
    for D, dtype in ((128, torch.bfloat16), (64, torch.float16), (256, torch.bfloat16)):
        q = torch.randn(1, 8, 1, D, generator=g).to(dtype)
        k = torch.randn(1, 2, 200, D, generator=g).to(dtype)
        for merge in ("fused", "kernel"):                                   # split-key decode, both merges
            td.MERGE = merge
            td.clear_plans()
            for req in (None, rows):
                td.attention(q, k, k, scaling=D ** -0.5, stats=req)
        qq = torch.randn(1, 8, 200, D, generator=g).to(dtype)
        ta.attention(qq, k, k, scaling=D ** -0.5, stats=rows)               # forward, row statistics
    D = 128
    q = torch.randn(1, 8, 96, D, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 2, 96, D, generator=g).to(torch.bfloat16)
    edit = LayerEdits(redistributions=(Redistribution(heads=(0, 3), factor=0.5, source=((0, 2),),
                                                      target=((5, 9),), max_ratio=0.5),),
                      gate=torch.ones(8), gate_sink=2, gate_recent=8)
    ta.attention(q, k, k, scaling=D ** -0.5, stats=StatRequest(entropy=True, received=True), edits=edit)
    return Recorder.calls


def compile_all(calls) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", 90, 32)
    seen = set()
    for kernel, args, consts in calls:
        params = kernel.params
        runtime = [p for p in params if not p.is_constexpr]
        names = [p.name for p in runtime]
        values = dict(zip(names, args))
        values.update({n: v for n, v in consts.items() if n in names})          # runtime args by keyword
        constexprs = {p.name: consts[p.name] for p in params if p.is_constexpr and p.name in consts}
        options = {n: v for n, v in consts.items() if n not in {p.name for p in params}}   # num_warps, ...
        key = (kernel.__name__, tuple(sorted(constexprs.items())), tuple(sorted(options.items())),
               tuple(signature_type(values[p.name]) for p in runtime))
        if key in seen:
            continue
        seen.add(key)
        sig = {p.name: ("constexpr" if p.is_constexpr else signature_type(values[p.name])) for p in params}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=options)
        print(f"compiled {kernel.__name__} for sm_90: {len(compiled.asm['cubin'])} bytes of cubin, "
              f"{compiled.metadata.shared} bytes of shared memory, {options}", flush=True)
    return len(seen)


def main():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if len(sys.argv) > 1:
        sys.path.insert(0, sys.argv[1])
    n = compile_all(record_launches())
    print(f"{n} kernel specialisations compiled for sm_90")


if __name__ == "__main__":
    main()
