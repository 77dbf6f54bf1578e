# %% [markdown]
# # 2. Retrieval heads and the masking experiment
#
# Wu et al. (2024), *Retrieval Head Mechanistically Explains Long-Context Factuality*: a retrieval
# head copies the needle of a needle-in-a-haystack test token by token — at each decode step its
# most-attended key is the needle token being generated. Masking those heads (making their attention
# uniform) should break retrieval; masking as many random heads should not.
#
# Quick settings: needles at 200/400/800 tokens and depths 0/50/100%, on SmolLM2-135M-Instruct,
# a few minutes on a 2-core CPU. `Retrieval.paper_config()` is the paper's grid (20 lengths up to
# the context limit × 10 depths), the run for a GPU.

# %%
import torch
import headscope as hs
from headscope.heads.retrieval import Retrieval, masking_experiment

model = hs.load("smollm2")
analyzer = Retrieval()                    # the quick grid
scores = analyzer.score(model, progress=False)
print(f"{scores.extra.get('n_counted', '?')} tests counted;",
      f"{int((scores.scores > 0.1).sum())} / {scores.scores.numel()} heads above 0.1;",
      f"{float((scores.scores == 0).float().mean()):.0%} score exactly 0")
print("top heads:", ", ".join(f"L{l}H{h} {s:.2f}" for l, h, s in scores.top(8)))

# %% [markdown]
# Retrieval heads are few (the paper: under 5% of heads above 0.1 on 7B models) and sit in the
# upper-middle layers; most heads score exactly 0.

# %%
n_ret = int((scores.scores > 0.1).sum())
assert 0 < n_ret < 0.15 * scores.scores.numel()
assert float((scores.scores == 0).float().mean()) > 0.6
assert all(l >= 10 for l, h, s in scores.top(5)), "the top retrieval heads sit in the upper layers"
scores.plot()

# %% [markdown]
# ## Masking: top-10 retrieval heads vs 10 random heads
#
# The heads are made uniform (query × 1e-4) during decoding only, as in the reference. Random heads
# are drawn outside the retrieval set (3 draws).

# %%
res = masking_experiment(model, scores, k=10, n_random=3, analyzer=analyzer, progress=False)
print(f"no mask {res['baseline']:.3f} | top-10 masked {res['top_k']:.3f} | "
      f"10 random heads {res['random_mean']:.3f} ± {res['random_std']:.3f} {[round(r, 3) for r in res['random']]}")
for o in res["outputs"]["top_k"][:2]:
    print("with the top heads masked:", repr(o[:90]))

# %%
assert res["top_k"] < res["baseline"] - 0.2, "masking the retrieval heads breaks the needle test"
assert res["top_k"] < min(res["random"]), "and hurts more than any random draw of as many heads"
