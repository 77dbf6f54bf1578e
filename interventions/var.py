"""VAR — visual attention redistribution (Kang et al. 2025, "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025; reference repo MICV-yonsei/VisAttnSink),
for text models: the "visual" token group becomes any token group the user names (a document, a
context passage).

1. Massive-activation dimensions (``massive_dims``): the few hidden dimensions where the first
   token's RMS-normalised hidden state (no weight) is huge, |x_d| / rms(x) > tau = 20, at layers >= 2.
2. Sink tokens (``sink_tokens``), per layer l >= 2: tokens whose normalised input to layer l
   (``blocks.l.hook_resid_pre``) exceeds tau on one of those dimensions (§3.1).
3. Redistribution (``var_edits``), every layer from 2 up to the last but one that has a sink token
   inside the target group, every head: on the rows of a head that look at the target group
   (attention on it >= 0.2) but not mostly at its sinks (share of that attention on the group's own
   sink tokens <= rho = 0.5: "target-centric" heads, §4.1), the attention on every sink token of the
   layer (inside the group or not, e.g. the first token) is multiplied by p = 0.6 and the freed mass
   goes to the group's non-sink tokens in proportion to their attention (§4.2; the reference's
   ``VARProcessor.attn_redist`` scales ``text_indices`` and ``vis_indices`` and gives both budgets to
   the image). This is ``ScaleKeys(keys=all sinks, factor=p, target=group, max_ratio=rho,
   min_target=0.2, min_query=group end)``, applied inside the attention path.
4. Query rows: the reference redistributes only the prompt's queries after the target group (during
   decoding, every new token); ``var_edits`` (``min_query``) and the batched path (``var_hooks`` /
   ``evaluate_var`` / ``compare``) do the same by default (``queries="after_target"``);
   ``queries="all"`` edits every row, as methods' wording "selected rows" can also be read.
5. Where the sinks are found: the reference detects each layer's sink tokens inside its patched
   attention forward, from that layer's input in the pass being edited (so after the edits of the
   layers below). ``var_hooks(sinks="edited")`` and ``compare(sinks_from="edited")`` (the default)
   do the same; ``sink_tokens`` / ``var_pass`` find them once in an unedited forward
   (``sinks_from="unedited"``, which ``var_edits``' ScaleKeys need since they name their keys).

Positions are token positions of one unpadded sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..probe import ScaleKeys

Span = tuple[int, int]


def _check_queries(queries: str) -> str:
    """The ``queries`` option of the functions below, or a ValueError saying which exist."""
    if queries not in ("after_target", "all"):
        raise ValueError(f"queries={queries!r}: use 'after_target' (the reference) or 'all' (every query row)")
    return queries


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


def first_token_peak(model, tokens: torch.Tensor, first_layer: int = 2) -> float:
    """max over layers >= ``first_layer`` and dimensions of the first token's normalised |hidden
    state| (at most sqrt(d_model)): how massive the model's massive activations are."""
    res = _resid(model, tokens)
    return max(float(_normalised(res[l][0]).abs().max()) for l in range(first_layer, model.cfg.n_layers))


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
              min_target: float = 0.2, heads=None, queries: str = "after_target") -> list[ScaleKeys]:
    """The VAR edits for one input: per layer in [2, L - 2] with a sink token inside ``target``, every
    sink token of that layer scaled by ``p`` (Kang et al. 2025 §4.2; in- and out-of-group sinks alike,
    as the reference's ``attn_redist``), the freed mass to the group's other tokens, on the rows that
    pass the row rule (§4.1). ``queries="after_target"`` (the reference): only queries at or after
    the group's end (``ScaleKeys.min_query``); ``"all"``: every query row."""
    if not target:
        raise ValueError("VAR needs a target token group: target=[(start, end), ...] token positions")
    _check_queries(queries)
    min_query = max(int(b) for _, b in target) if queries == "after_target" else None
    L = model.cfg.n_layers
    heads = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    inside = lambda t: any(a <= t < b for a, b in target)
    out = []
    for l, pos in sorted(sinks.items()):
        if l < 2 or l >= L - 1:
            continue
        keys = [(t, t + 1) for t in pos]
        if any(inside(t) for t in pos):
            out.append(ScaleKeys(l, heads, keys=keys, factor=p, target=list(target), max_ratio=rho,
                                 min_target=min_target, min_query=min_query))
    return out


