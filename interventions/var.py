"""VAR — visual attention redistribution (Kang et al. 2025, "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025; reference repo MICV-yonsei/VisAttnSink),
for text models: the "visual" token group becomes any token group the user names (a document, a
context passage).

1. Massive-activation dimensions (``massive_dims``): the few hidden dimensions where the first
   token's RMS-normalised hidden state (no weight) is huge, |x_d| / rms(x) > tau = 20, at layers >= 2.
2. Sink tokens (``sink_tokens``), per layer l >= 2: tokens whose normalised input to layer l
   (``blocks.l.hook_resid_pre``) exceeds tau on one of those dimensions (§3.1).
3. Redistribution (``var_edits``), every layer from 2 up to the last but one, every head: on the
   rows of a head that look at the target group (attention on it >= 0.2) but not mostly at its
   sinks (sink share of that attention <= rho = 0.5: "target-centric" heads, §4.1), the attention
   on the group's sink tokens is multiplied by p = 0.6 and the freed mass goes to the group's other
   tokens in proportion to their attention (§4.2). This is ``ScaleKeys(keys=sinks in the group,
   factor=p, target=group, max_ratio=rho, min_target=0.2)``, applied inside the attention path.

Positions are token positions of one unpadded sequence.
"""
from __future__ import annotations

import torch

from ..probe import ScaleKeys

Span = tuple[int, int]


def _normalised(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without weight over the last dim: h / rms(h)."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _resid(model, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: resid_pre [N, d]} of one sequence tokens [N]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n.endswith("hook_resid_pre"))
    return {l: cache[f"blocks.{l}.hook_resid_pre"][0] for l in range(model.cfg.n_layers)}


def massive_dims(model, tokens: torch.Tensor, tau: float = 20.0, first_layer: int = 2) -> list[int]:
    """Dimensions where the first token's normalised hidden state exceeds ``tau`` at some layer
    >= ``first_layer`` (VAR §3.1: the massive-activation dimensions of the model)."""
    res = _resid(model, tokens)
    dims = set()
    for l in range(first_layer, model.cfg.n_layers):
        dims |= set(torch.nonzero(_normalised(res[l][0]).abs() > tau).flatten().tolist())
    return sorted(dims)


def sink_tokens(model, tokens: torch.Tensor, dims: list[int], tau: float = 20.0,
                first_layer: int = 2) -> dict[int, list[int]]:
    """{layer: positions of sink tokens} for layers >= ``first_layer``: tokens whose normalised input
    to the layer exceeds ``tau`` on one of the massive dimensions ``dims``."""
    if not dims:
        raise ValueError("no massive-activation dimensions given: run massive_dims first (a model "
                         "without them has no VAR sinks)")
    res = _resid(model, tokens)
    out = {}
    for l in range(first_layer, model.cfg.n_layers):
        x = _normalised(res[l])[:, dims].abs().amax(-1)                        # [N]
        out[l] = torch.nonzero(x > tau).flatten().tolist()
    return out


def var_edits(model, sinks: dict[int, list[int]], target: list[Span], p: float = 0.6, rho: float = 0.5,
              min_target: float = 0.2, heads=None) -> list[ScaleKeys]:
    """The VAR edits for one input: per layer in [2, L - 2] with sink tokens inside ``target``."""
    if not target:
        raise ValueError("VAR needs a target token group: target=[(start, end), ...] token positions")
    L = model.cfg.n_layers
    heads = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    inside = lambda t: any(a <= t < b for a, b in target)
    out = []
    for l, pos in sorted(sinks.items()):
        if l < 2 or l >= L - 1:
            continue
        keys = [(t, t + 1) for t in pos if inside(t)]
        if keys:
            out.append(ScaleKeys(l, heads, keys=keys, factor=p, target=list(target), max_ratio=rho,
                                 min_target=min_target))
    return out
