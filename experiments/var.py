"""VAR (Kang et al. 2025) on the needle-in-a-haystack test: redistribution towards the whole prompt
during decoding, against no edit (Retrieval's quick grid).

    python experiments/var.py --model smollm2 [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import headscope as hs
from headscope.heads.common import decode, output_text, stop_ids
from headscope.heads.retrieval import Retrieval, rouge1_recall
from headscope.heads.scores import write_json
from headscope.interventions.var import massive_dims, sink_tokens, var_edits


def main(argv=None):
    """NIAH with VAR towards the whole prompt (the haystack) during decoding, vs no edit."""
    p = argparse.ArgumentParser(description="VAR on the needle-in-a-haystack test (Retrieval's quick grid).")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    m = hs.load(a.model)
    an = Retrieval()
    tests = an.tests(m, None)
    dims = massive_dims(m, tests[0].prompt)
    stop = stop_ids(m)
    rows = []
    for t in tests:
        n = t.prompt.numel()
        edits = var_edits(m, sink_tokens(m, t.prompt, dims), [(1, n)])
        rec = {}
        for name, ed in (("none", ()), ("var", edits)):
            new, _ = decode(m, t.prompt, an.max_new_tokens, stop_ids=stop, edits=ed)
            rec[name] = rouge1_recall(t.answer, output_text(m, new, t.answer))
        rows.append({"length": t.length, "depth": t.depth, "layers_edited": len(edits), **rec})
        print(rows[-1], flush=True)
    res = {"massive_dims": dims, "tests": rows,
           "recall_none": sum(r["none"] for r in rows) / len(rows),
           "recall_var": sum(r["var"] for r in rows) / len(rows)}
    print(json.dumps({k: v for k, v in res.items() if k != "tests"}))
    if a.out:
        write_json(Path(a.out) / "var_niah.json", res)
    return res


if __name__ == "__main__":
    main()