# ------------------------------------------------------------------------------------------------
# Batched VAR on a context-grounded task (``tasks.context_qa_task``: every example names its context
# span as ``target``). Sink tokens come from the unedited pass (as ``sink_tokens``); the edit runs as
# a ``hook_pattern`` hook with per-example key masks (``redistribute.redistribute_rows``), equal to
# ``var_edits``' ScaleKeys on each example alone (tests/test_interventions.py).

@dataclass
class VarPass:
    """One unedited pass of VAR (Kang et al. 2025, §3.1 / §4.1) over n examples (``var_pass``). Fields:
    correct [n] bool; margin [n] logit of the right choice minus the best other; sinks per example
    {layer: sink positions in the unpadded sequence}; applies [n, L, H] bool where VAR's row rule holds at
    the last query; target_mass [n, L, H] that query's attention on the target (0 outside layers 2..L-2)."""
    correct: torch.Tensor        # [n] bool, unedited
    margin: torch.Tensor         # [n] logit of the right choice - best other
    sinks: list                  # per example {layer: sink positions (real-token positions)}
    applies: torch.Tensor        # [n, L, H] bool: at the last query, the layer has sink tokens in the
                                 # target and VAR's row rule (sink share <= rho, target mass >= min_target) holds
    target_mass: torch.Tensor    # [n, L, H] attention of the last query on the target group


def _target_mask(examples, pad: list[int], n_pos: int) -> torch.Tensor:
    """[B, N] bool: each example's ``target`` span in left-padded batch columns."""
    m = torch.zeros(len(examples), n_pos, dtype=torch.bool)
    for b, ex in enumerate(examples):
        a, e = ex.target
        m[b, pad[b] + a:pad[b] + e] = True
    return m


def var_pass(model, examples, dims: list[int], tau: float = 20.0, rho: float = 0.5, min_target: float = 0.2,
             batch_size: int = 8, progress: bool = True, desc: str = "VAR pass") -> VarPass:
    """One unedited pass: choice accuracy, each example's sink tokens on layers 2..L-2 (normalised
    input above ``tau`` on the massive dimensions ``dims``), and where VAR's rule would act at the
    last query (the answer's position)."""
    from tqdm.auto import tqdm

    from .evaluate import choice_scores
    from .tasks import batches, pad_id
    if not dims:
        raise ValueError("no massive-activation dimensions given: run massive_dims first")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(2, L - 1))
    correct, margin, sinks, applies, tmass = [], [], [], [], []
    n_b = (len(examples) + batch_size - 1) // batch_size
    for i0, (toks, mask, choices, labels) in tqdm(zip(range(0, len(examples), batch_size),
                                                      batches(examples, batch_size, pad_id(model))),
                                                  total=n_b, desc=desc, disable=not progress):
        B, N = toks.shape
        chunk = examples[i0:i0 + B]
        pad = (N - mask.sum(-1)).tolist()
        real = mask.bool()
        tgt = _target_mask(chunk, pad, N)
        smask: dict[int, torch.Tensor] = {}
        app = torch.zeros(B, L, H, dtype=torch.bool)
        tm = torch.zeros(B, L, H)

        def on_resid(t, hook):
            x = _normalised(t)[:, :, dims].abs().amax(-1)                            # [B, N]
            smask[hook.layer()] = (x > tau).cpu() & real

        def on_pattern(p, hook):
            l = hook.layer()
            last = p[:, :, -1, :].float()                                            # [B, H, K]
            st = (smask[l] & tgt).to(p.device)
            m_t = (last * tgt.to(p.device)[:, None]).sum(-1)                          # [B, H]
            m_s = (last * st[:, None]).sum(-1)
            rule = (m_s / m_t.clamp_min(1e-30) <= rho) & (m_t >= min_target) & st.any(-1)[:, None]
            app[:, l] = rule.cpu()
            tm[:, l] = m_t.cpu()

        hooks = [(f"blocks.{l}.hook_resid_pre", on_resid) for l in layers] + \
                [(f"blocks.{l}.attn.hook_pattern", on_pattern) for l in layers]
        with torch.no_grad(), model.hooks(hooks):
            lg = model(toks, attention_mask=mask, logits_to_keep=1)[:, -1]
        c, mg = choice_scores(lg, choices, labels)
        correct.append(c)
        margin.append(mg)
        applies.append(app)
        tmass.append(tm)
        for b in range(B):
            sinks.append({l: (smask[l][b].nonzero().flatten() - pad[b]).tolist() for l in layers})
    return VarPass(torch.cat(correct), torch.cat(margin), sinks, torch.cat(applies), torch.cat(tmass))


