"""Plain PyTorch attention with statistics and edits: the meaning of ``spec.py`` in code.

``attend_block`` handles one block of queries against one slice of keys and is written to be read,
not to be fast: it materialises the block's probabilities ``[batch, head, query, key]``.
``attention`` calls it once for all queries (the eager reference the tests hold every fast path
to); ``chunked.attention`` calls it per query block so no N×N matrix exists for all heads at once.
Everything here is differentiable, so gates and offsets can be trained through it.
"""
from __future__ import annotations

import torch

from .spec import LayerEdits, Redistribution, Span, StatRequest


def _span_mask(pos: torch.Tensor, spans: tuple[Span, ...]) -> torch.Tensor:
    """pos [B, Kb] int64 positions -> [B, Kb] bool, True where pos falls in any half-open span."""
    m = torch.zeros_like(pos, dtype=torch.bool)
    for a, b in spans:
        m |= (pos >= a) & (pos < b)
    return m


# ---- probability-space edits, one small function each (steps of ``spec.LayerEdits``) ----------
def scale_queries(q: torch.Tensor, q_scale: torch.Tensor | None) -> torch.Tensor:
    """Step 1: q [B, H, Qb, d] times ``q_scale`` [H] (uniform attention when ~0)."""
    if q_scale is None:
        return q
    return q * q_scale.to(q.dtype).view(1, -1, 1, 1)


def redistribute(p: torch.Tensor, r: Redistribution, key_pos: torch.Tensor,
                 query_pos: torch.Tensor) -> torch.Tensor:
    """Step 2: apply one ``Redistribution`` (ACT / VAR) to probabilities p [B, H, Qb, Kb];
    key_pos [B, Kb] and query_pos [B, Qb] are the keys' and the queries' token positions."""
    src = _span_mask(key_pos, r.source)[:, None, None, :]                      # [B, 1, 1, Kb]
    tgt = (_span_mask(key_pos, r.target)[:, None, None, :] if r.target is not None
           else torch.ones_like(src))
    heads = list(r.heads)
    ph = p[:, heads]                                                             # [B, h, Qb, Kb]
    m_src = (ph * src).sum(-1, keepdim=True)                                     # [B, h, Qb, 1]
    rest = tgt & ~src
    m_rest = (ph * rest).sum(-1, keepdim=True)
    freed = (1.0 - r.factor) * m_src
    gain = torch.where(m_rest > 0, freed / m_rest.clamp_min(1e-30), torch.zeros_like(m_rest))
    new = torch.where(src, ph * r.factor, torch.where(rest, ph * (1.0 + gain), ph))
    keep = m_rest > 0                                                            # [B, h, Qb, 1]
    if r.max_ratio is not None:                                                  # VAR row rule
        m_tgt = (ph * tgt).sum(-1, keepdim=True)
        m_src_in_tgt = (ph * (src & tgt)).sum(-1, keepdim=True)
        ratio = m_src_in_tgt / m_tgt.clamp_min(1e-30)
        keep = keep & (ratio <= r.max_ratio) & (m_tgt >= r.min_target)
    if r.min_query is not None:                                                  # query rows
        keep = keep & (query_pos >= r.min_query)[:, None, :, None]
    new = torch.where(keep, new, ph)
    out = p.clone()
    out[:, heads] = new
    return out


def streaming_visible(key_pos: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, sink: int,
                      recent: int) -> torch.Tensor:
    """Step 4's streaming branch (DuoAttention): the keys a streaming head sees, [B, Qb, Kb] bool:
    positions s < sink or cache distance t - s < recent (combined with the visibility mask)."""
    diff = q_idx[:, None] - k_idx[None, :]                                       # [Qb, Kb] t - s
    return (key_pos < sink)[:, None, :] | (diff < recent)[None]


