"""IOI (and greater-than) on SmolLM2 with and without the BOS: clean / corrupted metric, accuracy, and
per-prompt agreement, for the shipped prompts (n = 40, seed 0) and for a 16-prompt set on the audit's
template ("As {A} and {B} were walking to the {PLACE}, {B} handed a {OBJECT} to", ABC corruption).
Run: OMP_NUM_THREADS=2 .venv/bin/python notes/circ-runs/smollm2_ioi_n40_bos/bos_check.py > bos_check.json
(one summary line per task set on stderr)."""
import json
import sys
import time

import torch

import headscope as hs
from headscope import circuits as C
from headscope.circuits.tasks import _last_logits

AUDIT_TEMPLATE = "As {A} and {B} were walking to the {PLACE}, {B} handed a {OBJECT} to"


def row(model, task):
    r = task.evaluate(model)
    with torch.no_grad():
        per = task.per_example(_last_logits(model, task.clean))
    return {k: r[k] for k in ("prepend_bos", "n", "clean_metric", "corrupt_metric", "clean_accuracy", "p_value",
                              "solved")} | {"tokens": task.clean.shape[1], "right": int((per > 0).sum()),
                                            "per_example": [round(float(x), 3) for x in per]}


torch.manual_seed(0)
model = hs.load("smollm2")
out = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": model.cfg.name}
for label, make in [("ioi_n40_seed0", lambda b: C.ioi(model, n=40, seed=0, prepend_bos=b)),
                    ("greater_than_n40_seed0", lambda b: C.greater_than(model, n=40, seed=0, prepend_bos=b)),
                    ("ioi_audit_template_n16", lambda b: C.ioi(model, n=16, seed=0, templates=[AUDIT_TEMPLATE],
                                                               prepend_bos=b))]:
    a, b = make(True), make(False)
    assert a.texts == b.texts and torch.equal(a.clean[:, 1:], b.clean)
    ra, rb = row(model, a), row(model, b)
    both = sum(x > 0 and y > 0 for x, y in zip(ra["per_example"], rb["per_example"]))
    out[label] = {"bos": ra, "no_bos": rb, "right_in_both": both, "example": a.texts[0]}
    print(label, {k: (ra[k], rb[k]) for k in ("clean_metric", "corrupt_metric", "clean_accuracy", "right", "tokens")},
          file=sys.stderr, flush=True)
print(json.dumps(out, indent=1))
