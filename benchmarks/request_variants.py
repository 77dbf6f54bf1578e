"""How many distinct attention requests `headscope report` makes, by analyzer: a CPU proxy for the
Triton specialisations a first GPU run compiles (each distinct combination of statistics, edits,
window, padding and prefill/decode is at least one compiled kernel there; block sizes per head dim
and the column pass add more). Runs the quick report's analyzers on the CPU with the chunked path
wrapped to record each call's request.

    python benchmarks/request_variants.py --model gemma3-270m [--only retrieval,ships]
"""
import argparse
import dataclasses
import time
from collections import defaultdict

import torch

import headscope as hs
from headscope.kernels import chunked


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--only", default="", help="comma-separated analyzers (default: the quick report's)")
    a = ap.parse_args()
    from headscope.app.report import default_names, make_analyzer
    names = [n for n in a.only.split(",") if n] if a.only else default_names("quick")
    model = hs.load(a.model)
    seen: dict[str, set] = defaultdict(set)
    calls: dict[str, int] = defaultdict(int)
    current = [""]
    real = chunked.attention

    def wrapped(q, k, v, **kw):
        seen[current[0]].add(request_key(q, k, kw.get("stats"), kw.get("edits"), kw.get("sliding_window"),
                                         kw.get("key_padding"), kw.get("softcap"), kw.get("causal", True)))
        calls[current[0]] += 1
        return real(q, k, v, **kw)

    chunked.attention = wrapped
    try:
        for n in names:
            current[0] = n
            t0 = time.time()
            make_analyzer(n, "quick").score(model, progress=False)
            print(f"{n}: {calls[n]} attention calls, {len(seen[n])} distinct requests ({time.time() - t0:.0f} s)")
    finally:
        chunked.attention = real
    union = set().union(*seen.values())
    print(f"all analyzers: {sum(calls.values())} calls, {len(union)} distinct requests")
    for key in sorted(union, key=str):
        print("  ", key)


if __name__ == "__main__":
    main()
