"""The Python host work of one eager decode call, on the CPU (no GPU needed): ``triton_attention.
attention`` -> ``triton_decode.attention`` (the split-key path, from ``DECODE_MIN_K`` keys) or the
query-block forward (fewer keys), with the kernel launches replaced by no-ops, so what is
timed is our own code (argument checks, the plan, the buffers, the statistics dict), not Triton's
launch nor the GPU. A proxy for the part of an eager decode step that a GPU run cannot take apart
cheaply; the launches are timed on the GPU by ``launch_overhead.py``. Issue 13.

``--repo`` imports headscope from another checkout, e.g. a ``git worktree`` of an older commit, for
an A/B on the same machine (run each side in its own process, several times, and compare medians).

    python benchmarks/decode_host_cpu.py [--repo PATH] [--calls 3000]
"""
import argparse
import os
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                    help="the checkout to import headscope from (default: this one)")
    ap.add_argument("--calls", type=int, default=3000)
    a = ap.parse_args()
    os.environ["TRITON_INTERPRET"] = "1"            # Triton accepts CPU tensors; nothing is interpreted here
    link_dir = tempfile.mkdtemp(prefix="hs_repo_")
    os.symlink(os.path.realpath(a.repo), os.path.join(link_dir, "headscope"))
    sys.path.insert(0, link_dir)
    import torch

    from headscope.kernels import triton_attention as ta
    assert ta.__file__.startswith(link_dir), f"headscope was imported from {ta.__file__}, not from --repo"
    from headscope.kernels import triton_decode as td
    from headscope.kernels.spec import StatRequest

    class NoLaunch:                                   # stands in for fast(kernel) and its bound form
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

        def bind(self, **constants):
            return self

        def run_keyed(self, caller_key, grid, args):
            return None

        keyed: dict = {}                   # launch.Bound.keyed: nothing kept, no fast path

    td.fast = ta.fast = lambda kernel: NoLaunch()
    td.INTERPRET_BLOCK_N = 64                         # the GPU's BLOCK_N at d128
    sms = 132                                         # split as on an H200 (132 SMs, 2 programs per SM)
    if hasattr(td, "_Plan"):
        make = td._Plan.__init__

        def gpu_like(self, *args, **kwargs):
            make(self, *args, **kwargs)
            self.sms = sms
            if hasattr(self, "want"):                 # the splits target (since the fused merge)
                self.want = max(1, (td.DECODE_PROGRAMS_PER_SM * sms) // self.rows_per_bh)
        td._Plan.__init__ = gpu_like
    else:                                             # before the plans (commit 7547907 and earlier)
        def n_splits_for(B, G, K_vis, block_n, device):
            want = max(1, (2 * sms) // max(1, B * G))
            split = -(-max(2 * block_n, -(-K_vis // want)) // block_n) * block_n
            return max(1, -(-K_vis // split)), split
        td.n_splits_for = n_splits_for

    def best_us(fn, n):
        for _ in range(200):
            fn()
        got = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            got.append((time.perf_counter() - t0) / n * 1e6)
        return sorted(got)[len(got) // 2]

    print(f"repo: {os.path.realpath(a.repo)}; one query a row; µs per call (median of 7 x {a.calls})")
    print("| shape | path | request | K | host µs, launches stubbed |")
    print("|---|---|---|---|---|")
    rows = StatRequest(sink_k=4, entropy=True, distance=True, recent=64, argmax=True)
    llama, smol = ("Llama-3-8B B=1", 1, 32, 8, 128), ("SmolLM2 B=3", 3, 9, 3, 64)
    for (shape, B, H, G, d), path, name, K, req in (
            (llama, "split keys", "plain", 8192, None), (llama, "split keys", "argmax", 8192, StatRequest(argmax=True)),
            (llama, "split keys", "all rows", 32768, rows),
            (llama, "split keys", "all rows + 2 spans", 32768, StatRequest(
                sink_k=4, spans=((4, 68), (100, 356)), entropy=True, distance=True, window_distance=128, recent=64,
                argmax=True)),
            (smol, "", "plain", 2048, None), (smol, "", "argmax", 2048, StatRequest(argmax=True)),
            (smol, "", "all rows", 2048, rows), (smol, "", "argmax", 512, StatRequest(argmax=True))):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, 1, d, dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, G, K, d, dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, G, K, d, dtype=torch.bfloat16, generator=g)
        if not path:                                  # the path the library takes (DECODE_MIN_K)
            path = "split keys" if td.eligible(q, k, stats=req) is None else "query-block forward"
        with torch.no_grad():
            us = best_us(lambda: ta.attention(q, k, v, scaling=d ** -0.5, causal=True, stats=req), a.calls)
        print(f"| {shape} | {path} | {name} | {K} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