def streaming_gate(out: torch.Tensor, out_streaming: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Step 4: out = (1 - a[h]) * streaming + a[h] * full; out, out_streaming [B, H, Qb, d] fp32."""
    a = gate.float().view(1, -1, 1, 1)
    return (1 - a) * out_streaming + a * out


def _lse(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Log of each row's softmax denominator: s [B, H, Qb, Kb] -> [B, H, Qb], with the learned sink
    logit sinks [H] added to the denominator when given (GPT-OSS, transformers' ``s_aux``)."""
    lse = torch.logsumexp(s, dim=-1)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().view(1, -1, 1))
    return lse.masked_fill(lse == float("inf"), float("nan"))        # a +inf score: a NaN row


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """p = exp(s - lse); 0 on rows that see no key (lse = -inf). A row with a NaN or +inf score has
    lse NaN and is NaN throughout (as eager attention's softmax), never zeros."""
    dead = lse == float("-inf")
    return torch.where(dead[..., None], 0.0, torch.exp(s - lse.masked_fill(dead, 0.0)[..., None]))


def visibility(q_idx: torch.Tensor, k_idx: torch.Tensor, *, causal: bool, sliding_window: int | None,
               key_padding: torch.Tensor | None) -> torch.Tensor:
    """Which keys each query may see. q_idx [Qb], k_idx [Kb] cache indices -> [B or 1, Qb, Kb] bool.
    Causal: s <= t. Sliding window (HF convention): t - s < window. Padding: key_padding[b, s]."""
    diff = q_idx[:, None] - k_idx[None, :]                                       # [Qb, Kb] = t - s
    vis = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        vis &= diff >= 0
    if sliding_window is not None:
        vis &= diff < sliding_window
    vis = vis[None]
    if key_padding is not None:
        vis = vis & key_padding[:, None, :].bool()
    return vis


