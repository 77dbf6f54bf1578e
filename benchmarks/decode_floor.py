"""How fast could an eager decode call be from Python? The split-key decode path's whole call
(``triton_attention.attention``) against a *floor* made of only what any Python caller of these
kernels must do per call, everything else (argument checks, the plan, the specialisation key, the
scratch lookups) taken as done:

- ``floor``: the result buffers the whole call makes (``torch.empty``: output, statistics, argmax), the addresses
  of q, k, v and of those buffers put into a kept argument list, one launch of the kept compiled
  kernel by Triton's launcher (``compiled.run``, as ``kernels/launch.py``'s direct call), and the
  statistics dict (``triton_decode.row_results``);
- ``floor, buffers kept``: the same without the ``torch.empty`` calls (a caller that reuses its
  outputs, which the probe cannot: the results escape to the user);
- ``launch alone``: the launcher call only;
- ``minimal caller``: the floor plus what any caller must still do per call when the key count
  changes from call to call (a generation loop's cache grows by one key a step): read the shapes,
  strides, dtypes and device, look up a plan kept for them, count the splits, check the stream and
  a capture, take the specialisation facts of the scalars that change with K and look up the
  kernel kept for them, check the tensors' alignment, fill those scalars in. No argument checks, no
  general launch path: a lower bound for a dedicated fast path in ``triton_decode``.

Default SDPA's whole call for scale; wall µs per call over back-to-back calls, the functions taking
turns (9 rounds, medians). If even the floor is over 1.3x SDPA, issue 13's eager target for that
cell is out of reach of a Python launch (it stays met under CUDA graphs). Issue 13.

    python benchmarks/decode_floor.py [--calls 2000]          # on a GPU
"""
import argparse
import os as _os
import sys as _sys
_here = _os.path.dirname(_os.path.realpath(__file__))
_sys.path.insert(0, _os.path.dirname(_here))   # the repository root: benchmarks.host_timing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.host_timing import decode_inputs, with_merge  # noqa: E402
from benchmarks.launch_overhead import interleaved_us  # noqa: E402
from headscope.kernels import launch  # noqa: E402
from headscope.kernels import triton_attention as ta  # noqa: E402
from headscope.kernels import triton_decode as td  # noqa: E402
from headscope.kernels.spec import StatRequest  # noqa: E402

ALL_ROWS = StatRequest(sink_k=4, entropy=True, distance=True, recent=64, argmax=True)
CASES = (("Llama-3-8B 8k plain", 8192, None), ("Llama-3-8B 8k argmax", 8192, StatRequest(argmax=True)),
         ("Llama-3-8B 8k all rows", 8192, ALL_ROWS),
         ("Llama-3-8B 32k argmax", 32768, StatRequest(argmax=True)), ("Llama-3-8B 32k all rows", 32768, ALL_ROWS))


