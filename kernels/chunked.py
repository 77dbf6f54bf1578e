"""Exact attention on the CPU (or any device) in query blocks: never an N×N matrix for all heads.

Same arguments and results as ``reference.attention`` (which defines them), but built for speed in
plain PyTorch:
- each block of ``block`` queries only sees the keys it can attend to (causal: up to its last
  query; sliding window: from its first query's window start), so causal attention skips the upper
  triangle and memory is O(block · N) per layer;
- without statistics or probability edits the block runs fused SDPA with the block's mask;
- with them, the probabilities of the block are formed once (one softmax) and every statistic is a
  single reduction: linear column statistics (sink, spans, positions for the mean distance) are one
  matmul with an indicator matrix, the log-sum-exp comes from the max (lse = s_max − log p_max),
  entropy = lse − Σ p·s is one batched dot, and the band statistics (recent mass, windowed distance,
  windowed column sums) only touch the band of keys near the diagonal;
- on the CPU, where a C compiler exists, that row work (softmax, every row statistic, column sums)
  runs fused in ``cpu_rows.c`` instead (``_native_block``): three passes per row while it sits in
  cache, e·V scaled by 1/Z. The PyTorch version above stays for probability edits
  (redistribution, gates), autograd, other devices and ``HEADSCOPE_NATIVE=0``; tests hold both to
  the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_native
from .reference import redistribute, scale_queries, streaming_gate, streaming_visible, visibility
from .spec import LayerEdits, StatRequest

NEG = -1e30  # finite "minus infinity": exp underflows to exactly 0 and 0 · NEG stays 0


def _default_block(H: int, K: int, native: bool = False) -> int:
    """Queries per block. The PyTorch ops keep one block's probabilities [H, block, K] around 16 MB
    (fewer trips to memory); the fused row pass reads each row while it is in cache, so it takes
    blocks twice that size and no fewer than 64 queries (bigger matmuls: 1.7-1.9x SDPA per layer at
    8k instead of 2.3x with 32)."""
    b = ((1 << 23) if native else (1 << 22)) // max(1, H * K)
    return int(min(512, max(64 if native else 32, 1 << max(0, b.bit_length() - 1))))


def _sdpa_block(q, k, v, vis, scaling, edits, key_pos, q_idx, k_idx):
    """Plain block through fused SDPA (plus the gate's streaming branch). vis [B|1, Qb, Kb] bool."""
    B, H, Qb, d = q.shape
    gqa = k.shape[1] != H
    mask = vis[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa).float()
    dead = ~vis.any(-1)                                                        # fully masked queries
    if dead.any():
        out = out.masked_fill(dead[:, None, :, None], 0.0)
    if edits is not None and edits.gate is not None:
        stream = vis & streaming_visible(key_pos, q_idx, k_idx, edits.gate_sink, edits.gate_recent)
        out_s = F.scaled_dot_product_attention(q, k, v, attn_mask=stream[:, None], scale=scaling,
                                               enable_gqa=gqa).float()
        out_s = out_s.masked_fill(~stream.any(-1)[:, None, :, None], 0.0)
        out = streaming_gate(out, out_s, edits.gate)
    return out


def _structural_regions(q_idx, k_idx, causal: bool, window: int | None):
    """Column ranges of a block where the causal or window mask is not all-True, with their masks:
    [(c0, c1, visible [Qb, c1 - c0] bool)]. Everything outside them is visible to every query."""
    Kb = k_idx.numel()
    t0, t1, k0 = int(q_idx[0]), int(q_idx[-1]), int(k_idx[0])
    regions = []
    if causal and t0 + 1 - k0 < Kb:                                   # keys after the first query
        c0 = max(0, t0 + 1 - k0)
        regions.append((c0, Kb))
    if window is not None and t1 - window + 1 - k0 > 0:               # keys before the last window
        regions.append((0, min(Kb, t1 - window + 1 - k0)))
    regions.sort()
    merged = []
    for c0, c1 in regions:                                           # overlapping ranges -> one
        if merged and c0 <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(c1, merged[-1][1]))
        else:
            merged.append((c0, c1))
    out = []
    for c0, c1 in merged:
        diff = q_idx[:, None] - k_idx[None, c0:c1]                    # t - s
        m = torch.ones_like(diff, dtype=torch.bool)
        if causal:
            m &= diff >= 0
        if window is not None:
            m &= diff < window
        out.append((c0, c1, m))
    return out


