# %% [markdown]
# # 3. An IOI circuit in SmolLM2-135M-Instruct
#
# Indirect object identification (Wang et al. 2022): "When Mary and John went to the store, John gave
# a drink to" → " Mary". The metric is the logit difference logit(IO) − logit(S) at the last
# position; corrupted prompts replace the names (ABC). We find the heads that carry the task with
# three methods and compare them:
#
# 1. **activation patching** — each head's output replaced by its mean over the corrupted prompts;
#    score = relative drop of the logit difference;
# 2. **EAP-IG** (Hanna et al. 2024) — gradient attribution integrated over 5 steps between corrupted
#    and clean activations, at node and edge level; compared with resample patching, the
#    intervention it approximates;
# 3. **discrete-SAE circuits** (O'Neill & Bui 2024) — SAEs on each head's mean output, argmax codes
#    seen on clean but not on corrupted prompts.
#
# Then the circuit graph, the faithfulness curve, and the overlap with another task's circuit
# (Colored Objects, Merullo et al. 2023: circuit reuse). CPU, a few minutes.

# %%
import time
import torch
import headscope as hs
from headscope import circuits

torch.manual_seed(0)
model = hs.load("smollm2")
task = circuits.ioi(model, n=24, seed=0)
report = task.evaluate(model)
print(report)
assert report["solved"], "SmolLM2 does IOI"
print(task.texts[0], "->", model.to_string(task.answer[0]))

# %% [markdown]
# ## 1. Activation patching (mean ablation per head)

# %%
t0 = time.time()
patching = circuits.patch_heads(model, task, how="mean", progress=False)
print(f"{time.time() - t0:.0f} s; top heads:", ", ".join(f"L{l}H{h} {s:.2f}" for l, h, s in patching.top(8)))
assert patching.top(1)[0][2] > 0.1          # some head carries a tenth of the logit difference or more
patching.plot()

# %% [markdown]
# ## 2. EAP-IG at node and edge level

# %%
t0 = time.time()
eap_ig = circuits.eap_ig(model, task, steps=5)
print(f"{time.time() - t0:.0f} s; top edges:", eap_ig.top_edges(5))
# EAP-IG estimates the effect of patching each node with its *corrupted* value, so it is compared
# with resample patching (each head's output taken from the paired corrupted prompt)
resample = circuits.patch_heads(model, task, how="resample", progress=False)
rho = circuits.spearman(eap_ig, resample)
auc_eap = circuits.roc_auc(eap_ig, circuits.from_head_scores(resample, task), n_truth=10)
print(f"Spearman(EAP-IG, resample patching) over heads: {rho:.2f}; ROC AUC for its top-10 heads: {auc_eap['auc']:.2f}")
assert -1.0 <= rho <= 1.0 and 0.0 <= auc_eap["auc"] <= 1.0
eap_ig.plot(n_edges=40)

# %% [markdown]
# ## 3. Discrete-SAE circuits, scored against the patching circuit

# %%
t0 = time.time()
sae = circuits.sae_circuit(model, task, n_examples=10)
truth = circuits.from_head_scores(patching, task)
auc = circuits.roc_auc(sae, truth, n_truth=10)
print(f"{time.time() - t0:.0f} s; SAE vs the top-10 patching heads: {auc}")
assert 0.0 <= auc["auc"] <= 1.0

# %% [markdown]
# ## Faithfulness: how many heads keep 80% of the logit difference?
#
# Keep the top-n heads by patching score, mean-ablate every other head.

# %%
curve = truth.faithfulness_curve(model, task)
print(list(zip(curve["n"], [round(k, 2) for k in curve["kept"]])))
n80 = truth.smallest_circuit(0.8)
print("smallest circuit keeping >= 80%:", n80, "of", model.cfg.n_layers * model.cfg.n_heads, "heads")
assert curve["kept"][-1] > 0.99      # keeping every head is the clean model
assert n80 is not None and n80 <= 0.1 * model.cfg.n_layers * model.cfg.n_heads   # at most 10% of the heads
truth.plot_faithfulness()

# %% [markdown]
# ## Circuit reuse: IOI vs Colored Objects

# %%
colored = circuits.colored_objects(model, n=24, seed=0)
print(colored.evaluate(model))
if colored.report["solved"]:
    colored_patching = circuits.patch_heads(model, colored, how="mean", progress=False)
    ov = circuits.overlap(truth, circuits.from_head_scores(colored_patching, colored), n=10)
    print("top-10 heads shared by IOI and Colored Objects:", ov)
else:
    print("SmolLM2 does not solve Colored Objects: no circuit to compare")