def query_rows(examples, pad: list[int], n_pos: int, queries: str = "after_target") -> torch.Tensor | None:
    """[B, N] bool: the query rows VAR may change in a left-padded batch. ``"after_target"``: positions
    at or after each example's target end (the reference's prefill rule, ``attn_redist``:
    ``query_coord[im + pa <= query_coord]``); ``"all"``: None, every row (``var_edits``)."""
    if _check_queries(queries) == "all":
        return None
    cols = torch.arange(n_pos)
    ends = torch.tensor([pad[b] + ex.target[1] for b, ex in enumerate(examples)])
    return cols[None, :] >= ends[:, None]


SINKS_FROM = ("edited", "unedited")


def _check_sinks_from(sinks_from: str) -> str:
    if sinks_from not in SINKS_FROM:
        raise ValueError(f"sinks_from={sinks_from!r}: use 'edited' (the reference: each layer's sinks from its "
                         "input in the edited pass) or 'unedited' (from var_pass's unedited forward)")
    return sinks_from


def var_hooks(examples, sinks, heads, pad: list[int], n_pos: int, n_layers: int, n_heads: int,
              p: float = 0.6, rho: float = 0.5, min_target: float = 0.2, queries: str = "after_target",
              dims: list[int] | None = None, tau: float = 20.0):
    """fwd_hooks applying VAR (``var_edits``' rule) to ``heads`` [(layer, head)] (None: every head of
    layers 2..L-2) of a left-padded batch of ``examples``; ``queries`` which rows may change
    (``query_rows``). ``sinks``: per-example {layer: sink positions} found before the pass
    (``var_pass``), or ``"edited"``: each edited layer finds its sink tokens in this pass, from its
    own input (``hook_resid_pre``, after the edits of the layers below; normalised value above
    ``tau`` on the massive dimensions ``dims``), as the reference's patched attention forward does."""
    from .redistribute import redistribute_rows
    rows = query_rows(examples, pad, n_pos, queries)                                   # [B, N] or None
    if heads is None:
        heads = [(l, h) for l in range(2, n_layers - 1) for h in range(n_heads)]
    tgt = _target_mask(examples, pad, n_pos)                                          # [B, N]
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        if 2 <= int(l) < n_layers - 1:
            by_layer.setdefault(int(l), []).append(int(h))
    if isinstance(sinks, str):
        if sinks != "edited":
            raise ValueError(f"sinks={sinks!r}: give per-example sink positions or 'edited'")
        if not dims:
            raise ValueError("sinks='edited' needs the massive dimensions: dims=massive_dims(model, tokens, tau)")
        return _live_var_hooks(by_layer, tgt, rows, pad, n_pos, n_heads, p, rho, min_target, dims, tau)
    hooks = []
    for l, hh in sorted(by_layer.items()):
        src = torch.zeros(len(examples), n_heads, n_pos, dtype=torch.bool)
        for b, s in enumerate(sinks):
            pos = [pad[b] + t for t in s.get(l, ())]
            if pos:
                cols = torch.zeros(n_pos, dtype=torch.bool)
                cols[pos] = True
                if (cols & tgt[b]).any():                   # VAR acts only with a sink inside the group
                    src[b, hh] = cols                        # ... and then scales every sink (§4.2)
        if src.any():
            hooks.append((f"blocks.{l}.attn.hook_pattern",
                          lambda pr, hook, src=src: redistribute_rows(pr, src, tgt[:, None], p, rho, min_target,
                                                                      rows)))
    return hooks


