"""Exact attention on the CPU (or any device) in query blocks: never an N×N matrix for all heads.

Memory is O(block · N) per layer instead of O(N²): each block of ``block`` queries sees only the keys
it can attend to (causal: keys up to its last query; sliding window: from its first query's window
start), so causal attention also skips the upper triangle. Same arguments and results as
``reference.attention``, which defines them.
"""
from __future__ import annotations

import torch

from .reference import attend_block
from .spec import LayerEdits, StatRequest


def attention(q, k, v, *, scaling: float, causal: bool = True, sliding_window: int | None = None,
              key_padding: torch.Tensor | None = None, softcap: float | None = None,
              key_pos0: torch.Tensor | None = None, stats: StatRequest | None = None,
              edits: LayerEdits | None = None, block: int = 256):
    """q [B, H, Q, d], k, v [B, G, K, d] -> (out [B, H, Q, d], stats dict)."""
    B, H, Q, d = q.shape
    K = k.shape[2]
    off = K - Q                                    # cache index of query 0
    outs, rows = [], {}
    received = stats is not None and stats.received
    if received:
        rec_sum = q.new_zeros(B, H, K, dtype=torch.float32)
        rec_cnt = q.new_zeros(B, K, dtype=torch.float32)
    for q0 in range(0, Q, block):
        q1 = min(Q, q0 + block)
        k_hi = off + q1 if causal else K
        k_lo = max(0, off + q0 - sliding_window + 1) if sliding_window is not None else 0
        kp = key_padding[:, k_lo:k_hi] if key_padding is not None else None
        out, r, c, _ = attend_block(q[:, :, q0:q1], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], scaling=scaling,
                                    q_start=off + q0, k_start=k_lo, causal=causal,
                                    sliding_window=sliding_window, key_padding=kp, softcap=softcap,
                                    key_pos0=key_pos0, stats=stats, edits=edits)
        outs.append(out)
        for name, t in r.items():
            rows.setdefault(name, []).append(t)
        if received:
            rec_sum[:, :, k_lo:k_hi] += c["received_sum"]
            rec_cnt[:, k_lo:k_hi] += c["received_count"]
    result = {name: torch.cat(ts, dim=2) for name, ts in rows.items()}
    if received:
        result["received_sum"], result["received_count"] = rec_sum, rec_cnt
    return torch.cat(outs, dim=2), result
