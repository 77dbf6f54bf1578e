"""Ray overhead on a CPU machine: one process versus a local Ray cluster of W CPU workers, on the
workloads of tests/test_distributed.py (activation patching and retrieval heads on the planted
2-layer model) and on activation patching of SmolLM2 on IOI (``--smollm2``).

    python benchmarks/ray_cpu.py --workers 2 [--smollm2 --n 8]

Reports the pool start (workers start, import headscope and load the model), each sweep in one
process and on Ray, and checks that the results are identical.
"""
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.realpath(__file__))
_tests = _os.path.join(_os.path.dirname(_here), "tests")
_sys.path.insert(0, _tests)

import argparse  # noqa: E402
import os  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def load_planted():
    from planted import planted_model
    return planted_model()


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--smollm2", action="store_true", help="also patch SmolLM2's heads on IOI")
    ap.add_argument("--n", type=int, default=8, help="IOI prompts for --smollm2")
    a = ap.parse_args()
    import headscope as hs
    from headscope import circuits as C
    from headscope.app import distributed as D
    from headscope.heads.retrieval import NeedleTest, Retrieval, find_needle_span
    from planted import induction_task, planted_model
    res = {"workers": a.workers, "torch_threads_single": torch.get_num_threads()}
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([_tests] + [p for p in [os.environ.get("PYTHONPATH")] if p])}}
    _, res["ray_init_s"] = timed(lambda: D.connect(None, a.workers, runtime_env=env))

    m = planted_model()
    task = induction_task(m)
    g = torch.Generator().manual_seed(0)
    tests = []
    for n in range(15, 51, 2):
        hay = torch.randint(7, 16, (n,), generator=g).tolist()
        p = n // 2
        prompt = torch.tensor([0] + hay[:p] + [3, 4, 5, 6] + hay[p:] + [3])
        tests.append(NeedleTest(prompt, find_needle_span(prompt, [3, 4, 5, 6]), [3, 4, 5, 6], n, 50.0, 0))
    an = Retrieval(max_new_tokens=6, batch_size=2, rouge_gate=-1.0)
    one_p, res["planted_patch_single_s"] = timed(lambda: C.patch_heads(m, task, how="mean", batch_size=8))
    one_r, res["planted_retrieval_single_s"] = timed(lambda: an.score(m, data=tests, progress=False))
    pool, res["planted_pool_start_s"] = timed(lambda: D.ModelPool(load_planted, num_workers=a.workers))
    many_p, res["planted_patch_ray_s"] = timed(lambda: D.patch_heads(pool, m, task, how="mean", batch_size=8,
                                                                      progress=False))
    many_r, res["planted_retrieval_ray_s"] = timed(lambda: D.retrieval(pool, m, an, data=tests, progress=False))
    res["planted_identical"] = bool(torch.equal(one_p.scores, many_p.scores)
                                    and torch.equal(one_r.extra["test_scores"], many_r.extra["test_scores"]))
    pool.close()
    print(json.dumps(res), flush=True)
    if a.smollm2:
        sm = hs.load("smollm2")
        t = C.ioi(sm, n=a.n)
        one, res["smollm2_patch_single_s"] = timed(lambda: C.patch_heads(sm, t, how="mean"))
        pool, res["smollm2_pool_start_s"] = timed(lambda: D.ModelPool("smollm2", num_workers=a.workers))
        many, res["smollm2_patch_ray_s"] = timed(lambda: D.patch_heads(pool, sm, t, how="mean", progress=False))
        res["smollm2_max_abs_diff"] = float((one.scores - many.scores).abs().max())
        pool.close()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
