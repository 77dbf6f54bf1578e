"""The fused merge of the split-key decode path (``triton_decode.MERGE = "fused"``: the last split of
each group merges) against the merge kernel (a second launch), on the GPU alone: CUDA-graph µs per
call for a few decode shapes, the fused merge at several chunk sizes (``MERGE_TILE``: splits x rows x
head dim loaded at once), and the registers / spills of the partial kernel each way (a fused merge
that costs the partial kernel registers costs it occupancy). The chunk is also capped at the
plan's most splits (rounded up to a power of 2). Issue 13.

    python benchmarks/decode_merge_ab.py      # on a GPU
"""
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.realpath(__file__))
_sys.path.insert(0, _os.path.dirname(_here))   # the repository root: benchmarks.host_timing

import torch  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks.decode_host import all_rows  # noqa: E402
from benchmarks.host_timing import decode_inputs  # noqa: E402
from headscope.kernels import launch  # noqa: E402
from headscope.kernels import triton_decode as td  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402

VARIANTS = [("kernel", 16384), ("fused", 8192), ("fused", 16384)]


def main():
    print("| B | K | request | " + " | ".join(f"{m} tile {t} µs [regs/spills]" for m, t in VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for B, K in ((1, 8192), (1, 32768), (1, 131072), (8, 8192), (8, 131072)):
        q, k, v, _, _ = decode_inputs(B, 32, 8, 128, K)
        for rname, req in (("argmax", StatRequest(argmax=True)), ("all rows", all_rows(K))):
            cells = []
            for rnd in range(2):
                for i, (mode, tile) in enumerate(VARIANTS):
                    td.MERGE, td.MERGE_TILE = mode, tile
                    td.clear_plans()

                    def fn():
                        return td.attention(q, k, v, scaling=128 ** -0.5, stats=req)
                    with torch.no_grad():
                        fn()
                        us = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
                    plans = launch.fast(td.decode_partial_kernel).plans    # this variant's kernel alone
                    regs = "".join(f"{c.n_regs}/{c.n_spills}" for c, *_ in plans.values())
                    if rnd == 0:
                        cells.append([us, regs])
                    else:
                        cells[i][0] = min(cells[i][0], us)
                    launch.fast(td.decode_partial_kernel).plans.clear()
            print(f"| {B} | {K // 1024}k | {rname} | " + " | ".join(f"{u:.1f} [{r}]" for u, r in cells) + " |",
                  flush=True)
        del q, k, v


if __name__ == "__main__":
    main()
