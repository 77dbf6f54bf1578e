"""The probe's own host time per layer call in a decode step (CPU, SmolLM2-135M-Instruct): the time
inside ``headscope_attention`` minus the attention call it dispatches (``_instrumented``), while
recording argmax (what the retrieval analyzer records at every step). What is left is the probe's
bookkeeping: argument checks, the layer plan, key positions, the recorder. Issue 13.

``--repo`` imports headscope from another checkout (e.g. a ``git worktree`` of an older commit) for
an A/B on the same machine; run each side in its own process, in turns.

    python benchmarks/probe_host_cpu.py [--repo PATH] [--steps 20] [--reps 5]
"""
import argparse
import os
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    link_dir = tempfile.mkdtemp(prefix="hs_repo_")
    os.symlink(os.path.realpath(a.repo), os.path.join(link_dir, "headscope"))
    sys.path.insert(0, link_dir)
    import torch
    from transformers import AttentionInterface, DynamicCache

    import headscope as hs
    from headscope.probe import attention as pa
    assert hs.__file__.startswith(link_dir), f"headscope was imported from {hs.__file__}, not from --repo"

    model = hs.load("smollm2")
    hf = model.model
    ids = model.tokenizer("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
    torch.set_num_threads(1)
    total = {"outer": 0.0, "inner": 0.0, "calls": 0}
    instrumented, attention = pa._instrumented, pa.headscope_attention

    def timed_instrumented(*args, **kwargs):
        t0 = time.perf_counter()
        r = instrumented(*args, **kwargs)
        total["inner"] += time.perf_counter() - t0
        return r

    def timed_attention(*args, **kwargs):
        t0 = time.perf_counter()
        r = attention(*args, **kwargs)
        total["outer"] += time.perf_counter() - t0
        total["calls"] += 1
        return r

    pa._instrumented = timed_instrumented
    AttentionInterface.register("headscope", timed_attention)
    got = []
    with torch.no_grad(), model.record(hs.Stats(argmax=True)):
        for _ in range(a.reps):
            cache = DynamicCache()
            out = hf(input_ids=ids, past_key_values=cache, use_cache=True)          # prefill, not timed
            nxt = out.logits[:, -1:].argmax(-1)
            total.update(outer=0.0, inner=0.0, calls=0)
            for _ in range(a.steps):
                out = hf(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            got.append((total["outer"] - total["inner"]) / total["calls"] * 1e6)
    print(f"repo: {os.path.realpath(a.repo)}; the probe's own µs per layer call, {a.reps} runs of {a.steps} steps: "
          + " ".join(f"{x:.1f}" for x in got) + f"; median {sorted(got)[len(got) // 2]:.1f}")


if __name__ == "__main__":
    main()
