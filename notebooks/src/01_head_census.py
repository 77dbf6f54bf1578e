# %% [markdown]
# # 1. A head census of SmolLM2-135M-Instruct
#
# What does each of the model's 270 attention heads (30 layers × 9 heads, 3 KV heads) do? This
# notebook runs a few of headscope's head analyzers with their quick settings, lists the top heads of
# each class, combines them into one map, and then records a long-context statistic in O(N) memory.
#
# Runs on a 2-core CPU in a few minutes. Every number printed here is asserted below it, so a
# re-run that contradicts the text fails (CI executes this notebook).

# %%
import time
import torch
import headscope as hs
from headscope.heads import ANALYZERS

torch.manual_seed(0)
model = hs.load("smollm2")
print(model.cfg.n_layers, "layers ×", model.cfg.n_heads, "heads;", model.cfg.n_kv_heads, "KV heads")

# %% [markdown]
# ## The analyzers
#
# Each analyzer follows one protocol: `quick()` (CPU-sized settings) or `paper_config()` (the paper's
# settings), then `score(model) -> HeadScores`, a `[layer, head]` tensor with metadata.

# %%
for name, cls in ANALYZERS.items():
    print(f"{name:16s} {cls.paper[:90]}")

# %%
census = {}
for name in ["sinks", "previous_token", "induction", "duplicate_token"]:
    t0 = time.time()
    census[name] = ANALYZERS[name].quick().score(model, progress=False)
    print(f"{name:16s} {time.time() - t0:5.1f} s   top 3:",
          ", ".join(f"L{l}H{h} {s:.2f}" for l, h, s in census[name].top(3)))

# %% [markdown]
# ## Sink heads
#
# Gu et al. (2024): the mean attention the first token receives; a head with α₁ > 0.3 is a sink head.
# Most heads of a small instruction-tuned model put most of their attention on the first token.

# %%
sinks = census["sinks"]
frac = float((sinks.scores > 0.3).float().mean())
print(f"{frac:.0%} of heads are sink heads (alpha_1 > 0.3)")
assert 0.3 < frac <= 1.0, frac
sinks.plot()

# %% [markdown]
# ## Previous-token and induction heads
#
# A previous-token head attends to position t−1; an induction head, on a repeated random block,
# attends to the token after the previous occurrence of the current token (RazorAttention §3.2).
# Induction heads need a previous-token head in an earlier layer to work, so the best induction head
# should sit above the best previous-token head.

# %%
prev_top = census["previous_token"].top(1)[0]
ind_top = census["induction"].top(1)[0]
print("best previous-token head:", prev_top, " best induction head:", ind_top)
assert prev_top[2] > 0.5 and ind_top[2] > 0.3
assert ind_top[0] > prev_top[0], "the induction head sits above the previous-token head"
census["induction"].plot()

# %% [markdown]
# ## One combined map
#
# Each head gets the class in which it stands out most (z-score within the analyzer), or "none" when
# it stands out nowhere (z < 2).

# %%
z = torch.stack([(s.scores - s.scores.mean()) / s.scores.std() for s in census.values()])  # [class, L, H]
best = z.argmax(0)
names = list(census)
labels = [[names[best[l, h]] if z[best[l, h], l, h] > 2 else "none" for h in range(model.cfg.n_heads)]
          for l in range(model.cfg.n_layers)]
counts = {n: sum(row.count(n) for row in labels) for n in names + ["none"]}
print(counts)
assert counts["none"] > model.cfg.n_layers * model.cfg.n_heads // 2   # most heads stand out nowhere

# %% [markdown]
# ## A long-context statistic in O(N) memory
#
# `model.record(...)` computes per-head statistics inside the attention kernel: here the entropy of
# every head's attention at every position of a 2,048-token text, with no `[head, N, N]` tensor. The
# same through `run_with_cache` would hold 30 × 9 × 2048² floats (4.5 GB) of patterns.

# %%
from headscope.heads.data import load_haystack
toks = model.to_tokens(load_haystack())[:, :2048]
t0 = time.time()
with torch.no_grad(), model.record(hs.Stats(entropy=True, sink_k=1)) as rec:
    model(toks)
ent = rec.stack("entropy")[:, 0]                          # [layer, head, query]
print(f"{toks.shape[1]} tokens, every layer: {time.time() - t0:.1f} s; entropy {tuple(ent.shape)}")
late = ent[:, :, 1024:].mean(-1)                         # [layer, head] mean entropy, 2nd half
assert late.shape == (model.cfg.n_layers, model.cfg.n_heads) and torch.isfinite(late).all()
print("most diffuse head:", divmod(int(late.argmax()), model.cfg.n_heads), f"{float(late.max()):.2f} nats;",
      "most focused:", divmod(int(late.argmin()), model.cfg.n_heads), f"{float(late.min()):.2f} nats")
assert float(late.max()) > 2 * float(late.min())

# %%
import plotly.express as px
px.imshow(late, labels=dict(x="head", y="layer", color="entropy (nats)"), aspect="auto",
          title="Mean attention entropy, positions 1024-2047")
