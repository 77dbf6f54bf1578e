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
embeddings lie on the straight line e_corr + alpha (e_clean - e_corr) from the corrupted to the
clean embeddings. The points follow the reference code, hannamw/EAP-IG ``get_scores_eap_ig``
(``for step in range(0, steps)``): alpha = i/steps, i = 0..steps-1, so the corrupted input is one
point and the clean input none (``ig_points="code"``, the default); ``ig_points="paper"`` takes
i = 1..steps (the right Riemann sum of Hanna et al. 2024, eq. 2, as in Sundararajan et al. 2017),
whose last point is the clean run itself. Node scores use the same rule on the node's own output (hook_z for heads,
hook_mlp_out for MLPs) and are reported like patching, as the estimated relative drop
-(score)/M_clean. Edge scores are estimated metric changes (rank by |score|).

Architectures that normalise a sublayer's output before adding it to the residual (Gemma-3's
post-attention / post-feedforward norms) make the head write non-linear in hook_result; there the
edge scores are first-order estimates through that norm's input, and node scores stay exact in form.
"""
from __future__ import annotations

import logging
import time

import torch

from ..probe.hooks import hook_name
from .circuit import Circuit, head_node
from .patching import progress_bar, row_chunks


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


def node_kinds(edges: bool) -> tuple:
    """Hook kinds whose values the scores need: z and mlp_out for node scores, result (each head's
    write to the residual) too for edge scores."""
    return ("z", "mlp_out") + (("result",) if edges else ())


@torch.no_grad()
def run_activations(model, tokens, edges: bool):
    """One forward without gradients: ({"embed": [b, N, D], "z": [L, b, N, H, d], "mlp_out": [L, b, N, D],
    "result": [L, b, N, H, D] (edges only)}, last-position logits [b, vocab])."""
    L = model.cfg.n_layers
    kinds = node_kinds(edges)
    names = ["hook_embed"] + [hook_name(k, l) for l in range(L) for k in kinds]
    logits, c = model.run_with_cache(tokens, names_filter=names, logits_to_keep=1)
    out = {k: torch.stack([c[k, l] for l in range(L)]).float() for k in kinds}
    out["embed"] = c["hook_embed"].float()
    return out, logits[:, -1]


def corrupt_activations(model, tokens, edges: bool) -> dict:
    """One forward on the corrupted prompts: the activations of ``run_activations``."""
    return run_activations(model, tokens, edges)[0]


IG_POINTS = ("code", "paper")


def ig_alphas(steps: int, points: str = "code") -> list:
    """EAP-IG interpolation points alpha (input = e_corr + alpha (e_clean - e_corr)), one per step.
    "code": i/steps for i = 0..steps-1, as hannamw/EAP-IG's ``get_scores_eap_ig`` (its loop
    ``for step in range(0, steps)``); "paper": i = 1..steps (Hanna et al. 2024, "Have Faith in
    Faithfulness", §3 eq. 2). Where the reference code and the paper differ, the code is the default."""
    if points not in IG_POINTS:
        raise ValueError(f"ig_points={points!r}: use 'code' (hannamw/EAP-IG, i = 0..steps-1) or 'paper' (i = 1..steps)")
    first = 0 if points == "code" else 1
    return [i / steps for i in range(first, first + steps)]


def sender_stack(acts: dict) -> torch.Tensor:
    """Sender activations in ``graph_names`` order (embed, then per layer its heads and its MLP):
    [S, b, N, D] from {"embed": [b, N, D], "result": [L, b, N, H, D], "mlp_out": [L, b, N, D]}."""
    parts = [acts["embed"][None]]
    for l in range(acts["result"].shape[0]):
        parts += [acts["result"][l].permute(2, 0, 1, 3), acts["mlp_out"][l][None]]
    return torch.cat(parts)


BATCHED_VJP = {"ok": True}       # set to False after the batched backward failed once (then: one call per receiver)


def receiver_vjps(outs, grads, x) -> torch.Tensor:
    """dM/d(input of each receiver of one layer): [H + 2G, b, N, D]. ``outs`` = (q [b, N, H, d],
    k [b, N, G, d], v [b, N, G, d]) as the hooks saw them, ``grads`` = dM/d each (None: unused),
    ``x`` = the layer's hook_resid_pre. The receiver of head h's q input gets the vector-Jacobian
    product of dM/dq with every head but h masked out, through the layer's own norm and projection
    (likewise k, v per KV head). All receivers of the layer go in one batched backward call
    (``is_grads_batched``); where that cannot run, one call per receiver (same numbers, slower)."""
    grads = [g if g is not None else torch.zeros_like(t) for t, g in zip(outs, grads)]
    n = [t.shape[2] for t in outs]                                          # H, G, G
    R = sum(n)
    batched = [torch.zeros((R,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in outs]   # [R, b, N, heads, d]
    r = 0
    for j, (g, nj) in enumerate(zip(grads, n)):
        for h in range(nj):
            batched[j][r, :, :, h] = g[:, :, h]
            r += 1
    if BATCHED_VJP["ok"]:
        try:
            vj = torch.autograd.grad(outs, x, batched, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)[0]
            return torch.zeros((R,) + tuple(x.shape), device=x.device) if vj is None else vj.float()
        except RuntimeError as e:                                               # an op without a batching rule
            BATCHED_VJP["ok"] = False
            logging.getLogger(__name__).warning(
                "edge-level EAP: the batched backward over a layer's receivers failed (%s); computing one "
                "receiver at a time (same scores, slower)", str(e).splitlines()[0])
    per = []
    for i in range(R):
        vj = torch.autograd.grad(outs, x, [b[i] for b in batched], retain_graph=True, allow_unused=True)[0]
        per.append(torch.zeros_like(x) if vj is None else vj)
    return torch.stack(per).float()


def _grad_pass(model, task, rows, tokens, e_corr, alpha: float, edges: bool, scale: float):
    """One forward/backward on the clean tokens with the token embedding replaced by
    e_corr + alpha (e_clean - e_corr) (alpha = 1: the clean embedding itself, exactly).
    Returns (receiver grads per layer: list of [R_l, b, N, D], logits grad [b, N, D], node grads:
    z [L, b, N, H, d], mlp [L, b, N, D], and at alpha = 1 the clean run: (activations as
    ``corrupt_activations`` returns them, metric summed over the rows))."""
    L = model.cfg.n_layers
    refs = {}

    def keep(t, hook):
        refs[hook.name] = t

    def emb(t, hook):
        refs["hook_embed"] = t.detach()
        x = t.detach() if alpha == 1.0 else e_corr.to(t.dtype) + alpha * (t.detach() - e_corr.to(t.dtype))
        return x.requires_grad_(True)
    kinds = node_kinds(edges and alpha == 1.0) + (("resid_pre", "q", "k", "v") if edges else ())
    hooks = [("hook_embed", emb)] + [(hook_name(k, l), keep) for l in range(L) for k in kinds]
    hooks.append((hook_name("resid_post", L - 1), keep))
    with torch.enable_grad():
        with model.hooks(hooks):
            logits = model(tokens, logits_to_keep=1)
        per_ex = task.per_example(logits, rows)
        M = per_ex.sum() * scale
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
                outs = tuple(refs[hook_name(k, l)] for k in ("q", "k", "v"))
                recv.append(receiver_vjps(outs, gqkv[3 * l:3 * l + 3], refs[hook_name("resid_pre", l)]))
    clean = None
    if alpha == 1.0:
        acts = {k: torch.stack([refs[hook_name(k, l)].detach() for l in range(L)]).float()
                for k in node_kinds(edges)}
        acts["embed"] = refs["hook_embed"].float()
        clean = (acts, float(per_ex.detach().sum()))
    return recv, g_logits.float(), gz.float(), gm.float(), clean


def clean_run(model, task, rows, edges: bool):
    """The clean run of ``rows`` when no gradient pass was one (EAP-IG with ``ig_points="code"``):
    (activations as ``run_activations`` returns them, metric summed over the rows)."""
    acts, logits = run_activations(model, task.clean[rows], edges)
    return acts, float(task.per_example(logits, rows).sum())


def attribute(model, task, method: str = "eap", steps: int = 5, edges: bool = True, batch_size: int | None = None,
              check: bool = True, progress: bool = False, ig_points: str = "code") -> Circuit:
    """EAP ("eap") or EAP-IG ("eap-ig", ``steps`` points) node and edge scores as a ``Circuit``.
    Node scores: estimated relative drop of the metric when the node is patched with its corrupted
    value (comparable to ``patch_heads(how="resample")``); edge scores: estimated metric change
    (ranked by |score|).

    ``ig_points`` (EAP-IG only): "code" (default, alpha = i/steps for i = 0..steps-1, as
    hannamw/EAP-IG) or "paper" (i = 1..steps, Hanna et al. 2024 eq. 2); see ``ig_alphas``.

    Cost per batch of prompts: one forward on the corrupted prompts (their activations) and one
    forward + backward per step on the clean tokens (EAP: 1 step, the clean run, whose activations
    and metric are kept; EAP-IG: ``steps``; with ``ig_points="paper"`` the last one, alpha = 1, is
    the clean run, with "code" one more forward without gradients reads the clean run). ``batch_size``
    (default 64 prompts, 32 with ``edges``: the edge scores hold a [receivers, batch, pos, d_model]
    gradient per layer): prompts per pass, split into near-equal batches; few large batches run
    much faster on a CPU than many small ones."""
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
    alphas = [1.0] if method == "eap" else ig_alphas(steps, ig_points)
    m_clean = 0.0
    s_layer_t = torch.tensor(s_layer)
    batches = row_chunks(B, batch_size or (32 if edges else 64))
    bar = progress_bar(len(batches) * len(alphas), method, progress)
    for i, j in batches:
        rows = torch.arange(i, j)
        corr = corrupt_activations(model, task.corrupt[rows], edges)
        acc, clean = None, None
        for a in alphas:
            recv, gl, gz, gm, cl = _grad_pass(model, task, rows, task.clean[rows], corr["embed"], a, edges, 1.0 / B)
            clean = cl if cl is not None else clean
            part = (recv, gl, gz, gm)
            acc = part if acc is None else (
                [x + y for x, y in zip(acc[0], recv)], acc[1] + gl, acc[2] + gz, acc[3] + gm)
            if bar is not None:
                bar.update(1)
        k = len(alphas)
        recv, gl, gz, gm = [x / k for x in acc[0]], acc[1] / k, acc[2] / k, acc[3] / k
        cacts, m_sum = clean if clean is not None else clean_run(model, task, rows, edges)
        m_clean += m_sum
        node_heads += ((corr["z"] - cacts["z"]) * gz).sum((1, 2, 4)).cpu()          # dz [L, b, N, H, d]
        node_mlps += ((corr["mlp_out"] - cacts["mlp_out"]) * gm).sum((1, 2, 3)).cpu()
        if edges:
            flat = (sender_stack(corr) - sender_stack(cacts)).flatten(1)      # [S, b*N*D]
            r0 = 0
            for l in range(L):
                n_send = int((s_layer_t < l).sum())
                g = recv[l].flatten(1)                                       # [R_l, b*N*D]
                edge_scores[:n_send, r0:r0 + g.shape[0]] += (flat[:n_send] @ g.T).cpu()
                r0 += g.shape[0]
            edge_scores[:, -1] += (flat @ gl.flatten()).cpu()
            del flat
        del corr, clean, cacts
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
                   params={"steps": len(alphas), "alphas": alphas, "n": B, "edges": edges, "rank_by_abs": True,
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
    """EAP-IG (Hanna et al. 2024), ``steps`` = 5 by default; interpolation points as hannamw/EAP-IG
    (``ig_points="code"``, alpha = i/steps, i = 0..steps-1) unless ``ig_points="paper"`` (i = 1..steps)."""
    return attribute(model, task, "eap-ig", steps=steps, **kw)
