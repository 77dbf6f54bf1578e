# %% [markdown]
# # 4. An intervention with its control: LoFiT on SmolLM2
#
# LoFiT (Yin et al. 2024) fine-tunes a model by editing a few heads: step 1 learns a per-head scale A
# (z ← (1 + A) ⊙ z) on every head with an L1 penalty and ranks the heads by ‖A‖; step 2 learns
# per-head offsets v (z ← z + v) on the top-K heads only. The base model stays frozen.
#
# Does the choice of heads matter? We compare, on held-out data: the base model, LoFiT's top-K heads,
# random sets of K heads trained the same way, with bootstrap 95% confidence intervals.
# Task: the shipped sentiment task (VADER lexicon words → " positive"/" negative"). Small settings so
# it runs on a CPU in a few minutes; `REPORTS.md` has the full run.

# %%
import torch
import headscope as hs
from headscope.interventions import controls, lofit, tasks

torch.manual_seed(0)
model = hs.load("smollm2")
task = tasks.load_task("sentiment", model)
split = task.splits(seed=0, n_train=48, n_calibration=0, n_test=96)
train, test = split["train"], split["test"]
cfg = lofit.LoFiTConfig(k=8, epochs=1)
print(len(train), "training and", len(test), "held-out examples; K =", cfg.k, "heads")

# %%
cmp = lofit.compare(model, train, test, cfg, n_random=3, progress=False, dataset="sentiment")
summary = controls.table(cmp.rows)
print(controls.format_table(summary))
print("LoFiT heads:", cmp.result.heads)

# %%
base = next(r for r in summary if r["condition"] == "base")
top = next(r for r in summary if r["condition"].startswith("LoFiT"))
rand = next(r for r in summary if r["condition"].startswith("random"))
print(f"base {base['accuracy']:.3f}, LoFiT top-{cfg.k} {top['accuracy']:.3f}, random-{cfg.k} {rand['accuracy']:.3f}")
assert cmp.result.n_params == cfg.k * model.cfg.d_head          # only the offsets of K heads
assert top["accuracy"] >= base["accuracy"]

# %% [markdown]
# ## The learned edit is a plain list of probe edits
#
# It re-applies with `model.edit(...)`, saves and loads (`save_edits` / `load_edits`), and folds into
# the model's `o_proj` bias so that a plain HF model reproduces it without headscope.

# %%
import tempfile
from headscope.interventions import load_edits, save_edits
edits = cmp.result.edits()
with tempfile.TemporaryDirectory() as d:
    save_edits(d + "/lofit", edits)
    again = load_edits(d + "/lofit")
toks = model.to_tokens('Is the word "happy" positive or negative?\nAnswer:')
with torch.no_grad():
    with model.edit(edits):
        a = model(toks)
    with model.edit(again):
        b = model(toks)
print("max |Δlogit| after save/load:", float((a - b).abs().max()))
assert torch.allclose(a, b, atol=1e-5)

# %%
import plotly.graph_objects as go
fig = go.Figure(go.Bar(x=[r["condition"] for r in summary], y=[r["accuracy"] for r in summary],
                       error_y=dict(type="data", symmetric=False,
                                    array=[r["ci95"][1] - r["accuracy"] for r in summary],
                                    arrayminus=[r["accuracy"] - r["ci95"][0] for r in summary])))
fig.update_layout(title="Held-out accuracy with 95% bootstrap CIs", yaxis_title="accuracy")
fig