def _live_var_hooks(by_layer, tgt, rows, pad, n_pos, n_heads, p, rho, min_target, dims, tau):
    """``var_hooks`` with the sink tokens found in the edited pass: per edited layer, a
    ``hook_resid_pre`` hook marks the sink tokens of each example from the layer's input [B, N, d]
    (padding never a sink), and the layer's ``hook_pattern`` hook redistributes on them."""
    from .redistribute import redistribute_rows
    B = tgt.shape[0]
    real = torch.arange(n_pos)[None, :] >= torch.as_tensor(pad)[:, None]                # [B, N]
    found: dict[int, torch.Tensor] = {}

    def on_resid(t, hook):
        x = _normalised(t)[:, :, dims].abs().amax(-1)                                  # [B, N]
        found[hook.layer()] = (x > tau).cpu() & real

    def on_pattern(pr, hook, hh):
        cols = found.pop(hook.layer())                                                 # [B, N]
        cols = cols & (cols & tgt).any(-1, keepdim=True)     # VAR acts only with a sink inside the group
        if not cols.any():
            return pr
        src = torch.zeros(B, n_heads, n_pos, dtype=torch.bool)
        src[:, hh] = cols[:, None]                           # ... and then scales every sink (§4.2)
        return redistribute_rows(pr, src, tgt[:, None], p, rho, min_target, rows)

    hooks = []
    for l, hh in sorted(by_layer.items()):
        hooks += [(f"blocks.{l}.hook_resid_pre", on_resid),
                  (f"blocks.{l}.attn.hook_pattern", lambda pr, hook, hh=hh: on_pattern(pr, hook, hh))]
    return hooks


def evaluate_var(model, examples, sinks, heads=None, p: float = 0.6, rho: float = 0.5,
                 min_target: float = 0.2, batch_size: int = 8, via: str = "hooks", queries: str = "after_target",
                 dims: list[int] | None = None, tau: float = 20.0):
    """(correct [n] bool, margin [n]) with VAR on ``heads`` (None: all heads of layers 2..L-2).
    ``sinks``: per-example {layer: positions} (``var_pass``'s, from the unedited forward), or
    ``"edited"`` with ``dims`` and ``tau``: found layer by layer in the edited pass (``var_hooks``).
    ``via="edits"``: one forward per example with ``var_edits``' ScaleKeys (given sinks only);
    ``"hooks"``: batched. Either way the rows per ``queries`` (``query_rows``)."""
    from .evaluate import score_intervention
    _check_queries(queries)
    if isinstance(sinks, str) and via == "edits":
        raise ValueError("via='edits' needs the sink positions before the pass (ScaleKeys name their keys): "
                         "use via='hooks' with sinks='edited', or give var_pass's sinks")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    by_layer = None
    if via == "edits" and heads is not None:
        by_layer = {}
        for l, h in heads:
            by_layer.setdefault(int(l), []).append(int(h))

    def edits_for_example(i):
        eds = []
        for l, pos in sinks[i].items():
            if by_layer is not None and l not in by_layer:
                continue
            eds += var_edits(model, {l: pos}, [tuple(examples[i].target)], p, rho, min_target,
                             heads=None if by_layer is None else by_layer[l], queries=queries)
        return eds

    return score_intervention(
        model, examples,
        hooks_for_batch=lambda rows, pad, n_pos: var_hooks(examples[rows], sinks if isinstance(sinks, str)
                                                           else sinks[rows], heads, pad, n_pos, L, H,
                                                           p, rho, min_target, queries, dims, tau),
        edits_for_example=edits_for_example, batch_size=batch_size, via=via)


