"""How token-specific VAR's sink tokens are (Kang et al. 2025 §3.1: sink tokens = tokens whose
RMS-normalised hidden state exceeds tau = 20 on a massive-activation dimension of the first token).
For each model: the massive dimensions, and per layer >= 2 the share of tokens of context-QA prompts
(interventions.tasks.context_qa_task, 4 facts, 3 passages) that count as sinks, with the first token's
value and the median over the other tokens on those dimensions.

    python notes/interv_var_sinks.py gemma3-270m smollm2
"""
import json
import sys

import torch

import headscope as hs
from headscope.interventions import tasks, var

torch.set_num_threads(2)
for name in sys.argv[1:] or ["gemma3-270m", "smollm2"]:
    m = hs.load(name)
    exs = tasks.context_qa_task(m, 4, 4, 3, seed=0).examples
    peak = var.first_token_peak(m, exs[0].tokens)
    tau = min(20.0, 0.8 * peak)
    dims = var.massive_dims(m, exs[0].tokens, tau)
    rows = []
    for l in range(2, m.cfg.n_layers):
        share, first, other = [], [], []
        for ex in exs:
            with torch.no_grad():
                _, cache = m.run_with_cache(ex.tokens[None], names_filter=f"blocks.{l}.hook_resid_pre")
            h = cache[f"blocks.{l}.hook_resid_pre"][0].float()
            x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))[:, dims].abs().amax(-1)   # [N]
            share.append(float((x[1:] > tau).float().mean()))
            first.append(float(x[0]))
            other.append(float(x[1:].median()))
        rows.append(dict(layer=l, share_of_tokens_over_tau=round(sum(share) / len(share), 3),
                         first_token=round(sum(first) / len(first), 2), median_other=round(sum(other) / len(other), 2)))
    print(json.dumps(dict(model=m.cfg.name, first_token_peak=round(peak, 2), tau=round(tau, 2), massive_dims=dims,
                          mean_tokens=sum(len(e.tokens) for e in exs) / len(exs), layers=rows)), flush=True)
