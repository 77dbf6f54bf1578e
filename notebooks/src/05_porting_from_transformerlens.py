# %% [markdown]
# # 5. Porting a TransformerLens notebook
#
# A classic TransformerLens analysis — direct logit attribution (DLA) of an IOI prompt, per layer
# component and per head, plus the attention pattern of the top head — written twice: once with
# TransformerLens 4 (`TransformerBridge`, eager attention) and once with headscope, on the same
# SmolLM2-135M-Instruct weights. The code is nearly line for line the same; the numbers agree to
# float32 rounding.
#
# What differs on purpose (see the docs' TransformerLens table): headscope's `hook_q`/`hook_k` are
# taken after rotary embeddings (TransformerLens' `hook_rot_q`/`hook_rot_k`), and under GQA
# `hook_k`/`hook_v` keep the KV-head count. headscope runs the model's own HF modules through one
# attention function, so nothing is folded or centred: TransformerLens' DLA below is computed in
# its compatibility mode (`fold_ln=True`), which gives the same attributions.

# %%
import copy
import torch
import headscope as hs

torch.set_grad_enabled(False)
prompt = "When Mary and John went to the store, John gave a drink to"
model = hs.load("smollm2")

# %% [markdown]
# ## TransformerLens 4
#
# TransformerLens needs the model as an HF object in eager mode; we boot its Bridge on a copy of
# headscope's weights (offline: nothing is downloaded).

# %%
import os
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformer_lens.model_bridge import TransformerBridge

cfg = copy.deepcopy(model.model.config)
cfg._attn_implementation = "eager"
with no_init_weights():
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
hf.load_state_dict(model.model.state_dict())
tl = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf.eval(),
                                         tokenizer=copy.deepcopy(model.tokenizer))

tokens = tl.to_tokens(prompt)
print(tl.to_str_tokens(prompt)[:6])
tl_logits, tl_cache = tl.run_with_cache(tokens)
mary, john = tl.to_single_token(" Mary"), tl.to_single_token(" John")
tl_parts, labels = tl_cache.decompose_resid(return_labels=True)
tl_heads, head_labels = tl_cache.stack_head_results(return_labels=True)
tl.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                             center_unembed=False, fold_value_biases=False)
tl_dla = tl_cache.logit_attrs(tl_parts, " Mary", incorrect_tokens=" John", pos_slice=-1)
tl_head_dla = tl_cache.logit_attrs(tl_heads, " Mary", incorrect_tokens=" John", pos_slice=-1)
print("logit difference:", float(tl_logits[0, -1, mary] - tl_logits[0, -1, john]))

# %% [markdown]
# ## headscope
#
# The same code: `to_tokens`, `to_str_tokens`, `to_single_token`, `run_with_cache`,
# `decompose_resid`, `stack_head_results`, `logit_attrs`. headscope's attention never builds an
# N×N matrix unless a hook asks for patterns, and `run_with_cache` caches only what `names_filter`
# names (here everything, as TransformerLens does by default).

# %%
hs_tokens = model.to_tokens(prompt)
assert torch.equal(hs_tokens, tokens)
print(model.to_str_tokens(prompt)[:6])
logits, cache = model.run_with_cache(hs_tokens)
parts, hs_labels = cache.decompose_resid(return_labels=True)
heads, _ = cache.stack_head_results(return_labels=True)
dla = cache.logit_attrs(parts, " Mary", incorrect_tokens=" John", pos_slice=-1)
head_dla = cache.logit_attrs(heads, " Mary", incorrect_tokens=" John", pos_slice=-1)
print("logit difference:", float(logits[0, -1, mary] - logits[0, -1, john]))

# %%
err_dla = float((dla - tl_dla).abs().max())
err_heads = float((head_dla - tl_head_dla).abs().max())
print(f"max |DLA difference|: components {err_dla:.2e}, heads {err_heads:.2e}")
assert hs_labels == labels
assert err_dla < 1e-3 and err_heads < 1e-3
# the attributions add up to the logit difference at every position
dla_all = cache.logit_attrs(parts, " Mary", incorrect_tokens=" John")      # [component, batch, pos]
gap = float((dla_all.sum(0) - (logits[..., mary] - logits[..., john])).abs().max())
print(f"sum of attributions vs logit difference: max gap {gap:.1e}")
assert gap < 1e-3

# %% [markdown]
# ## Which heads write the answer?

# %%
import plotly.express as px
L, H = model.cfg.n_layers, model.cfg.n_heads
grid = head_dla.reshape(L * H, -1)[:, -1].reshape(L, H)     # [layer, head] at the last position
top = torch.topk(grid.flatten(), 5)
print("top heads by DLA:", [(divmod(int(i), H), round(float(v), 3)) for v, i in zip(top.values, top.indices)])
px.imshow(grid, color_continuous_scale="RdBu", color_continuous_midpoint=0.0,
          labels=dict(x="head", y="layer", color="DLA (Mary - John)"), aspect="auto",
          title="Direct logit attribution per head, last position")

# %%
l, h = divmod(int(top.indices[0]), H)
pattern = cache["pattern", l][0, h]                       # [query, key]
assert torch.allclose(pattern, tl_cache["pattern", l][0, h], atol=1e-4)
str_toks = model.to_str_tokens(prompt)
px.imshow(pattern, x=[f"{i}:{t}" for i, t in enumerate(str_toks)], y=[f"{i}:{t}" for i, t in enumerate(str_toks)],
          labels=dict(x="key", y="query"), title=f"L{l}H{h} attention pattern")
