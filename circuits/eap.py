"""Edge attribution patching: EAP (Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery", §3) and EAP-IG (Hanna, Pezzelle & Belinkov 2024, "Have Faith in
Faithfulness", §3, eq. 2), at node and at edge level.

Senders u: the token embedding ("embed"), every head ("L{l}H{h}", its write to the residual =
``hook_result``) and every MLP ("M{l}", ``hook_mlp_out``). Receivers v: every head's q input
("L{l}H{h}.q") and every KV head's k and v inputs ("L{l}H{g}.k" / ".v", or "L{l}KV{g}.k" under GQA,
where one k/v input serves the group's query heads), and the logits ("logits"). The input of a
receiver in layer l is the residual stream ``blocks.{l}.hook_resid_pre`` as seen through that
head's q/k/v projection only:

    score(u -> v) = sum over prompts and positions of (a_u(corrupt) - a_u(clean)) . dM/d(input of v)

(M = the task metric averaged over prompts.) dM/d(input of v) is the vector-Jacobian product of
dM/d(hook_q|k|v of that head) back through the layer's own norm and projection to hook_resid_pre
(autograd on the layer-local graph), so no architecture-specific code is involved. For EAP the
gradient is taken on the clean run; for EAP-IG it is averaged over ``steps`` runs whose token
embeddings lie on the straight line from the corrupted to the clean embeddings (alpha = i/steps,
i = 1..steps). Node scores use the same rule on the node's own output (hook_z for heads,
hook_mlp_out for MLPs) and are reported like patching, as the estimated relative drop
-(score)/M_clean. Edge scores are estimated metric changes (rank by |score|).

Architectures that normalise a sublayer's output before adding it to the residual (Gemma-3's
post-attention / post-feedforward norms) make the head write non-linear in hook_result; there the
edge scores are first-order estimates through that norm's input, and node scores stay exact in form.
"""
from __future__ import annotations

import time

import torch

from ..probe.hooks import hook_name
from .circuit import Circuit, head_node
from .patching import progress_bar


def graph_names(cfg):
    """(senders, receivers, sender_layer, receiver_layer) for a model config."""
    L, H, G = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    senders, s_layer = ["embed"], [-1]
    for l in range(L):
        senders += [head_node(l, h) for h in range(H)] + [f"M{l}"]
        s_layer += [l] * (H + 1)
    kv = (lambda l, g: f"L{l}H{g}") if G == H else (lambda l, g: f"L{l}KV{g}")
    receivers, r_layer = [], []
    for l in range(L):
        receivers += [f"L{l}H{h}.q" for h in range(H)] + [f"{kv(l, g)}.k" for g in range(G)] + \
                     [f"{kv(l, g)}.v" for g in range(G)]
        r_layer += [l] * (H + 2 * G)
    receivers.append("logits")
    r_layer.append(L)
    return senders, receivers, s_layer, r_layer


@torch.no_grad()
def _activations(model, tokens):
    """Sender activations [S, b, N, D] (embed, per layer heads then MLP) and the embedding."""
    L = model.cfg.n_layers
    names = ["hook_embed"] + [hook_name(k, l) for l in range(L) for k in ("result", "mlp_out")]
    _, c = model.run_with_cache(tokens, names_filter=names, logits_to_keep=1)
    parts = [c["hook_embed"][None]]
    for l in range(L):
        parts += [c["result", l].permute(2, 0, 1, 3), c["mlp_out", l][None]]
    return torch.cat(parts).float(), c["hook_embed"]


def _grad_pass(model, task, rows, tokens, embed, edges: bool, scale: float):
    """One forward/backward with the given input embedding [b, N, D]. Returns (receiver grads per
    layer: list of [R_l, b, N, D], logits grad [b, N, D], node grads: z [L, b, N, H, d], mlp [L, b, N, D])."""
    L, H, G = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads
    refs = {}

    def keep(t, hook):
        refs[hook.name] = t

    def emb(t, hook):
        return embed.detach().to(t.dtype).requires_grad_(True)
    kinds = ("z", "mlp_out") + (("resid_pre", "q", "k", "v") if edges else ())
    hooks = [("hook_embed", emb)] + [(hook_name(k, l), keep) for l in range(L) for k in kinds]
    hooks.append((hook_name("resid_post", L - 1), keep))
    with torch.enable_grad():
        with model.hooks(hooks):
            logits = model(tokens, logits_to_keep=1)
        M = task.per_example(logits, rows).sum() * scale
        want = [refs[hook_name("z", l)] for l in range(L)] + [refs[hook_name("mlp_out", l)] for l in range(L)]
        want.append(refs[hook_name("resid_post", L - 1)])
        if edges:
            want += [refs[hook_name(k, l)] for l in range(L) for k in ("q", "k", "v")]
        grads = torch.autograd.grad(M, want, retain_graph=edges, allow_unused=True)
        gz = torch.stack([g if g is not None else torch.zeros_like(w) for g, w in zip(grads[:L], want[:L])])
        gm = torch.stack([g if g is not None else torch.zeros_like(w) for g, w in zip(grads[L:2 * L], want[L:2 * L])])
        g_logits = grads[2 * L]
        recv = []
        if edges:
            gqkv = grads[2 * L + 1:]
            for l in range(L):
                x = refs[hook_name("resid_pre", l)]
                per = []
                for j, (k, n) in enumerate((("q", H), ("k", G), ("v", G))):
                    t = refs[hook_name(k, l)]
                    g = gqkv[3 * l + j]
                    for h in range(n):
                        if g is None:
                            per.append(torch.zeros_like(x))
                            continue
                        m = torch.zeros_like(g)
                        m[:, :, h] = g[:, :, h]
                        vj = torch.autograd.grad(t, x, m, retain_graph=True, allow_unused=True)[0]
                        per.append(vj if vj is not None else torch.zeros_like(x))
                recv.append(torch.stack(per).float())
    return recv, g_logits.float(), gz.float(), gm.float()