def attend_block(q, k, v, *, scaling: float, q_start: int, k_start: int, causal: bool = True,
                 sliding_window: int | None = None, key_padding: torch.Tensor | None = None,
                 softcap: float | None = None, key_pos0: torch.Tensor | None = None,
                 stats: StatRequest | None = None, edits: LayerEdits | None = None,
                 want_probs: bool = False, score_hook=None, pattern_hook=None,
                 sinks: torch.Tensor | None = None):
    """One block of queries against one slice of keys.

    q [B, H, Qb, d] are the queries at cache indices q_start..q_start+Qb; k, v [B, G, Kb, d] the keys
    at cache indices k_start..k_start+Kb (G divides H: query head h reads KV head h // (H // G)).
    ``key_padding`` [B, Kb] (True = real token) covers the same slice. ``key_pos0`` [B]: position of
    cache index 0. ``score_hook`` / ``pattern_hook`` may replace the scores / probabilities.
    ``sinks`` [H]: learned sink logits (transformers' ``s_aux``), one more term in each row's softmax
    denominator with no value (see ``spec.StatRequest``).

    Returns (out [B, H, Qb, d] in q's dtype, row_stats dict, column dict, probs or None), where
    column dict holds the block's ``received_sum`` [B, H, Kb] and ``received_count`` [B, Kb].
    """
    B, H, Qb, d = q.shape
    G, Kb = k.shape[1], k.shape[2]
    r = H // G
    dev = q.device
    if key_pos0 is None:
        key_pos0 = torch.zeros(B, dtype=torch.long, device=dev)
    qf, kf, vf = q.float(), k.float(), v.float()
    if edits is not None:
        qf = scale_queries(qf, edits.q_scale)

    # scores [B, H, Qb, Kb]; query heads grouped over their KV head (GQA)
    s = torch.matmul(qf.reshape(B, G, r * Qb, d), kf.transpose(-1, -2)).view(B, H, Qb, Kb) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    q_idx = torch.arange(q_start, q_start + Qb, device=dev)
    k_idx = torch.arange(k_start, k_start + Kb, device=dev)
    vis = visibility(q_idx, k_idx, causal=causal, sliding_window=sliding_window,
                     key_padding=key_padding)[:, None]                            # [B|1, 1, Qb, Kb]
    s = s.masked_fill(~vis, float("-inf"))
    if score_hook is not None:
        s = score_hook(s)
    lse = _lse(s, sinks)                                                         # [B, H, Qb]
    p = _probs(s, lse)

    key_pos = key_pos0[:, None] + k_idx[None, :]                                 # [B, Kb] positions s
    if edits is not None:
        for red in edits.redistributions:
            p = redistribute(p, red, key_pos, key_pos0[:, None] + q_idx[None, :])
    if pattern_hook is not None:
        p = pattern_hook(p)

    # ---- statistics, fp32, from the final probabilities ----
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    if stats is not None:
        rows["lse"] = lse
        dist = (q_idx[:, None] - k_idx[None, :]).float().clamp_min(0)            # [Qb, Kb] t - s
        if stats.sink_k:
            rows["sink_mass"] = (p * (key_pos < stats.sink_k)[:, None, None, :]).sum(-1)
        if stats.spans:
            masks = torch.stack([(key_pos >= a) & (key_pos < b) for a, b in stats.spans], -1)  # [B, Kb, S]
            rows["span_mass"] = torch.einsum("bhqk,bks->bhqs", p, masks.float())
        if stats.entropy:
            rows["entropy"] = -torch.special.xlogy(p, p).sum(-1)                 # 0 log 0 = 0, NaN stays
        if stats.distance:
            rows["distance"] = (p * dist).sum(-1)
        if stats.window_distance:
            rows["window_distance"] = (p * dist.clamp_max(stats.window_distance)).sum(-1)
        if stats.recent:
            rows["recent_mass"] = (p * (dist < stats.recent)).sum(-1)
        if stats.argmax:
            mp, am = p.max(-1)
            rows["max_prob"] = mp
            rows["argmax"] = (am + k_start) + key_pos0[:, None, None]
        if stats.received:
            sel = vis[:, 0]                                                       # [B|1, Qb, Kb]
            if stats.received_window is not None:
                a, b = stats.received_window
                diff = q_idx[:, None] - k_idx[None, :]
                sel = sel & ((diff >= a) & (diff <= b))[None]
            cols["received_sum"] = torch.where(sel[:, None], p, 0.0).sum(-2)      # [B, H, Kb]
            cols["received_count"] = sel.sum(-2).expand(B, Kb).to(torch.float32)  # [B, Kb]

    out = torch.matmul(p.view(B, G, r * Qb, Kb), vf).view(B, H, Qb, d)           # [B, H, Qb, d]

    if edits is not None and edits.gate is not None:
        stream = streaming_visible(key_pos, q_idx, k_idx, edits.gate_sink, edits.gate_recent)  # [B, Qb, Kb]
        ss = s.masked_fill(~stream[:, None], float("-inf"))
        ps = _probs(ss, _lse(ss, sinks))
        out_s = torch.matmul(ps.view(B, G, r * Qb, Kb), vf).view(B, H, Qb, d)
        out = streaming_gate(out, out_s, edits.gate)
    return out.to(q.dtype), rows, cols, (p if want_probs else None)


def attention(q, k, v, *, scaling: float, causal: bool = True, sliding_window: int | None = None,
              key_padding: torch.Tensor | None = None, softcap: float | None = None,
              key_pos0: torch.Tensor | None = None, stats: StatRequest | None = None,
              edits: LayerEdits | None = None, want_probs: bool = False,
              score_hook=None, pattern_hook=None, sinks: torch.Tensor | None = None):
    """Eager reference over all queries: q [B, H, Q, d], k, v [B, G, K, d] with Q <= K (the queries
    are the last Q keys). Returns (out [B, H, Q, d], stats dict, probs [B, H, Q, K] or None)."""
    Q, K = q.shape[2], k.shape[2]
    out, rows, cols, p = attend_block(q, k, v, scaling=scaling, q_start=K - Q, k_start=0, causal=causal,
                                      sliding_window=sliding_window, key_padding=key_padding,
                                      softcap=softcap, key_pos0=key_pos0, stats=stats, edits=edits,
                                      want_probs=want_probs, score_hook=score_hook,
                                      pattern_hook=pattern_hook, sinks=sinks)
    return out, {**rows, **cols}, p
