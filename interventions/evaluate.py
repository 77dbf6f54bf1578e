"""Held-out evaluation of a head intervention on a multiple-choice task, shared by ACT (``act``) and
VAR (``var``).

An intervention is described by how it changes a batch (``hook_pattern`` hooks built per batch of
left-padded examples) or one example (probe edits built per example); everything else is the same
for every method and lives here:

- ``choice_scores``: right or wrong, and the margin, from the next-token logits of the candidates;
- ``score_intervention``: (correct, margin) over examples, batched through hooks or one example at a
  time through edits;
- ``selected_vs_random``: the selected heads against ``n_random`` random head sets of the same size
  from the same layers, each scored on the same held-out examples (the control of Wu et al. 2024,
  Retrieval Head, §3.3, and Yin et al. 2024, LoFiT, §5.2), as ``controls.Row`` rows whose bootstrap
  CIs ``controls.table`` computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import controls

HeadSet = list[tuple[int, int]]


def choice_scores(logits: torch.Tensor, choices: torch.Tensor, labels: torch.Tensor):
    """logits [B, V] -> (correct [B] bool, margin [B]) over the candidates choices [B, C]; margin =
    logit of the right candidate minus the best other one."""
    cand = logits.float().gather(1, choices.to(logits.device))                   # [B, C]
    lab = labels.to(logits.device)
    right = cand.gather(1, lab[:, None])[:, 0]                                   # [B]
    other = cand.scatter(1, lab[:, None], float("-inf")).amax(-1)                # [B]
    return (cand.argmax(-1) == lab).cpu(), (right - other).cpu()


def score_intervention(model, examples, hooks_for_batch: Callable, edits_for_example: Callable,
                       batch_size: int = 16, via: str = "hooks") -> tuple[torch.Tensor, torch.Tensor]:
    """(correct [n] bool, margin [n]) over ``examples`` (``act.Example``, n of them) with an
    intervention applied.

    ``via="hooks"``: batches of ``batch_size`` examples, left-padded (``tasks.batches``); for each,
    ``hooks_for_batch(rows, pad, n_pos)`` gives the fwd_hooks [(hook name, fn)] for the examples
    ``examples[rows]`` (``rows`` a slice), ``pad[b]`` the padding tokens of example b and ``n_pos``
    the batch's positions. ``via="edits"``: one forward per example i with the probe edits
    ``edits_for_example(i)``. Both read the next-token logits at the last prompt token."""
    from .tasks import batches, pad_id
    if via not in ("hooks", "edits"):
        raise ValueError(f"via must be 'hooks' or 'edits', got {via!r}")
    correct, margin = [], []
    if via == "edits":
        for i, ex in enumerate(examples):
            with torch.no_grad(), model.edit(edits_for_example(i)):
                lg = model(ex.tokens[None], logits_to_keep=1)[:, -1]                # [1, V]
            c, m = choice_scores(lg, torch.tensor([ex.choices]), torch.tensor([ex.label]))
            correct.append(c)
            margin.append(m)
        return torch.cat(correct), torch.cat(margin)
    for i0, (toks, mask, choices, labels) in zip(range(0, len(examples), batch_size),
                                                  batches(examples, batch_size, pad_id(model))):
        B, N = toks.shape                                                        # toks, mask [B, N]
        pad = (N - mask.sum(-1)).tolist()
        hooks = hooks_for_batch(slice(i0, i0 + B), pad, N)
        with torch.no_grad(), model.hooks(hooks):
            lg = model(toks, attention_mask=mask, logits_to_keep=1)[:, -1]           # [B, V]
        c, m = choice_scores(lg, choices, labels)
        correct.append(c)
        margin.append(m)
    return torch.cat(correct), torch.cat(margin)


@dataclass
class HeadSetRows:
    """``selected_vs_random``'s result. Fields: rows [selected, random family] (``controls.Row``; the
    random row only when n_random > 0); margin [n] of the selected heads; random_margin [sets, n] or
    None; sets the random head sets."""
    rows: list
    margin: torch.Tensor                       # [n] selected heads
    random_margin: torch.Tensor | None         # [sets, n] random head sets
    sets: list


def selected_vs_random(evaluate: Callable[[HeadSet], tuple[torch.Tensor, torch.Tensor]], heads: HeadSet,
                       n_layers: int, n_heads: int, layers, n_random: int = 10, seed: int = 0,
                       selected_name: str = "selected ({k} heads)",
                       random_name: str = "random {k} heads") -> HeadSetRows:
    """Score the selected ``heads`` and ``n_random`` random sets of as many heads drawn from
    ``layers`` (``controls.random_head_sets(n_layers, n_heads, k, n_random, seed, layers)``) with
    ``evaluate(heads) -> (correct [n] bool, margin [n])`` on the same held-out examples. Row names
    are ``selected_name`` / ``random_name`` with ``{k}`` = the number of heads; the random row holds
    correct [sets, n], which ``controls.table`` bootstraps over sets and examples."""
    if not heads:
        raise ValueError("no selected heads to compare with random ones: check the selection first")
    k = len(heads)
    c, m = evaluate(heads)
    rows = [controls.Row(selected_name.format(k=k), c, n_heads=k, heads=heads)]
    if not n_random:
        return HeadSetRows(rows, m, None, [])
    sets = controls.random_head_sets(n_layers, n_heads, k, n_random, seed, layers=layers)
    rc, rm = [], []
    for s in sets:
        c_s, m_s = evaluate(s)
        rc.append(c_s)
        rm.append(m_s)
    rows.append(controls.Row(random_name.format(k=k), torch.stack(rc), n_heads=k, heads=sets))   # [sets, n]
    return HeadSetRows(rows, m, torch.stack(rm), sets)