def captured_launch(call):
    """(bound launch, grid, runtime args) of the fused decode kernel's launch in ``call()``, taken on
    the full path (``triton_decode.fast_attention`` declines while it runs)."""
    got = []
    original, fast = launch.Bound.run_keyed, td.fast_attention

    def spy(self, caller_key, grid, args):
        got.append((self, grid, args))
        return original(self, caller_key, grid, args)
    launch.Bound.run_keyed = spy
    td.fast_attention = lambda *args: None           # the full path, whose launch passes the tensors
    try:
        call()
    finally:
        launch.Bound.run_keyed, td.fast_attention = original, fast
    if len(got) != 1:
        raise RuntimeError(f"expected one launch (the fused merge), saw {len(got)}")
    return got[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    dev = torch.device("cuda")
    print("| case | SDPA | whole call | floor | floor, buffers kept | launch alone | minimal caller | floor / SDPA "
          "| minimal / SDPA | whole / SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, K, req in CASES:
        B, H, G, d = 1, 32, 8, 128
        q, k, v, _, _ = decode_inputs(B, H, G, d, K)

        def whole():
            return ta.attention(q, k, v, scaling=d ** -0.5, causal=True, stats=req)
        whole = with_merge(whole, "fused")
        with torch.no_grad():
            for _ in range(3):                             # compiled, checked, direct handles taken
                whole()
            bound, grid, args = captured_launch(whole)
        names = bound.runtime_names
        i = {n: names.index(n) for n in ("Q", "K", "V", "Out", "Res", "Arg")}
        vals = tuple(args) + bound.tail
        compiled = bound.fl.kernel.warmup(*args, grid=grid, **bound.constants)
        run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
        base = launch.addresses(vals)
        res_t, arg_t = args[i["Res"]], args[i["Arg"]]
        res_shape, arg_shape = tuple(res_t.shape), tuple(arg_t.shape)
        g0, g1 = grid[0], grid[1]
        stream = torch._C._cuda_getCurrentRawStream(dev.index or 0)
        kept = (torch.empty_like(args[i["Out"]]), torch.empty(res_shape, device=dev), torch.empty(arg_shape, dtype=torch.int64, device=dev))

        def fill_and_launch(out, res, arg):
            x = list(base)
            x[i["Q"]], x[i["K"]], x[i["V"]], x[i["Out"]] = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
            if res is not None:
                x[i["Res"]] = res.data_ptr()
            if arg is not None:
                x[i["Arg"]] = arg.data_ptr()
            run(g0, g1, 1, stream, function, packed, None, None, None, *x)
            return out, ({} if req is None else td.row_results(req, res[0], res, arg, first=1))

        def floor():                                   # the buffers the whole call makes for this request
            out = torch.empty(B, H, 1, d, dtype=q.dtype, device=dev)
            res = torch.empty(res_shape, dtype=torch.float32, device=dev) if req is not None else None
            arg = torch.empty(arg_shape, dtype=torch.int64, device=dev) if req is not None and req.argmax else None
            return fill_and_launch(out, res, arg)

        def floor_kept():
            return fill_and_launch(kept[0], kept[1] if req is not None else None,
                                   kept[2] if req is not None and req.argmax else None)

        def launch_alone():
            run(g0, g1, 1, stream, function, packed, None, None, None, *base)

        # the minimal caller's kept state: a plan per (dtypes, device, shapes but K), a kernel per facts
        plan_key = (q.dtype, k.dtype, v.dtype, q.device, B, H, 1, d, G)
        BN, rq = td.DECODE_CONFIGS[128][0], H // G                  # bf16 d128's key block, as the plan's
        want = max(1, td.DECODE_PROGRAMS_PER_SM * torch.cuda.get_device_properties(dev).multi_processor_count
                   // (B * G))                                       # split target, as the plan's
        dev_index = dev.index or 0
        plans = {plan_key: (BN, want, rq, B * G)}
        varying = (4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 18, 19, 20)    # strides, K, split_len, S, n_pad
        kernels = {launch.specialization_facts(tuple(args[j] for j in varying)): (run, function, packed)}

        def minimal():
            Bq, Hq, Qq, Dq = q.shape
            Kk = k.shape[2]
            bn, wnt, r, bg = plans[(q.dtype, k.dtype, v.dtype, q.device, Bq, Hq, Qq, Dq, k.shape[1])]
            sq, sk, sv = q.stride(), k.stride(), v.stride()
            split_len = max(2 * bn, -(-Kk // wnt))
            split_len = -(-split_len // bn) * bn
            S = -(-Kk // split_len)
            n_pad = -(-(bg * S * r * Qq) // 16) * 16
            if torch._C._cuda_isCurrentStreamCapturing():
                raise RuntimeError("not for a capture")
            st = torch._C._cuda_getCurrentRawStream(dev_index)
            vals = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], Kk, split_len, S, n_pad)
            lrun, lfun, lpacked = kernels[launch.specialization_facts(vals)]
            out = torch.empty(Bq, Hq, Qq, Dq, dtype=q.dtype, device=dev)
            res = torch.empty(res_shape, dtype=torch.float32, device=dev) if req is not None else None
            arg = torch.empty(arg_shape, dtype=torch.int64, device=dev) if req is not None and req.argmax else None
            x = list(base)
            x[i["Q"]], x[i["K"]], x[i["V"]], x[i["Out"]] = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
            if (x[i["Q"]] | x[i["K"]] | x[i["V"]]) & 15:
                raise RuntimeError("misaligned")
            for j, val in zip(varying, vals):
                x[j] = val
            if res is not None:
                x[i["Res"]] = res.data_ptr()
            if arg is not None:
                x[i["Arg"]] = arg.data_ptr()
            lrun(g0, g1, 1, st, lfun, lpacked, None, None, None, *x)
            return out, ({} if req is None else td.row_results(req, res[0], res, arg, first=1))

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        with torch.no_grad():
            o_ref, s_ref = whole()
            o_f, s_f = floor()
            o_m, s_m = minimal()
            torch.cuda.synchronize()
            for o_x, s_x, who in ((o_f, s_f, "floor's"), (o_m, s_m, "minimal caller's")):
                assert torch.equal(o_ref, o_x) and all(torch.equal(s_ref[n], s_x[n]) for n in s_ref), \
                    f"the {who} launch does not reproduce the whole call"
            us = interleaved_us((sdpa, whole, floor, floor_kept, launch_alone, minimal), a.calls // 4)
        print(f"| {name} | " + " | ".join(f"{u:.1f}" for u in us)
              + f" | {us[2] / us[0]:.2f} | {us[5] / us[0]:.2f} | {us[1] / us[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
