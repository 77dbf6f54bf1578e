"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability",
§3, Algorithm 1): walk the graph from the output backwards; tentatively remove a component (patch it
with its value on the corrupted prompt); if the distance to the clean model grows by less than tau,
remove it for good. Distance: KL(clean model || current) of the last-position next-token
distributions (the paper's default), or with ``metric="task"`` the task metric's relative drop
(M_clean - M) / |M_clean|.

- ``acdc_nodes``: node level over all heads (heads patched through ``hook_z``; layers are visited
  from the last to the first, heads in reverse order). Every run starts at the visited layer from
  the cached clean residual (exact: nothing below it has been removed yet).
- ``acdc_edges``: edge level over a candidate set of edges (e.g. ``eap(...).top_edges(100)``),
  edges named as in ``circuits.eap`` (sender -> q/k/v input of a receiving head, or -> logits).
  Removing u -> v adds (a_u(corrupt) - a_u(current run)) to v's input only: the layer of v is run on
  extra copies of the batch, one per receiver with removed edges, and v's q/k/v is taken from its
  copy (only the first copy continues). Edges outside the candidate set stay in the graph
  (``others="keep"``) or are removed from the start (``others="remove"``, the strict reading of "the
  circuit lies within the candidates"; slower). MLPs are senders only.
The runtime is reported in ``Circuit.seconds``.
"""
from __future__ import annotations

import re
import time

import torch

from ..probe.hooks import hook_name
from .circuit import Circuit, head_node
from .eap import graph_names
from .patching import progress_bar, cache_kind, corrupted_values, last_logits


def _distance_fn(task, clean_logits, metric):
    logp_clean = clean_logits.float().log_softmax(-1)                          # [B, V]
    m_clean = float(task.metric(clean_logits))
    if metric == "kl":
        def dist(logits, rows):
            lp = logits.float().log_softmax(-1)
            return float((logp_clean[rows].exp() * (logp_clean[rows] - lp)).sum(-1).sum())
    elif metric == "task":
        def dist(logits, rows):
            return float(((m_clean - task.per_example(logits, rows)) / abs(m_clean)).sum())
    else:
        raise ValueError(f"metric={metric!r}: use 'kl' or 'task'")
    return dist, m_clean


@torch.no_grad()
def acdc_nodes(model, task, tau: float = 0.01, metric: str = "kl", how: str = "resample", batch_size: int = 64,
               check: bool = True, progress: bool = False) -> Circuit:
    """Node-level ACDC over all heads. Node score = the distance increase measured when the head was
    tested (heads with score >= tau are kept: ``params["kept"]``)."""
    t0 = time.time()
    report = task.check(model) if check else (task.report or {})
    L, H = model.cfg.n_layers, model.cfg.n_heads
    B = len(task)
    repl = corrupted_values(model, task, how, "z", batch_size)
    resid = cache_kind(model, task.clean, "resid_pre", batch_size)
    clean_logits = torch.cat([last_logits(model, task.clean[i:i + batch_size]) for i in range(0, B, batch_size)])
    dist, m_clean = _distance_fn(task, clean_logits, metric)
    removed = torch.zeros(L, H, dtype=torch.bool)
    effect = torch.zeros(L, H)
    cur = 0.0
    bar = progress_bar(L * H, "ACDC nodes", progress)
    for l in reversed(range(L)):
        for h in reversed(range(H)):
            trial = removed.clone()
            trial[l, h] = True
            total = 0.0
            for i in range(0, B, batch_size):
                rows = torch.arange(i, min(i + batch_size, B))

                def patch(t, hook, rows=rows, trial=trial):
                    ll = hook.layer()
                    m = trial[ll]
                    if not m.any():
                        return None
                    t = t.clone()
                    new = torch.zeros_like(t) if repl is None else (
                        repl[ll][rows] if repl.shape[1] > 1 else repl[ll].expand(len(rows), *repl.shape[2:])).to(t)
                    t[:, :, m] = new[:, :, m]
                    return t
                logits = model.run_with_hooks(task.clean[rows], fwd_hooks=[(hook_name("z", x), patch) for x in range(l, L)],
                                              start_at_layer=l, resid_pre=resid[l][rows], logits_to_keep=1)[:, -1]
                total += dist(logits, rows)
            d = total / B
            effect[l, h] = d - cur
            if d - cur < tau:
                removed = trial
                cur = d
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    nodes = {head_node(l, h): float(effect[l, h]) for l in range(L) for h in range(H)}
    kept = [head_node(l, h) for l in range(L) for h in range(H) if not removed[l, h]]
    return Circuit(method="acdc-nodes", task=task.name, model=model.cfg.to_dict(), nodes=nodes,
                   params={"tau": tau, "metric": metric, "how": how, "n": B, "kept": kept, "final_distance": cur},
                   paper="Conmy et al. 2023, Towards Automated Circuit Discovery (ACDC), Algorithm 1",
                   m_clean=m_clean, task_report=report, tensors={"removed": removed, "effect": effect},
                   seconds=time.time() - t0)


_RECV = re.compile(r"^L(\d+)(H|KV)(\d+)\.([qkv])$")


def _parse_edge(e, senders, s_index):
    u, v = e.split("->")
    if u not in s_index:
        raise ValueError(f"edge {e!r}: unknown sender {u!r} (expected e.g. 'embed', 'L0H1', 'M3')")
    if v == "logits":
        return u, None
    m = _RECV.match(v)
    if not m:
        raise ValueError(f"edge {e!r}: receiver must be 'L{{l}}H{{h}}.q|k|v', 'L{{l}}KV{{g}}.k|v' or 'logits'")
    return u, (int(m.group(1)), int(m.group(3)), m.group(4))


@torch.no_grad()
def acdc_edges(model, task, candidates, tau: float = 0.01, metric: str = "kl", others: str = "keep",
               batch_size: int = 32, check: bool = True, progress: bool = False) -> Circuit:
    """Edge-level ACDC over ``candidates`` (edge names as in ``circuits.eap``), removing edges by
    patching the sender's corrupted output into that receiver's input only. Edge score = the distance
    increase measured when the edge was tested; ``params["kept"]`` lists the surviving candidates."""
    t0 = time.time()
    if others not in ("keep", "remove"):
        raise ValueError("others must be 'keep' or 'remove'")
    report = task.check(model) if check else (task.report or {})
    cfg = model.cfg
    L = cfg.n_layers
    senders, receivers, s_layer, r_layer = graph_names(cfg)
    s_index = {s: i for i, s in enumerate(senders)}
    cands = list(dict.fromkeys(candidates))
    if not cands:
        raise ValueError("give at least one candidate edge (e.g. eap(model, task).top_edges(100))")
    parsed = {e: _parse_edge(e, senders, s_index) for e in cands}
    for e, (u, v) in parsed.items():
        lu = s_layer[s_index[u]]
        lv = L if v is None else v[0]
        if lu >= lv:
            raise ValueError(f"edge {e!r}: the sender (layer {lu}) must lie below the receiver (layer {lv})")
    B = len(task)
    # removed[receiver key] = set of sender names; receiver key: (l, idx, kind) or "logits"
    removed: dict = {}
    if others == "remove":
        cset = set(cands)
        for si, s in enumerate(senders):
            for ri, r in enumerate(receivers):
                if s_layer[si] < r_layer[ri] and f"{s}->{r}" not in cset:
                    _, v = _parse_edge(f"{s}->{r}", senders, s_index)
                    removed.setdefault(v if v is not None else "logits", set()).add(s)
    clean_logits = torch.cat([last_logits(model, task.clean[i:i + batch_size]) for i in range(0, B, batch_size)])
    dist, m_clean = _distance_fn(task, clean_logits, metric)

    def corrupt_acts(rows):
        names = ["hook_embed"] + [hook_name(k, l) for l in range(L) for k in ("result", "mlp_out")]
        _, c = model.run_with_cache(task.corrupt[rows], names_filter=names, logits_to_keep=1)
        return c

    corr = [corrupt_acts(torch.arange(i, min(i + batch_size, B))) for i in range(0, B, batch_size)]

    def run(rem):
        total = 0.0
        for ci, i in enumerate(range(0, B, batch_size)):
            rows = torch.arange(i, min(i + batch_size, B))
            total += dist(_run_removed(model, task.clean[rows], rem, corr[ci], senders, s_layer), rows)
        return total / B

    cur = run(removed)
    start = cur
    # visit receivers from the output backwards, each receiver's candidate edges senders-last-first
    def order(e):
        u, v = parsed[e]
        return (-(L if v is None else v[0]), -s_layer[s_index[u]])
    effect = {}
    bar = progress_bar(len(cands), "ACDC edges", progress)
    for e in sorted(cands, key=order):
        u, v = parsed[e]
        key = v if v is not None else "logits"
        trial = {k: set(s) for k, s in removed.items()}
        trial.setdefault(key, set()).add(u)
        d = run(trial)
        effect[e] = d - cur
        if d - cur < tau:
            removed, cur = trial, d
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    kept = [e for e in cands if parsed[e][0] not in removed.get(parsed[e][1] if parsed[e][1] else "logits", set())]
    nodes = {}
    for e in kept:
        for n in (e.split("->")[0], e.split("->")[1].split(".")[0]):
            nodes[n] = nodes.get(n, 0.0) + max(effect[e], 0.0)
    return Circuit(method="acdc-edges", task=task.name, model=cfg.to_dict(), nodes=nodes, edges=effect,
                   params={"tau": tau, "metric": metric, "others": others, "n": B, "kept": kept,
                           "n_candidates": len(cands), "start_distance": start, "final_distance": cur},
                   paper="Conmy et al. 2023, Towards Automated Circuit Discovery (ACDC), Algorithm 1",
                   m_clean=m_clean, task_report=report, seconds=time.time() - t0)


def _run_removed(model, tokens, removed, corr, senders, s_layer):
    """Last-position logits with the removed edges patched (see ``acdc_edges``)."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    b = tokens.shape[0]
    cur = {}                                            # sender name -> current activation [b, N, D]

    def grab_embed(t, hook):
        cur["embed"] = t[:b]

    def grab_result(t, hook):
        l = hook.layer()
        for h in range(H):
            cur[head_node(l, h)] = t[:b, :, h]

    def grab_mlp(t, hook):
        cur[f"M{hook.layer()}"] = t[:b]

    def corr_of(s):
        if s == "embed":
            return corr["hook_embed"]
        if s.startswith("M"):
            return corr["mlp_out", int(s[1:])]
        l, h = (int(x) for x in s[1:].split("H"))
        return corr["result", l][:, :, h]

    def shift(srcs):
        return sum(corr_of(s).to(cur[s]) - cur[s] for s in srcs)

    per_layer = {}
    for key, srcs in removed.items():
        if key != "logits" and srcs:
            per_layer.setdefault(key[0], []).append(key)
    hooks = [("hook_embed", grab_embed)] + [(hook_name("result", l), grab_result) for l in range(L)] + \
            [(hook_name("mlp_out", l), grab_mlp) for l in range(L)]
    for l, keys in per_layer.items():
        def expand(t, hook, keys=keys):
            return torch.cat([t] + [t + shift(removed[k]) for k in keys])     # [(1 + m) b, N, D]

        def pick(kind):
            def fn(t, hook, keys=None):
                l = hook.layer()
                t = t.clone()
                for c, k in enumerate(per_layer[l]):
                    if k[2] == kind:
                        t[:b, :, k[1]] = t[(c + 1) * b:(c + 2) * b, :, k[1]]
                return t
            return fn

        def shrink(t, hook):
            return t[:b]
        hooks += [(hook_name("resid_pre", l), expand), (hook_name("q", l), pick("q")), (hook_name("k", l), pick("k")),
                  (hook_name("v", l), pick("v")), (hook_name("resid_post", l), shrink)]
    if removed.get("logits"):
        hooks.append((hook_name("resid_post", L - 1), lambda t, hook: t + shift(removed["logits"])))
    return model.run_with_hooks(tokens, fwd_hooks=hooks, logits_to_keep=1)[:, -1]
