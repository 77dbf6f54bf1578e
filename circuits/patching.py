"""Activation patching per head and per MLP, and path patching, through the probe's hooks.

Node patching (Wang et al. 2022, §3; Meng et al. 2022 for the causal-tracing idea; ablation choices
after Conmy et al. 2023, §4 and Zhang & Nanda 2024, "Towards Best Practices of Activation Patching"):
a head's output z (``blocks.{l}.attn.hook_z``, [batch, pos, head, d_head]) is replaced at every
position (or the given positions) by
  "mean":     its mean over the task's corrupted prompts at the same position,
  "zero":     0,
  "resample": its value on the paired corrupted prompt,
and the score is the relative drop of the task metric, (M_clean - M_patched) / M_clean.

Each head gets its own run. Runs are batched over prompts and over the heads of one layer (a row of
the batch is one prompt with one head patched), start at the patched layer from the cached clean
residual (``start_at_layer``; exact, since nothing below the layer changes) and compute logits at the
last position only.

Path patching (Wang et al. 2022, §3.1): the sender head's output is patched with its corrupted value
while every other head is frozen at its clean value (MLPs recompute); the receivers' inputs (their q,
k or v, or the final residual for the logits) are recorded from that run and patched into a clean run.
The senders of one layer and the prompts are batched as rows (sender, prompt); both runs start from
the cached clean residual (the first at the sender's layer, the second at the lowest receiver layer).
"""
from __future__ import annotations

import time

import torch

from ..heads.scores import HeadScores
from ..probe.hooks import hook_name
from .tasks import Task

HOWS = ("mean", "zero", "resample")


def progress_bar(total, desc, progress):
    """A tqdm bar of ``total`` steps labelled ``desc``, or None when ``progress`` is false."""
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


def last_logits(model, tokens, **kw) -> torch.Tensor:
    """Logits at the last position [batch, vocab] (HF ``logits_to_keep=1``)."""
    return model(tokens, logits_to_keep=1, **kw)[:, -1]


@torch.no_grad()
def cache_kind(model, tokens, kind: str, batch_size: int = 32) -> torch.Tensor:
    """One hook kind for every layer, stacked: [layer, batch, ...] (e.g. "z": [L, B, pos, H, d_head])."""
    L = model.cfg.n_layers
    outs = []
    for i in range(0, tokens.shape[0], batch_size):
        _, c = model.run_with_cache(tokens[i:i + batch_size], names_filter=[hook_name(kind, l) for l in range(L)],
                                    logits_to_keep=1)
        outs.append(torch.stack([c[kind, l] for l in range(L)]))
    return torch.cat(outs, 1)


def corrupted_values(model, task: Task, how: str, kind: str = "z", batch_size: int = 32):
    """The replacement for ``kind`` per layer: [L, B, pos, ...] ("resample"), [L, 1, pos, ...]
    ("mean" over the corrupted prompts) or None ("zero")."""
    if how not in HOWS:
        raise ValueError(f"how={how!r}: use one of {HOWS}")
    if how == "zero":
        return None
    vals = cache_kind(model, task.corrupt, kind, batch_size)
    return vals.mean(1, keepdim=True) if how == "mean" else vals


def _check_positions(positions, n_pos):
    if positions is None:
        return None
    pos = torch.as_tensor(positions, dtype=torch.long).flatten()
    if pos.numel() == 0 or int(pos.max()) >= n_pos or int(pos.min()) < -n_pos:
        raise ValueError(f"positions {pos.tolist()} must lie in [-{n_pos}, {n_pos}) (the task's prompts have "
                         f"{n_pos} tokens)")
    return pos % n_pos