def compare(model, calibration, test, p: float = 0.6, rho: float = 0.5, min_target: float = 0.2,
            tau: float | None = 20.0, select_rate: float = 0.5, n_random: int = 10, seed: int = 0,
            batch_size: int = 8, via: str = "hooks", progress: bool = True, queries: str = "after_target",
            sinks_from: str = "edited"):
    """VAR end to end on context examples (``target`` = the context span): base; VAR as in the paper
    (every head of layers 2..L-2, the row rule per query); VAR on the target-centric heads (the rule
    holds at the last query on >= ``select_rate`` of ``calibration``); VAR on ``n_random`` random
    head sets of that size. ``tau`` None: min(20, 0.8 x the first token's peak, ``first_token_peak``).
    ``queries``: the rows VAR may change (``query_rows``; default the reference's, after the context).
    ``sinks_from``: "edited" (the reference, VisAttnSink's patched attention forward: each layer's
    sink tokens come from its input in the edited pass) or "unedited" (found once in the unedited
    forward, ``var_pass``; needed for ``via="edits"``). The head selection and the sink counts in
    ``extra`` come from the unedited passes either way.
    -> (rows [controls.Row], extra dict). Raises ValueError when the model has no massive dimension."""
    from . import controls
    from .evaluate import selected_vs_random
    _check_sinks_from(sinks_from)
    if sinks_from == "edited" and via == "edits":
        raise ValueError("via='edits' needs the sink positions before the pass: use sinks_from='unedited'")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if L < 4:
        raise ValueError(f"{model.cfg.name} has {L} layers: VAR edits layers 2..L-2, none here")
    peak = first_token_peak(model, calibration[0].tokens)
    if tau is None:
        tau = min(20.0, 0.8 * peak)
    dims = massive_dims(model, calibration[0].tokens, tau)
    if not dims:
        raise ValueError(f"no massive-activation dimension above tau = {tau:.2f} on {model.cfg.name} (the first "
                         f"token peaks at {peak:.2f}): VAR finds no sink tokens and cannot change anything; "
                         "lower tau (or tau=None for min(20, 0.8 x peak))")
    vc = var_pass(model, calibration, dims, tau, rho, min_target, batch_size, progress, "VAR pass (calibration)")
    rate = vc.applies.float().mean(0)                                                  # [L, H]
    heads = sorted((l, h) for l in range(2, L - 1) for h in range(H) if rate[l, h] >= select_rate)
    vt = var_pass(model, test, dims, tau, rho, min_target, batch_size, progress, "VAR pass (held-out)")
    kw = dict(p=p, rho=rho, min_target=min_target, batch_size=batch_size, via=via, queries=queries, dims=dims, tau=tau)
    sinks = "edited" if sinks_from == "edited" else vt.sinks
    rows = [controls.Row("base", vt.correct)]
    c_all, m_all = evaluate_var(model, test, sinks, None, **kw)
    rows.append(controls.Row(f"VAR, all heads of layers 2..{L - 2} (paper)", c_all, n_heads=(L - 3) * H))
    extra = {"massive_dims": dims, "first_token_peak": peak, "tau": tau, "p": p, "rho": rho,
             "min_target": min_target, "select_rate": select_rate, "queries": queries, "sinks_from": sinks_from,
             "selected_heads": heads, "n_selected": len(heads),
             "rule_rate_calibration": rate.tolist(),
             "mean_sinks_in_context_per_layer": [
                 sum(sum(1 for t in s.get(l, ()) if ex.target[0] <= t < ex.target[1]) for s, ex in zip(vt.sinks, test))
                 / len(test) for l in range(L)],
             "share_rows_rule_holds_last_query": float(vt.applies[:, 2:L - 1].float().mean()),
             "margin_base": float(vt.margin.mean()), "margin_var_all": float(m_all.mean())}
    if heads:
        sel = selected_vs_random(lambda s: evaluate_var(model, test, sinks, s, **kw), heads, L, H,
                                 range(2, L - 1), n_random, seed,
                                 "VAR, target-centric heads ({k})", "VAR, random {k} heads")
        rows += sel.rows
        extra["margin_var_selected"] = float(sel.margin.mean())
        if sel.random_margin is not None:
            extra["margin_var_random"] = float(sel.random_margin.mean())              # over [sets, n]
    extra["sinks_example0"] = vt.sinks[0]
    return rows, extra