def _received_count(vis, regions, Qb, Kb, B, device, window=None, q_idx=None, k_idx=None):
    """[B, Kb] how many queries of the block can see each key (and fall in the FAI window)."""
    if vis is None:
        vis = torch.ones(1, Qb, Kb, dtype=torch.bool, device=device)
        for c0, c1, m in regions:
            vis[:, :, c0:c1] = m
    if window is not None:
        a, b = window
        diff = q_idx[:, None] - k_idx[None, :]
        vis = vis & ((diff >= a) & (diff <= b))[None]
    return vis.sum(-2).float().expand(B, Kb)


def _native_ok(q, stats, edits, sinks, native: bool | None, k=None, v=None) -> bool:
    """The fused C row pass applies: CPU, built, allowed by the caller (``native``), and
    ``cpu_native.supports`` the request (no probability edits, no sinks, nothing to differentiate:
    it has no backward pass)."""
    if native is False or q.device.type != "cpu" or not cpu_native.available():
        return False
    ts = [q, k, v] + (edits.tensors() if edits is not None else [])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
    return cpu_native.supports(stats, edits, sinks=sinks is not None, grad=grad) is None


def _native_block(s, v, stats, key_pos, q_idx, k_idx, kp, vis, regions, causal, window):
    """Probabilities and row statistics of one block through ``cpu_rows.c``; s [B, H, Qb, Kb] fp32
    scores (overwritten by the unnormalised e = exp(s - max); out = (e @ V) / sum e).
    Returns (out fp32, rows, cols)."""
    B, H, Qb, Kb = s.shape
    G, d = v.shape[1], v.shape[-1]
    k0 = int(k_idx[0])
    tq = q_idx - k0                                                            # [Qb] query, key-local
    hi = tq + 1 if causal else torch.full_like(tq, Kb)
    lo = (tq - window + 1) if window is not None else torch.zeros_like(tq)
    want, kw = {"lse"}, dict(sink_hi=None, span_lo=None, span_hi=None, W=0, R=0, recv_mode=0,
                             recv_window=None, argmax=False)
    if stats is not None:
        base = key_pos[:, :1]                                                  # [B, 1] position of key 0
        if stats.sink_k:
            want.add("sink_mass")
            kw["sink_hi"] = (stats.sink_k - base[:, 0]).clamp(0, Kb)
        if stats.spans:
            want.add("span_mass")
            ab = torch.tensor(stats.spans, dtype=torch.long)                   # [S, 2]
            kw["span_lo"] = (ab[None, :, 0] - base).clamp(0, Kb)
            kw["span_hi"] = (ab[None, :, 1] - base).clamp(0, Kb)
        for flag, name in ((stats.entropy, "entropy"), (stats.distance, "distance"),
                           (stats.argmax, "max_prob")):
            if flag:
                want.add(name)
        if stats.window_distance:
            want.add("window_distance")
            kw["W"] = stats.window_distance
        if stats.recent:
            want.add("recent_mass")
            kw["R"] = stats.recent
        kw["argmax"] = bool(stats.argmax)
        if stats.received:
            kw["recv_mode"] = 2 if stats.received_window is not None else 1
            kw["recv_window"] = stats.received_window
    res = cpu_native.rows(s, lo, hi, tq, kp, want=want, **kw)
    rows, cols = {}, {}
    for name in ("lse", "sink_mass", "span_mass", "distance", "entropy", "window_distance", "recent_mass",
                 "max_prob"):
        if name in res and stats is not None:
            rows[name] = res[name]
    if "argmax" in res:
        rows["argmax"] = res["argmax"] + key_pos[:, :1, None]
    if "colsum" in res:
        cols["received_sum"] = res["colsum"]
        cols["received_count"] = _received_count(vis, regions, Qb, Kb, B, s.device, stats.received_window,
                                                 q_idx, k_idx)
    out = torch.matmul(s.view(B, G, (H // G) * Qb, Kb), v.float()).view(B, H, Qb, d)   # e @ V
    return out * res["inv_z"][..., None], rows, cols


def _sink_scale(s, sinks):
    """Share of each row's softmax that stays on the keys when the learned sink logits sinks [H]
    join the denominator: sigmoid(logsumexp(s) - sink) [B, H, Qb, 1] (s masked with NEG)."""
    return torch.sigmoid(torch.logsumexp(s, -1, keepdim=True) - sinks.float().view(1, -1, 1, 1))


def _stats_block(q, k, v, vis, scaling, softcap, stats, edits, key_pos, q_idx, k_idx, regions, kp,
                 causal=True, window=None, sinks=None, native=None):
    """Block with probabilities formed once; returns (out fp32, rows, cols).
    ``vis`` is the full [B|1, Qb, Kb] mask only when padding is present, else None (``regions``
    then say where the structural masks apply)."""
    B, H, Qb, d = q.shape
    G, Kb = k.shape[1], k.shape[2]
    r = H // G
    qf = q.float() * scaling
    s = torch.matmul(qf.reshape(B, G, r * Qb, d), k.float().transpose(-1, -2)).view(B, H, Qb, Kb)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if _native_ok(q, stats, edits, sinks, native, k, v):
        return _native_block(s, v, stats, key_pos, q_idx, k_idx, kp, vis, regions, causal, window)
    if vis is not None:
        s.masked_fill_(~vis[:, None], NEG)
        alive = vis.any(-1)[:, None]                                           # [B, 1, Qb]
    else:
        for c0, c1, m in regions:
            s[..., c0:c1].masked_fill_(~m, NEG)
        alive = None                                                           # every query sees itself
    s.clamp_min_(NEG)              # -inf scores (an inf in k) -> NEG: 0 · s stays 0; NaN stays NaN
    gate_s = s.clone() if edits is not None and edits.gate is not None else None
    p = torch.softmax(s, -1)
    if sinks is not None:                                  # the sink takes its share of each row
        p = p * _sink_scale(s, sinks)
    if alive is not None and not bool(alive.all()):
        p = p * alive[..., None]
    if edits is not None:
        for red in edits.redistributions:
            p = redistribute(p, red, key_pos, key_pos[:, :1] - k_idx[:1] + q_idx[None, :])   # [B, Qb] query positions
    if alive is None:
        alive = torch.ones(1, 1, Qb, dtype=torch.bool, device=q.device)

    rows, cols = {}, {}
    if stats is not None:
        mp, am = p.max(-1)                                                     # [B, H, Qb]
        s_max = torch.gather(s, -1, am[..., None])[..., 0]
        lse = s_max - torch.log(mp.clamp_min(1e-45))
        if edits is not None and edits.redistributions:                        # p is no softmax of s now
            lse = torch.logsumexp(s, -1)
            if sinks is not None:
                lse = torch.logaddexp(lse, sinks.float().view(1, -1, 1))
        dead_lse = (sinks.float().view(1, -1, 1).expand_as(lse) if sinks is not None   # a row with no key:
                    else torch.full_like(lse, float("-inf")))                          # only the sink
        rows["lse"] = torch.where(alive.expand_as(lse), lse, dead_lse)
        # linear column statistics in one matmul: p @ [sink | spans... | key index]
        feats = []
        if stats.sink_k:
            feats.append(key_pos < stats.sink_k)
        feats += [(key_pos >= a) & (key_pos < b) for a, b in stats.spans]
        feats.append(k_idx.expand(key_pos.shape))
        C = torch.stack([f.float() for f in feats], -1)                        # [B, Kb, F]
        lin = torch.matmul(p.reshape(B, H * Qb, Kb), C).view(B, H, Qb, -1)     # [B, H, Qb, F]
        i = 0
        if stats.sink_k:
            rows["sink_mass"] = lin[..., 0]
            i = 1
        if stats.spans:
            rows["span_mass"] = lin[..., i:i + len(stats.spans)]
        mass = (p.sum(-1) if (edits is not None and edits.redistributions) or sinks is not None
                else alive.float().expand(B, H, Qb))
        if stats.distance:
            rows["distance"] = q_idx.float() * mass - lin[..., -1]
            if not causal:                                                     # keys after t count 0
                ahead = (k_idx[None, :] - q_idx[:, None]).clamp_min(0).float()
                rows["distance"] = rows["distance"] + (p * ahead).sum(-1)
        if stats.entropy:
            if edits is not None and edits.redistributions:                    # p is no softmax of s now
                plogp = torch.special.xlogy(p, p).sum(-1)
            else:
                plogp = torch.einsum("bhqk,bhqk->bhq", p, s) - lse * mass      # sum p (s - lse)
            rows["entropy"] = torch.where(alive.expand_as(plogp), -plogp, 0.0)
        band = max(stats.window_distance or 0, stats.recent or 0)
        if band:
            c0 = max(0, int(q_idx[0]) - band + 1 - int(k_idx[0]))             # first key any band reaches
            pb = p[..., c0:]
            diff = (q_idx[:, None] - k_idx[None, c0:]).float()                 # [Qb, Kb'] = t - s
            if stats.window_distance:
                W = stats.window_distance
                rows["window_distance"] = W * mass - (pb * (W - diff).clamp(0, W)).sum(-1)
            if stats.recent:
                rows["recent_mass"] = (pb * (diff < stats.recent)).sum(-1)
        if stats.argmax:
            rows["max_prob"] = mp
            rows["argmax"] = am + key_pos[:, :1, None]                         # position of the top key
        if stats.received and bool(mp.isnan().any()):        # a NaN row reaches only the keys it sees
            full = vis
            if full is None:
                full = torch.ones(1, Qb, Kb, dtype=torch.bool, device=q.device)
                for c0, c1, m in regions:
                    full[:, :, c0:c1] = m
            p = torch.where(full[:, None], p, 0.0)
        if stats.received:
            if stats.received_window is not None:
                a, b = stats.received_window
                lo = max(0, int(q_idx[0]) - b - int(k_idx[0]))
                hi = max(lo, min(Kb, int(q_idx[-1]) - a + 1 - int(k_idx[0])))
                diff = q_idx[:, None] - k_idx[None, lo:hi]
                sel = ((diff >= a) & (diff <= b))[None]
                if vis is not None:
                    sel = sel & vis[:, :, lo:hi]
                else:
                    for c0, c1, m in regions:                              # structural masks in range
                        x0, x1 = max(c0, lo), min(c1, hi)
                        if x0 < x1:
                            sel[:, :, x0 - lo:x1 - lo] &= m[:, x0 - c0:x1 - c0]
                rs = torch.zeros(B, H, Kb, device=q.device)
                rs[..., lo:hi] = torch.where(sel[:, None], p[..., lo:hi], 0.0).sum(-2)
                rc = torch.zeros(B, Kb, device=q.device)
                rc[:, lo:hi] = sel.sum(-2).float().expand(B, -1)
            else:
                rs = p.sum(-2)
                rc = _received_count(vis, regions, Qb, Kb, B, q.device)
            cols["received_sum"], cols["received_count"] = rs, rc

    out = torch.matmul(p.view(B, G, r * Qb, Kb), v.float()).view(B, H, Qb, d)
    if gate_s is not None:
        if vis is None:
            vis = torch.ones(1, Qb, Kb, dtype=torch.bool, device=q.device)
            for c0, c1, m in regions:
                vis[:, :, c0:c1] = m
        stream = vis & streaming_visible(key_pos, q_idx, k_idx, edits.gate_sink, edits.gate_recent)
        gs = gate_s.masked_fill(~stream[:, None], NEG)
        ps = torch.softmax(gs, -1) * stream.any(-1)[:, None, :, None]
        if sinks is not None:
            ps = ps * _sink_scale(gs, sinks)
        out_s = torch.matmul(ps.view(B, G, r * Qb, Kb), v.float()).view(B, H, Qb, d)
        out = streaming_gate(out, out_s, edits.gate)
    return out, rows, cols


def attention(q, k, v, *, scaling: float, causal: bool = True, sliding_window: int | None = None,
              key_padding: torch.Tensor | None = None, softcap: float | None = None,
              key_pos0: torch.Tensor | None = None, stats: StatRequest | None = None,
              edits: LayerEdits | None = None, block: int | None = None,
              sinks: torch.Tensor | None = None, native: bool | None = None):
    """q [B, H, Q, d], k, v [B, G, K, d] -> (out [B, H, Q, d], stats dict).

    ``sinks`` [H]: learned sink logits (transformers' ``s_aux``, see ``spec.StatRequest``).
    ``native``: None uses the fused C row pass wherever ``cpu_native.supports`` the call, False
    never (the caller has declined it and said why)."""
    B, H, Q, d = q.shape
    K = k.shape[2]
    off = K - Q                                                                 # cache index of query 0
    dev = q.device
    if key_pos0 is None:
        key_pos0 = torch.zeros(B, dtype=torch.long, device=dev)
    if edits is not None:
        q = scale_queries(q, edits.q_scale)
    block = block or _default_block(H, K, native=q.device.type == "cpu" and cpu_native.available())
    need_p = (stats is not None or (edits is not None and bool(edits.redistributions)) or softcap is not None
              or sinks is not None)
    if need_p:                      # block slices of [B, H, N, d] views would be strided matmul inputs
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    received = stats is not None and stats.received
    if received:
        rec_sum = torch.zeros(B, H, K, device=dev)
        rec_cnt = torch.zeros(B, K, device=dev)
    outs, rows = [], {}
    for q0 in range(0, Q, block):
        q1 = min(Q, q0 + block)
        k_hi = off + q1 if causal else K
        k_lo = max(0, off + q0 - sliding_window + 1) if sliding_window is not None else 0
        q_idx = torch.arange(off + q0, off + q1, device=dev)
        k_idx = torch.arange(k_lo, k_hi, device=dev)
        kp = key_padding[:, k_lo:k_hi] if key_padding is not None else None
        if kp is not None and bool(kp.all()):
            kp = None
        key_pos = key_pos0[:, None] + k_idx[None, :]                            # [B, Kb]
        qb, kb, vb = q[:, :, q0:q1], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi]
        if need_p:
            regions = _structural_regions(q_idx, k_idx, causal, sliding_window)
            vis = None if kp is None else visibility(q_idx, k_idx, causal=causal,
                                                     sliding_window=sliding_window, key_padding=kp)
            out, r, c = _stats_block(qb, kb, vb, vis, scaling, softcap, stats, edits, key_pos, q_idx, k_idx,
                                     regions, kp, causal, sliding_window, sinks, native)
        else:
            vis = visibility(q_idx, k_idx, causal=causal, sliding_window=sliding_window, key_padding=kp)
            out, r, c = _sdpa_block(qb, kb, vb, vis, scaling, edits, key_pos, q_idx, k_idx), {}, {}
        outs.append(out.to(q.dtype))
        for name, t in r.items():
            rows.setdefault(name, []).append(t)
        if received:
            rec_sum[:, :, k_lo:k_hi] += c["received_sum"]
            rec_cnt[:, k_lo:k_hi] += c["received_count"]
    result = {name: torch.cat(ts, dim=2) for name, ts in rows.items()}
    if received:
        result["received_sum"], result["received_count"] = rec_sum, rec_cnt
    return torch.cat(outs, dim=2), result
