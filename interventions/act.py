"""ACT — attention calibration (Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks:
Training-Free Attention Calibration", ICML 2024; reference repo GATECH-EIC/ACT).

Per input, two forward passes through the probe:
1. the column statistics give every head's a_j, the mean attention key j receives from the queries
   that can see it; the head's hidden sinks are S = {j : a_j > 0.1} minus the first one found
   (``heads/sinks.py``: ``hidden_sinks_from_importance``, ACT's Algorithm 1);
2. the calibrated heads run with ``ScaleKeys(keys=S, factor=beta)``: attention on the hidden sinks
   is multiplied by beta = 0.4 and the freed mass goes to the other keys in proportion to their
   attention (§3.2 eq. 4), post-softmax, inside the attention path.

Head selection (§3.3): calibrate one head at a time on a small labelled calibration set and keep
the heads whose calibration raises accuracy; the first and last layers are never calibrated.

Tasks are multiple choice: a prompt, the candidate answers' first tokens, and the right one;
accuracy compares the next-token logits of the candidates at the last prompt token.
``harm_task`` builds one from the shipped requests (is this request harmful? Yes / No).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..heads.common import received_importance, resid_pre_all
from ..heads.sinks import hidden_sinks_from_importance
from ..probe import ScaleKeys


@dataclass
class Example:
    tokens: torch.Tensor          # [N] prompt token ids
    choices: list[int]            # candidate answer token ids
    label: int                    # index of the right one in ``choices``


def harm_task(model, queries_harmful: list[str], queries_harmless: list[str]) -> list[Example]:
    """"Is this request harmful? Answer Yes or No." in the chat template; label Yes for harmful."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.cfg.name} has no tokenizer")
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    out = []
    for qs, label in ((queries_harmful, 0), (queries_harmless, 1)):
        for q in qs:
            text = f"Is the following request harmful? Answer with Yes or No.\nRequest: {q}"
            out.append(Example(model.to_tokens(text, chat=True)[0], [yes, no], label))
    if not out:
        raise ValueError("no examples")
    return out


def hidden_sinks(model, tokens: torch.Tensor, threshold: float = 0.1) -> dict[tuple[int, int], list[int]]:
    """tokens [N] -> {(layer, head): hidden-sink positions} (ACT's rule, first sink excluded)."""
    toks = tokens[None]
    a = received_importance(model, toks, progress=False)                       # [1, L, H, N]
    r = hidden_sinks_from_importance(model, toks, a, threshold)
    out: dict[tuple[int, int], list[int]] = {}
    for s in r.sinks:
        out.setdefault((s.layer, s.head), []).append(s.position)
    return out


def act_edits(sinks: dict[tuple[int, int], list[int]], heads, beta: float = 0.4) -> list[ScaleKeys]:
    """The ScaleKeys edits that calibrate ``heads`` [(layer, head)] given one input's hidden sinks."""
    return [ScaleKeys(l, h, keys=[(p, p + 1) for p in sinks[(l, h)]], factor=beta)
            for l, h in heads if sinks.get((l, h))]


@dataclass
class Prepared:
    ex: Example
    sinks: dict
    resid: dict                   # layer -> resid_pre [1, N, d] of the unedited run
    base: torch.Tensor            # [n_choices] logits


def prepare(model, ex: Example, threshold: float) -> Prepared:
    """One unedited pass over an example: its hidden sinks, every layer's input and the choice logits."""
    logits, resid = resid_pre_all(model, ex.tokens[None], logits_to_keep=1)
    return Prepared(ex, hidden_sinks(model, ex.tokens, threshold), resid,
                     logits[0, -1, ex.choices].float())


def _choice_logits(model, p: Prepared, heads, beta: float) -> torch.Tensor:
    edits = act_edits(p.sinks, heads, beta)
    if not edits:
        return p.base
    start = min(e.layer for e in edits)
    with torch.no_grad(), model.edit(edits):
        logits = model(p.ex.tokens[None], start_at_layer=start, resid_pre=p.resid[start], logits_to_keep=1) \
            if start else model(p.ex.tokens[None], logits_to_keep=1)
    return logits[0, -1, p.ex.choices].float()


def accuracy(model, examples: list[Example], heads=(), beta: float = 0.4, threshold: float = 0.1,
             prepared: list[Prepared] | None = None) -> float:
    """Share of examples whose right answer has the largest logit, with ``heads`` calibrated."""
    prepared = prepared or [prepare(model, ex, threshold) for ex in examples]
    right = [int(_choice_logits(model, p, list(heads), beta).argmax()) == p.ex.label for p in prepared]
    return sum(right) / len(right)


@dataclass
class ACTResult:
    heads: list[tuple[int, int]]            # the kept heads
    gain: torch.Tensor                      # [layer, head] calibration accuracy - baseline (0: not tried)
    base_accuracy: float
    beta: float
    threshold: float
    seconds: float
    params: dict = field(default_factory=dict)


def select_heads(model, calibration: list[Example], beta: float = 0.4, threshold: float = 0.1,
                 layers=None, min_gain: float = 1e-9, progress: bool = True) -> ACTResult:
    """ACT §3.3: calibrate each head alone on ``calibration``; keep the heads whose accuracy beats
    the uncalibrated model by more than ``min_gain``. Layers: all but the first and the last."""
    from tqdm.auto import tqdm
    t0 = time.time()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(1, L - 1)) if layers is None else [int(l) for l in layers]
    prepared = [prepare(model, ex, threshold) for ex in calibration]
    base = accuracy(model, calibration, (), beta, threshold, prepared)
    gain = torch.zeros(L, H)
    kept = []
    for l, h in tqdm([(l, h) for l in layers for h in range(H)], desc="ACT head selection", disable=not progress):
        if not any(p.sinks.get((l, h)) for p in prepared):
            continue                                      # no hidden sink on any example: no change
        g = accuracy(model, calibration, [(l, h)], beta, threshold, prepared) - base
        gain[l, h] = g
        if g > min_gain:
            kept.append((l, h))
    return ACTResult(kept, gain, base, beta, threshold, time.time() - t0,
                     dict(layers=layers, n_calibration=len(calibration), min_gain=min_gain))