def row_chunks(n_rows: int, batch_size: int) -> list:
    """Split ``n_rows`` into the fewest chunks of at most ``batch_size`` rows, of near-equal size
    (360 rows at batch_size 256 -> 180 + 180, not 256 + 104): [(start, stop), ...]."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    k = max(1, -(-n_rows // batch_size))
    size = -(-n_rows // k)
    return [(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]


@torch.no_grad()
def clean_resid_and_logits(model, tokens, batch_size: int = 64):
    """One pass over the clean prompts: the residual entering every layer [L, B, N, D] and the
    last-position logits [B, vocab]."""
    L = model.cfg.n_layers
    resid, logits = [], []
    for i in range(0, tokens.shape[0], batch_size):
        lg, c = model.run_with_cache(tokens[i:i + batch_size], names_filter=[hook_name("resid_pre", l) for l in range(L)],
                                     logits_to_keep=1)
        resid.append(torch.stack([c["resid_pre", l] for l in range(L)]))
        logits.append(lg[:, -1])
    return torch.cat(resid, 1), torch.cat(logits)


@torch.no_grad()
def node_setup(model, task, kind: str, how: str, positions=None, batch_size: int = 64) -> dict:
    """What every node-patching run of one sweep shares: the replacement values (``repl`` [L, B|1, N, ...]
    or None for "zero"), the clean residual at each layer (``resid`` [L, B, N, D]), the checked
    positions and M_clean. Computed once per process (a Ray worker computes its own, identically)."""
    B, N = task.clean.shape
    pos = _check_positions(positions, N)
    repl = corrupted_values(model, task, how, kind, batch_size)            # [L, B|1, N, ...] or None
    resid, logits = clean_resid_and_logits(model, task.clean, batch_size)   # [L, B, N, D], [B, V]
    m_clean = float(task.metric(logits))
    if abs(m_clean) < 1e-9:
        raise ValueError(f"the clean metric of {task.name} is 0: relative drops are undefined")
    return {"repl": repl, "resid": resid, "pos": pos, "m_clean": m_clean}


@torch.no_grad()
def node_layer(model, task, kind: str, l: int, us: list, setup: dict, batch_size: int = 64) -> torch.Tensor:
    """Relative drops [len(us)] of patching each unit ``us`` (heads, or [None] = the whole MLP output) of
    layer ``l`` on its own: the unit of work of ``patch_heads`` / ``patch_mlps`` (and of their Ray
    version, ``headscope.app.distributed``)."""
    repl, resid, pos, m_clean = setup["repl"], setup["resid"], setup["pos"], setup["m_clean"]
    B = task.clean.shape[0]
    rows = [(u, b) for u in us for b in range(B)]                           # one row = (unit, prompt)
    vals = []
    for s0, s1 in row_chunks(len(rows), batch_size):
        chunk = rows[s0:s1]
        b_idx = torch.tensor([b for _, b in chunk])
        u_idx = [u for u, _ in chunk]

        def patch(t, hook, b_idx=b_idx, u_idx=u_idx):
            t = t.clone()
            r = torch.arange(t.shape[0])
            if repl is None:
                new = torch.zeros_like(t)
            else:
                src = repl[l]
                new = (src[b_idx] if src.shape[0] > 1 else src.expand(t.shape[0], *src.shape[1:])).to(t)
            if u_idx[0] is None:                                            # whole MLP output [b, N, D]
                if pos is None:
                    t = new.clone()
                else:
                    t[:, pos] = new[:, pos]
                return t
            u = torch.tensor(u_idx)
            if pos is None:
                t[r, :, u] = new[r, :, u]
            else:
                for p in pos.tolist():
                    t[r, p, u] = new[r, p, u]
            return t
        logits = model.run_with_hooks(task.clean[b_idx], fwd_hooks=[(hook_name(kind, l), patch)],
                                      start_at_layer=l, resid_pre=resid[l][b_idx], logits_to_keep=1)[:, -1]
        vals.append(task.per_example(logits, b_idx))
    v = torch.cat(vals).view(len(us), B).mean(1)                              # [n_units]
    return (m_clean - v) / m_clean


def _node_sweep(model, task, kind, units, how, positions, batch_size, check, progress, desc):
    """Shared loop of patch_heads / patch_mlps. units: per layer the list of unit indices (heads) or
    [None] (the whole MLP output). Returns [L, n_units] relative drops and M_clean."""
    if check:
        task.check(model)
    L = model.cfg.n_layers
    setup = node_setup(model, task, kind, how, positions, batch_size)
    n_units = max(len(u) for u in units)
    out = torch.zeros(L, n_units)
    bar = progress_bar(sum(len(u) for u in units), desc, progress)
    for l in range(L):
        out[l, :len(units[l])] = node_layer(model, task, kind, l, units[l], setup, batch_size)
        if bar is not None:
            bar.update(len(units[l]))
    if bar is not None:
        bar.close()
    return out, setup["m_clean"]


def head_scores(model, task: Task, out: torch.Tensor, m_clean: float, how: str, positions, t0: float) -> HeadScores:
    """The HeadScores of ``patch_heads`` from its [L, H] relative drops (shared with the Ray version)."""
    return HeadScores(out, method=f"patch_heads:{how}", paper="Wang et al. 2022, Interpretability in the Wild, §3",
                      params={"how": how, "positions": None if positions is None else list(map(int, positions)),
                              "n": len(task)}, model=model.cfg.to_dict(), dataset=task.name,
                      description="relative drop of the task metric when the head's output is patched",
                      extra={"m_clean": torch.tensor(m_clean)}, seconds=time.time() - t0)


def patch_heads(model, task: Task, how: str = "mean", positions=None, batch_size: int = 512, check: bool = True,
                progress: bool = False) -> HeadScores:
    """Relative drop of the task metric when one head's output is patched: HeadScores [layer, head]
    = (M_clean - M_patched) / M_clean (Wang et al. 2022, §3; see the module docstring for ``how``).
    ``batch_size``: rows (prompt x patched head) per forward; a layer's heads x prompts go in as few
    near-equal forwards as that allows (big matmuls: on a shared 2-core CPU one forward of 360 rows
    ran in 22 s where six of <= 64 rows took 31 s)."""
    t0 = time.time()
    H = model.cfg.n_heads
    out, m = _node_sweep(model, task, "z", [list(range(H))] * model.cfg.n_layers, how, positions, batch_size,
                         check, progress, f"patch heads ({how})")
    return head_scores(model, task, out, m, how, positions, t0)


def patch_mlps(model, task: Task, how: str = "mean", positions=None, batch_size: int = 512, check: bool = True,
               progress: bool = False) -> torch.Tensor:
    """Relative drop per MLP (``blocks.{l}.hook_mlp_out`` patched): [layer]."""
    out, _ = _node_sweep(model, task, "mlp_out", [[None]] * model.cfg.n_layers, how, positions, batch_size, check,
                         progress, f"patch MLPs ({how})")
    return out[:, 0]


# ---------------------------------------------------------------------- path patching
def _receiver_kinds(receivers):
    if receivers == "logits":
        return "logits"
    out = []
    for r in receivers:
        l, h, k = r
        if k not in ("q", "k", "v"):
            raise ValueError(f"receiver {r}: the input must be 'q', 'k' or 'v'")
        out.append((int(l), int(h), k))
    if not out:
        raise ValueError("give at least one receiver (layer, head, 'q'|'k'|'v') or 'logits'")
    return out


@torch.no_grad()
def path_patch(model, task: Task, receivers="logits", senders=None, how: str = "resample", batch_size: int = 512,
               check: bool = True, progress: bool = False) -> HeadScores:
    """Path patching (Wang et al. 2022, §3.1) from each sender head to ``receivers``: "logits" or a
    list of (layer, head, "q"|"k"|"v"). Under GQA, "k"/"v" receivers are KV heads: ``head`` is the
    KV-head index. Senders default to every head below the lowest receiver layer (all heads for
    "logits"). Returns HeadScores [layer, head] of relative drops (0 where a head is no sender;
    ``extra["sender"]`` marks the senders)."""
    t0 = time.time()
    if check:
        task.check(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    recv = _receiver_kinds(receivers)
    top = L if recv == "logits" else min(l for l, _, _ in recv)
    if senders is None:
        senders = [(l, h) for l in range(top) for h in range(H)]
    senders = [(int(l), int(h)) for l, h in senders]
    for l, h in senders:
        if not (0 <= l < top and 0 <= h < H):
            raise ValueError(f"sender ({l}, {h}) must be a head below the receivers' layer {top}")
    repl = corrupted_values(model, task, how, "z", batch_size)               # [L, B|1, N, H, d]
    z_clean = cache_kind(model, task.clean, "z", batch_size)                 # [L, B, N, H, d]
    resid, logits = clean_resid_and_logits(model, task.clean, batch_size)    # [L, B, N, D], [B, V]
    B = len(task)
    m_clean = float(task.metric(logits))
    kinds = None if recv == "logits" else sorted({(l, k) for l, _, k in recv})
    scores = torch.zeros(L, H)
    mask = torch.zeros(L, H, dtype=torch.bool)
    bar = progress_bar(len(senders), "path patching", progress)
    for sl in sorted({l for l, _ in senders}):
        heads = [h for l, h in senders if l == sl]
        rows = [(h, b) for h in heads for b in range(B)]                      # one row = (sender head, prompt)
        vals = []
        for s0, s1 in row_chunks(len(rows), batch_size):
            b_idx = torch.tensor([b for _, b in rows[s0:s1]])
            h_idx = torch.tensor([h for h, _ in rows[s0:s1]])
            r = torch.arange(len(b_idx))

            def freeze(t, hook, b_idx=b_idx, h_idx=h_idx, r=r, sl=sl):
                l = hook.layer()
                new = z_clean[l][b_idx].to(t).clone()                        # every head frozen clean
                if l == sl:
                    if repl is None:
                        new[r, :, h_idx] = 0
                    else:
                        src = repl[l][b_idx] if repl.shape[1] > 1 else repl[l].expand(len(b_idx), *repl.shape[2:])
                        new[r, :, h_idx] = src.to(t)[r, :, h_idx]
                return new
            hooks = [(hook_name("z", l), freeze) for l in range(sl, L)]
            toks = task.clean[b_idx]
            if recv == "logits":
                lg = model.run_with_hooks(toks, fwd_hooks=hooks, start_at_layer=sl, resid_pre=resid[sl][b_idx],
                                          logits_to_keep=1)[:, -1]
            else:
                rec = {}

                def grab(t, hook):
                    rec[hook.name] = t.clone()
                with model.hooks(hooks + [(hook_name(k, l), grab) for l, k in kinds]):
                    model(toks, start_at_layer=sl, resid_pre=resid[sl][b_idx], logits_to_keep=1)

                def put(t, hook):
                    t = t.clone()
                    l = hook.layer()
                    k = hook.name.rsplit("_", 1)[-1]
                    for rl, rh, rk in recv:
                        if rl == l and rk == k:
                            t[:, :, rh] = rec[hook.name][:, :, rh]
                    return t
                lg = model.run_with_hooks(toks, fwd_hooks=[(hook_name(k, l), put) for l, k in kinds],
                                          start_at_layer=top, resid_pre=resid[top][b_idx], logits_to_keep=1)[:, -1]
            vals.append(task.per_example(lg, b_idx))
        v = torch.cat(vals).view(len(heads), B).mean(1)                     # [len(heads)]
        for j, h in enumerate(heads):
            scores[sl, h] = (m_clean - float(v[j])) / m_clean
            mask[sl, h] = True
        if bar is not None:
            bar.update(len(heads))
    if bar is not None:
        bar.close()
    return HeadScores(scores, method="path_patch", paper="Wang et al. 2022, Interpretability in the Wild, §3.1",
                      params={"receivers": receivers if receivers == "logits" else [list(r) for r in recv],
                              "how": how, "n": len(task)}, model=model.cfg.to_dict(), dataset=task.name,
                      description="relative drop of the metric when only the sender->receivers path is patched",
                      extra={"sender": mask, "m_clean": torch.tensor(m_clean)}, seconds=time.time() - t0)