def attribute(model, task, method: str = "eap", steps: int = 5, edges: bool = True, batch_size: int = 8,
              check: bool = True, progress: bool = False) -> Circuit:
    """EAP ("eap") or EAP-IG ("eap-ig", ``steps`` points) node and edge scores as a ``Circuit``.
    Node scores: estimated relative drop of the metric when the node is patched with its corrupted
    value (comparable to ``patch_heads(how="resample")``); edge scores: estimated metric change
    (ranked by |score|)."""
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"method={method!r}: use 'eap' or 'eap-ig'")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    t0 = time.time()
    report = task.check(model) if check else (task.report or {})
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    senders, receivers, s_layer, r_layer = graph_names(cfg)
    S, R = len(senders), len(receivers)
    edge_scores = torch.zeros(S, R)
    node_heads = torch.zeros(L, H)
    node_mlps = torch.zeros(L)
    B = len(task)
    alphas = [1.0] if method == "eap" else [i / steps for i in range(1, steps + 1)]
    bar = progress_bar(((B + batch_size - 1) // batch_size) * len(alphas), method, progress)
    m_clean = 0.0
    s_layer_t = torch.tensor(s_layer)
    for i in range(0, B, batch_size):
        rows = torch.arange(i, min(i + batch_size, B))
        a_clean, e_clean = _activations(model, task.clean[rows])
        a_corr, e_corr = _activations(model, task.corrupt[rows])
        delta = a_corr - a_clean                                             # [S, b, N, D]
        with torch.no_grad():
            _, cz = model.run_with_cache(task.clean[rows], names_filter=[hook_name("z", l) for l in range(L)])
            _, kz = model.run_with_cache(task.corrupt[rows], names_filter=[hook_name("z", l) for l in range(L)])
            dz = torch.stack([kz["z", l] - cz["z", l] for l in range(L)]).float()   # [L, b, N, H, d]
            m_clean += float(task.per_example(model(task.clean[rows], logits_to_keep=1), rows).sum())
        d_mlp = delta[s_layer_t >= 0].view(L, H + 1, *delta.shape[1:])[:, H]  # [L, b, N, D]
        acc = None
        for a in alphas:
            emb = e_corr + a * (e_clean - e_corr)
            recv, gl, gz, gm = _grad_pass(model, task, rows, task.clean[rows], emb, edges, 1.0 / B)
            part = (recv, gl, gz, gm)
            acc = part if acc is None else (
                [x + y for x, y in zip(acc[0], recv)], acc[1] + gl, acc[2] + gz, acc[3] + gm)
            if bar is not None:
                bar.update(1)
        k = len(alphas)
        recv, gl, gz, gm = [x / k for x in acc[0]], acc[1] / k, acc[2] / k, acc[3] / k
        node_heads += (dz * gz).sum((1, 2, 4))
        node_mlps += (d_mlp * gm).sum((1, 2, 3))
        flat = delta.flatten(1)                                              # [S, b*N*D]
        if edges:
            r0 = 0
            for l in range(L):
                n_send = int((s_layer_t < l).sum())
                g = recv[l].flatten(1)                                       # [R_l, b*N*D]
                edge_scores[:n_send, r0:r0 + g.shape[0]] += flat[:n_send] @ g.T
                r0 += g.shape[0]
            edge_scores[:, -1] += flat @ gl.flatten()
        del delta, flat, a_clean, a_corr
    if bar is not None:
        bar.close()
    m_clean /= B
    rel = -node_heads / m_clean
    nodes = {head_node(l, h): float(rel[l, h]) for l in range(L) for h in range(H)}
    nodes.update({f"M{l}": float(-node_mlps[l] / m_clean) for l in range(L)})
    valid = torch.tensor(s_layer)[:, None] < torch.tensor(r_layer)[None, :]
    edge_dict = {}
    if edges:
        for si, ri in torch.nonzero(valid).tolist():
            edge_dict[f"{senders[si]}->{receivers[ri]}"] = float(edge_scores[si, ri])
    paper = ("Syed et al. 2023, Attribution Patching Outperforms Automated Circuit Discovery" if method == "eap" else
             "Hanna et al. 2024, Have Faith in Faithfulness (EAP-IG)")
    return Circuit(method=method, task=task.name, model=cfg.to_dict(), nodes=nodes, edges=edge_dict,
                   params={"steps": len(alphas), "n": B, "edges": edges, "rank_by_abs": True,
                           "node_score": "estimated relative drop -(delta a . grad)/M_clean",
                           "edge_score": "estimated metric change (delta a . grad), rank by |score|"},
                   paper=paper, m_clean=m_clean, task_report=report,
                   tensors={"edge_scores": edge_scores, "edge_valid": valid, "node_heads": rel,
                            "node_mlps": -node_mlps / m_clean},
                   seconds=time.time() - t0)


def eap(model, task, **kw) -> Circuit:
    """EAP (Syed et al. 2023): gradients on the clean run."""
    return attribute(model, task, "eap", **kw)


def eap_ig(model, task, steps: int = 5, **kw) -> Circuit:
    """EAP-IG (Hanna et al. 2024), ``steps`` = 5 by default."""
    return attribute(model, task, "eap-ig", steps=steps, **kw)
