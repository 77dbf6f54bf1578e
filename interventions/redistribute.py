"""Attention redistribution with a different key set per example, for ``hook_pattern`` hooks.

The probe's ``ScaleKeys`` edit (ACT, Yu et al. 2024 §3.2 eq. 4; VAR, Kang et al. 2025 §4.2) names
its keys as token spans shared by the whole batch, so examples whose sinks sit at different
positions need one forward each. ``redistribute_rows`` is the same rule on probabilities with
per-example (and per-head) key masks, so a batch of such examples runs in one forward through a
pattern hook (``HookedModel.hooks([("blocks.l.attn.hook_pattern", fn)])``; the hooked layers take
the full-pattern reference path). On a row of p:

    p'[s] = factor · p[s]                   for s in src
    p'[s] = p[s] · (1 + freed / mass(T))    for s in T = tgt minus src,  freed = (1 - factor) · mass(src)

rows with no mass in T stay unchanged; with ``max_ratio`` (VAR) a row changes only when
mass(src ∩ tgt) / mass(tgt) <= max_ratio and mass(tgt) >= min_target; with ``queries`` only the
query rows marked there may change (VAR's reference code redistributes only the prompt's queries
after the image, ``VARProcessor.attn_redist`` in MICV-yonsei/VisAttnSink). ``tests/test_interventions.py``
holds it equal to the ``ScaleKeys`` edit.
"""
from __future__ import annotations

import torch


def redistribute_rows(p: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor | None = None, factor: float = 0.4,
                      max_ratio: float | None = None, min_target: float = 0.0,
                      queries: torch.Tensor | None = None) -> torch.Tensor:
    """p [B, H, Q, K] probabilities; src [B, H|1, K] bool keys to scale; tgt [B, H|1, K] bool keys
    that receive the freed mass (None: every key); queries [B, Q] bool rows allowed to change (None:
    every row) -> p' [B, H, Q, K]."""
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"factor must be in [0, 1], got {factor}")
    sm = src.to(p.device)[:, :, None, :]                                          # [B, H|1, 1, K]
    tm = torch.ones_like(sm) if tgt is None else tgt.to(p.device)[:, :, None, :]
    rest = tm & ~sm
    m_src = (p * sm).sum(-1, keepdim=True)                                        # [B, H, Q, 1]
    m_rest = (p * rest).sum(-1, keepdim=True)
    gain = torch.where(m_rest > 0, (1.0 - factor) * m_src / m_rest.clamp_min(1e-30), torch.zeros_like(m_rest))
    new = torch.where(sm, p * factor, torch.where(rest, p * (1.0 + gain), p))
    keep = m_rest > 0
    if max_ratio is not None:
        m_tgt = (p * tm).sum(-1, keepdim=True)
        ratio = (p * (sm & tm)).sum(-1, keepdim=True) / m_tgt.clamp_min(1e-30)
        keep = keep & (ratio <= max_ratio) & (m_tgt >= min_target)
    if queries is not None:
        keep = keep & queries.to(p.device)[:, None, :, None]                      # [B, 1, Q, 1]
    return torch.where(keep, new, p)
