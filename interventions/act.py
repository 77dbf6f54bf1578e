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
the heads whose calibration raises accuracy. The paper excludes the first and last layers; the
reference code scans layers 2..L-2 (its ``calibration.sh`` and ``signal in range(2, 31)`` for a
32-layer model), so the candidates are layers ``first_layer``..L-2 with ``FIRST_LAYER`` = 2 by
default and ``first_layer=1`` for the paper's wording.

Several heads at once: the reference code (``atten_process_eval`` in GATECH-EIC/ACT,
``models/llama_modelling_aug.py``) finds each calibrated head's hidden sinks in the attention map of
the forward being calibrated, so a head above a calibrated layer sees sinks of the already
calibrated model. ``online_act_edits`` and ``evaluate_heads(sinks=None)`` do the same (``compare``'s
default, ``sinks="online"``); ``act_edits`` with ``hidden_sinks`` of the unedited model is the
cheaper variant (identical for one head, or heads of one layer).

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
from .evaluate import choice_scores, score_intervention, selected_vs_random
from .redistribute import redistribute_rows


# the first layer whose heads ACT may calibrate: the reference code's 2 (the paper: "not the first")
FIRST_LAYER = 2


def candidate_layers(n_layers: int, first_layer: int = FIRST_LAYER) -> list[int]:
    """Layers ACT calibrates: first_layer..L-2 (the last layer never)."""
    if first_layer < 0:
        raise ValueError(f"first_layer must be >= 0, got {first_layer}")
    return list(range(first_layer, n_layers - 1))

@dataclass
class Example:
    """One multiple-choice example (ACT's classification setting, Yu et al. 2024 ICML, §4).
    Fields: tokens [N] prompt token ids (unpadded); choices the candidate answers' first token ids;
    label the index of the right one in ``choices``."""
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


def parse_threshold(text: str) -> float | str:
    """A command-line threshold: a number, or "alpha/N" (checked by ``sink_threshold``)."""
    try:
        return float(text)
    except ValueError:
        sink_threshold(text, 1)
        return text


def sink_threshold(threshold: float | str, n_tokens):
    """The hidden-sink threshold on a_j for sequences of ``n_tokens`` real tokens (an int or a tensor):
    a number is used as it is (the reference code's THRES = 0.1); a string "alpha/N" (e.g. "5/N") is
    the paper's phrasing, alpha / N (ACT §3.1)."""
    if isinstance(threshold, str):
        head, _, tail = threshold.replace(" ", "").partition("/")
        try:
            alpha = float(head)
        except ValueError:
            alpha = None
        if tail != "N" or alpha is None or alpha <= 0:
            raise ValueError(f"threshold {threshold!r}: give a number (e.g. 0.1) or 'alpha/N' (e.g. '5/N')")
        return alpha / n_tokens
    return float(threshold)


def hidden_sinks(model, tokens: torch.Tensor, threshold: float | str = 0.1) -> dict[tuple[int, int], list[int]]:
    """tokens [N] -> {(layer, head): hidden-sink positions} (ACT's rule, first sink excluded);
    ``threshold`` as ``sink_threshold`` takes it."""
    toks = tokens[None]
    a = received_importance(model, toks, progress=False)                       # [1, L, H, N]
    r = hidden_sinks_from_importance(model, toks, a, sink_threshold(threshold, toks.shape[-1]))
    out: dict[tuple[int, int], list[int]] = {}
    for s in r.sinks:
        out.setdefault((s.layer, s.head), []).append(s.position)
    return out


def act_edits(sinks: dict[tuple[int, int], list[int]], heads, beta: float = 0.4) -> list[ScaleKeys]:
    """The ScaleKeys edits that calibrate ``heads`` [(layer, head)] given one input's hidden sinks."""
    return [ScaleKeys(l, h, keys=[(p, p + 1) for p in sinks[(l, h)]], factor=beta)
            for l, h in heads if sinks.get((l, h))]


def online_act_edits(model, tokens: torch.Tensor, heads, beta: float = 0.4,
                     threshold: float | str = 0.1) -> list[ScaleKeys]:
    """tokens [N], heads [(layer, head)] -> the ScaleKeys edits of the reference's calibration:
    layer by layer (lowest first), each head's hidden sinks come from its attention with the lower
    layers already calibrated (one forward per calibrated layer)."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))
    edits: list[ScaleKeys] = []
    for l, hh in sorted(by_layer.items()):
        name = f"blocks.{l}.attn.hook_pattern"
        with torch.no_grad(), model.edit(edits):
            _, cache = model.run_with_cache(tokens[None], names_filter=name)
        mask = torch.ones(1, tokens.shape[-1], dtype=torch.long)
        sm = sink_mask_from_pattern(cache[name], mask, threshold)[0]                 # [H, N]
        edits += act_edits({(l, h): sm[h].nonzero().flatten().tolist() for h in hh},
                           [(l, h) for h in hh], beta)
    return edits


@dataclass
class Prepared:
    """What ``prepare`` records from one unedited pass over ``ex``, reused by every head tried in
    ``select_heads``. Fields: ex the example; sinks {(layer, head): hidden-sink positions}
    (``hidden_sinks``); resid {layer: resid_pre [1, N, d_model]}; base the choice logits [n_choices] (float32)."""
    ex: Example
    sinks: dict
    resid: dict                   # layer -> resid_pre [1, N, d] of the unedited run
    base: torch.Tensor            # [n_choices] logits


def prepare(model, ex: Example, threshold: float | str) -> Prepared:
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


def accuracy(model, examples: list[Example], heads=(), beta: float = 0.4, threshold: float | str = 0.1,
             prepared: list[Prepared] | None = None) -> float:
    """Share of examples whose right answer has the largest logit, with ``heads`` calibrated."""
    prepared = prepared or [prepare(model, ex, threshold) for ex in examples]
    right = [int(_choice_logits(model, p, list(heads), beta).argmax()) == p.ex.label for p in prepared]
    return sum(right) / len(right)


@dataclass
class ACTResult:
    """ACT head selection (Yu et al. 2024 ICML, §3.3; ``select_heads``). Fields: heads the kept (layer, head)
    pairs; gain [layer, head] calibrated accuracy minus base_accuracy (fractions; 0 also where not
    tried: layers outside ``layers``, or no hidden sink on any example); base_accuracy uncalibrated accuracy on the
    calibration set; beta, threshold the settings used; seconds wall time; params layers, n_calibration, min_gain."""
    heads: list[tuple[int, int]]            # the kept heads
    gain: torch.Tensor                      # [layer, head] calibration accuracy - baseline (0: not tried)
    base_accuracy: float
    beta: float
    threshold: float | str
    seconds: float
    params: dict = field(default_factory=dict)


def select_heads(model, calibration: list[Example], beta: float = 0.4, threshold: float | str = 0.1,
                 layers=None, min_gain: float = 1e-9, progress: bool = True,
                 first_layer: int = FIRST_LAYER) -> ACTResult:
    """ACT §3.3: calibrate each head alone on ``calibration``; keep the heads whose accuracy beats
    the uncalibrated model by more than ``min_gain``. Layers: ``layers``, or ``candidate_layers``
    (first_layer..L-2)."""
    from tqdm.auto import tqdm
    t0 = time.time()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers = candidate_layers(L, first_layer) if layers is None else [int(l) for l in layers]
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


# ------------------------------------------------------------------------------------------------
# Batched ACT on a labelled task (many examples, every head): one recorded pass per batch, then the
# one-head calibrations of a layer as one forward over (head, example) pairs.
#
# Calibrating one head (l, h) changes only its output z at layer l, and the attention it changes is
# the unedited attention of layer l. ACT's edit (§3.2 eq. 4: p'_j = beta·p_j on the sinks S, the
# freed (1 - beta)·s to the other keys in proportion, s = sum_{j in S} p_j) therefore has a closed
# form in the unedited row p, the values v and the output z = p·v:
#     z' = beta·z_S + (1 + g)·(z - z_S),   z_S = sum_{j in S} p_j v_j,   g = (1 - beta)·s / (1 - s)
# (rows with no mass outside S are left alone, as in ``kernels.reference.redistribute``). The sweep
# adds z' - z to each head's output (``AddToHead``, per example and position) and runs the layers
# above l once for all heads of the layer. ``tests/test_interventions.py`` checks it against the
# ``ScaleKeys`` edit itself. Held-out evaluation of a head set spanning several layers uses the
# ``ScaleKeys`` edits (``evaluate_heads``): there the later layers' attention has already changed.

def sink_mask_from_pattern(pattern: torch.Tensor, mask: torch.Tensor, threshold: float | str = 0.1) -> torch.Tensor:
    """ACT's hidden sinks from an attention pattern. pattern [B, H, N, N] of a left-padded batch,
    mask [B, N] (1 = real token) -> [B, H, N] bool over key columns: a_j = mean attention key j
    receives from the real queries that can see it (column sum / (N - j)); sinks a_j > threshold
    (``sink_threshold``: a number, or "alpha/N" with N each example's real tokens), minus the first
    one found (the reference's ``indices[1:]``; ``heads.sinks.find_hidden_sinks``)."""
    B, H, N, _ = pattern.shape
    m = mask.to(pattern.device).bool()
    col = (pattern.float() * m[:, None, :, None]).sum(-2)                         # [B, H, N]
    seen = torch.arange(N, 0, -1, device=pattern.device, dtype=torch.float32)     # queries per key
    thr = sink_threshold(threshold, m.sum(-1).float())                            # float or [B]
    if isinstance(thr, torch.Tensor):
        thr = thr[:, None, None]                                                  # [B, 1, 1]
    above = (col / seen > thr) & m[:, None, :]
    idx = torch.arange(N, device=pattern.device)
    first = torch.where(above, idx, N).min(-1).values                            # [B, H]
    return above & (idx != first[..., None])


def calibration_delta(pattern: torch.Tensor, v: torch.Tensor, z: torch.Tensor, sinks: torch.Tensor,
                      beta: float = 0.4) -> torch.Tensor:
    """z' - z for calibrating each head alone (the closed form above). pattern [B, H, N, N],
    v [B, N, G, d] (G KV heads), z [B, N, H, d], sinks [B, H, N] bool key columns -> [B, N, H, d]."""
    H, G = pattern.shape[1], v.shape[2]
    p = pattern.float()
    ps = p * sinks[:, :, None, :]                                                # [B, H, N, N]
    s = ps.sum(-1)                                                               # [B, H, N] sink mass per row
    rest = p.sum(-1) - s
    vr = v.float().repeat_interleave(H // G, dim=2)                               # [B, N, H, d]
    z_s = torch.einsum("bhtj,bjhd->bthd", ps, vr)                                # [B, N, H, d]
    keep = (rest > 0) & (s > 0)
    g = torch.where(keep, (1 - beta) * s / rest.clamp_min(1e-30), torch.zeros_like(s))
    g = g.transpose(1, 2)[..., None]                                             # [B, N, H, 1]
    delta = (beta - 1) * z_s + g * (z.float() - z_s)
    return torch.where(keep.transpose(1, 2)[..., None], delta, torch.zeros_like(delta))


@dataclass
class TaskPass:
    """One unedited pass over a task's examples (``task_pass``)."""
    correct: torch.Tensor                 # [n] bool, unedited
    margin: torch.Tensor                  # [n] logit of the right choice - best other
    sinks: list                           # per example {(layer, head): [positions]} (positions of real tokens)
    sweep: torch.Tensor | None = None     # [L, H, n] bool: correct with head (l, h) calibrated alone
    sweep_margin: torch.Tensor | None = None


def task_pass(model, examples: list[Example], layers, beta: float = 0.4, threshold: float | str = 0.1,
              sweep: bool = True, batch_size: int = 16, progress: bool = True, desc: str = "ACT pass") -> TaskPass:
    """Unedited accuracy, every example's hidden sinks on ``layers``, and (``sweep``) the accuracy
    with each head of ``layers`` calibrated alone, in batches of ``batch_size`` examples."""
    from tqdm.auto import tqdm

    from ..probe import AddToHead
    from .tasks import batches, pad_id
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers = [int(l) for l in layers]
    if any(not 0 < l < L for l in layers):
        raise ValueError(f"ACT layers must lie in 1..{L - 1} (a sweep starts above layer 0), got {layers}")
    n_b = (len(examples) + batch_size - 1) // batch_size
    correct, margin, sinks, sw, swm = [], [], [], [], []
    bar = tqdm(total=n_b * (1 + (len(layers) if sweep else 0)), desc=desc, disable=not progress)
    for toks, mask, choices, labels in batches(examples, batch_size, pad_id(model)):
        B, N = toks.shape
        keep: dict[str, torch.Tensor] = {}

        def saver(name):
            def fn(t, hook):
                keep[name] = t.detach()
            return fn

        names = [f"blocks.{l}.attn.hook_{k}" for l in layers for k in ("pattern",) + (("v", "z") if sweep else ())]
        names += [f"blocks.{l}.hook_resid_pre" for l in layers] if sweep else []
        with torch.no_grad(), model.hooks([(n, saver(n)) for n in names]):
            logits = model(toks, attention_mask=mask, logits_to_keep=1)[:, -1]
        c0, m0 = choice_scores(logits, choices, labels)
        correct.append(c0)
        margin.append(m0)
        pad = (N - mask.sum(-1)).tolist()
        per_ex = [dict() for _ in range(B)]
        smasks = {}
        for l in layers:
            sm = sink_mask_from_pattern(keep[f"blocks.{l}.attn.hook_pattern"], mask, threshold)   # [B, H, N]
            smasks[l] = sm
            for b, h, j in sm.nonzero().tolist():
                per_ex[b].setdefault((l, h), []).append(j - pad[b])
        sinks += per_ex
        bar.update(1)
        if not sweep:
            continue
        c_sw = c0[None, None].repeat(L, H, 1)                                     # [L, H, B]
        m_sw = m0[None, None].repeat(L, H, 1)
        for l in layers:
            sm = smasks[l]
            delta = calibration_delta(keep[f"blocks.{l}.attn.hook_pattern"], keep[f"blocks.{l}.attn.hook_v"],
                                      keep[f"blocks.{l}.attn.hook_z"], sm, beta)          # [B, N, H, d]
            vec = delta.new_zeros(H, B, N, H, delta.shape[-1])
            for h in range(H):
                vec[h, :, :, h] = delta[:, :, h]
            resid = keep[f"blocks.{l}.hook_resid_pre"]
            with torch.no_grad(), model.edit([AddToHead(l, list(range(H)), vec.reshape(H * B, N, H, -1))]):
                lg = model(toks.repeat(H, 1), attention_mask=mask.repeat(H, 1), start_at_layer=l,
                           resid_pre=resid.repeat(H, 1, 1), logits_to_keep=1)[:, -1]
            c, mg = choice_scores(lg, choices.repeat(H, 1), labels.repeat(H))
            changed = sm.any(-1).T.cpu()                                           # [H, B]
            c_sw[l] = torch.where(changed, c.view(H, B), c0[None])
            m_sw[l] = torch.where(changed, mg.view(H, B), m0[None])
            bar.update(1)
        sw.append(c_sw)
        swm.append(m_sw)
        keep.clear()
    bar.close()
    return TaskPass(torch.cat(correct), torch.cat(margin), sinks,
                    torch.cat(sw, -1) if sweep else None, torch.cat(swm, -1) if sweep else None)


def calibrate_pattern(p: torch.Tensor, src: torch.Tensor, beta: float = 0.4) -> torch.Tensor:
    """ACT's calibration (§3.2 eq. 4) of probabilities p [B, H, Q, K] with a per-example, per-head
    sink set src [B, H, K] bool (key columns): attention on the sinks times ``beta``, the freed mass
    to the other keys in proportion to their attention; rows with no mass outside the sinks stay.
    This is ``ScaleKeys(keys=S, factor=beta)`` with S allowed to differ between the examples of a
    batch, for a ``hook_pattern`` hook (``calibration_hooks``)."""
    return redistribute_rows(p, src, None, beta)


def calibration_hooks(sinks: list, heads, pad: list[int], n_pos: int, n_heads: int, beta: float = 0.4):
    """fwd_hooks calibrating ``heads`` [(layer, head)] of a left-padded batch: example b has
    ``pad[b]`` padding tokens, ``n_pos`` positions in all, hidden sinks ``sinks[b]``
    ({(layer, head): positions of real tokens}). -> [(hook name, fn)] on ``hook_pattern``."""
    by_layer: dict[int, torch.Tensor] = {}
    for l, h in heads:
        m = by_layer.setdefault(int(l), torch.zeros(len(sinks), n_heads, n_pos, dtype=torch.bool))
        for b, s in enumerate(sinks):
            for j in s.get((int(l), int(h)), ()):
                m[b, int(h), pad[b] + j] = True
    return [(f"blocks.{l}.attn.hook_pattern", lambda p, hook, m=m: calibrate_pattern(p, m, beta))
            for l, m in sorted(by_layer.items()) if m.any()]


def online_calibration_hooks(heads, pad: list[int], n_pos: int, n_heads: int, beta: float = 0.4,
                             threshold: float | str = 0.1):
    """fwd_hooks calibrating ``heads`` [(layer, head)] of a left-padded batch (``pad[b]`` padding
    tokens, ``n_pos`` positions) with hidden sinks found in the pattern each hook receives, i.e. in
    the forward being calibrated (the reference's ``atten_process_eval``). -> [(hook name, fn)]."""
    mask = (torch.arange(n_pos)[None, :] >= torch.tensor(pad)[:, None]).long()          # [B, N]
    by_layer: dict[int, torch.Tensor] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), torch.zeros(n_heads, dtype=torch.bool))[int(h)] = True

    def hook(sel):
        def fn(p, hook):
            src = sink_mask_from_pattern(p, mask, threshold) & sel.to(p.device)[None, :, None]   # [B, H, N]
            return calibrate_pattern(p, src, beta)
        return fn
    return [(f"blocks.{l}.attn.hook_pattern", hook(sel)) for l, sel in sorted(by_layer.items())]


def evaluate_heads(model, examples: list[Example], sinks: list | None, heads, beta: float = 0.4,
                   batch_size: int = 16, via: str = "hooks", threshold: float | str = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct [n] bool, margin [n]) with ``heads`` [(layer, head)] calibrated. ``sinks``: each
    example's hidden sinks from the unedited pass (``task_pass(...).sinks``), or None for the
    reference's online sinks (found in the calibrated forward itself with ``threshold``;
    ``online_act_edits`` / ``online_calibration_hooks``). ``via="edits"``: one forward per example
    with the ``ScaleKeys`` edits; ``via="hooks"`` (default): batches of examples, the same
    calibration applied per example by ``hook_pattern`` hooks (``calibrate_pattern``; the layers
    with a calibrated head then run the full-pattern reference path)."""
    heads = [(int(l), int(h)) for l, h in heads]
    H = model.cfg.n_heads
    if sinks is None:
        hooks = lambda rows, pad, n_pos: online_calibration_hooks(heads, pad, n_pos, H, beta, threshold)
        edits = lambda i: online_act_edits(model, examples[i].tokens, heads, beta, threshold)
    else:
        hooks = lambda rows, pad, n_pos: calibration_hooks(sinks[rows], heads, pad, n_pos, H, beta)
        edits = lambda i: act_edits(sinks[i], heads, beta)
    return score_intervention(model, examples, hooks_for_batch=hooks, edits_for_example=edits,
                              batch_size=batch_size, via=via)


def select_from_sweep(p: TaskPass, layers, min_gain: float = 0.0, top_k: int | None = None) -> tuple[list, torch.Tensor]:
    """ACT §3.3 on a swept calibration pass: the heads whose calibration alone raises accuracy by
    more than ``min_gain`` (optionally only the ``top_k`` best, ties broken by the mean margin gain).
    -> (heads [(layer, head)], gain [L, H] in accuracy)."""
    gain = p.sweep.float().mean(-1) - p.correct.float().mean()                     # [L, H]
    mgain = p.sweep_margin.mean(-1) - p.margin.mean()
    cand = [(l, h) for l in layers for h in range(gain.shape[1]) if gain[l, h] > min_gain]
    cand.sort(key=lambda x: (-float(gain[x]), -float(mgain[x])))
    if top_k is not None:
        cand = cand[:top_k]
    return sorted(cand), gain


def compare(model, calibration: list[Example], test: list[Example], beta: float = 0.4, threshold: float | str = 0.1,
            n_random: int = 10, seed: int = 0, batch_size: int = 16, min_gain: float = 0.0,
            top_k: int | None = None, max_heads: int | None = None, progress: bool = True,
            sinks: str = "online", first_layer: int = FIRST_LAYER):
    """ACT end to end: select heads on ``calibration`` (the paper's rule, batched sweep over every
    head of layers first_layer..L-2, or the first ``max_heads`` of them), then evaluate on ``test`` the base
    model, the selected heads, ``n_random`` random head sets of the same size (from the same layers)
    and all candidate heads. ``sinks``: "online" (the reference: each calibrated head's hidden sinks
    from the calibrated forward) or "unedited" (from the unedited pass, ``task_pass``).
    -> (rows [controls.Row], extra dict, test TaskPass)."""
    if sinks not in ("online", "unedited"):
        raise ValueError(f"sinks={sinks!r}: use 'online' (the reference code) or 'unedited'")
    from . import controls
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers = candidate_layers(L, first_layer)
    cand = [(l, h) for l in layers for h in range(H)]
    if max_heads is not None:
        cand = cand[:max_heads]
        layers = sorted({l for l, _ in cand})
    if not layers:
        raise ValueError(f"{model.cfg.name} has {L} layers: ACT calibrates layers {first_layer}..L-2, none here "
                         f"(pass first_layer=1, the paper's wording, for a model this shallow)")
    t0 = time.time()
    p_cal = task_pass(model, calibration, layers, beta, threshold, sweep=True, batch_size=batch_size,
                      progress=progress, desc="ACT sweep (calibration)")
    t_sweep = time.time() - t0
    heads, gain = select_from_sweep(p_cal, layers, min_gain, top_k)
    heads = [x for x in heads if x in cand]
    t1 = time.time()
    p_test = task_pass(model, test, layers, beta, threshold, sweep=False, batch_size=batch_size,
                       progress=progress, desc="ACT sinks (held-out)")
    rows = [controls.Row("base", p_test.correct)]
    extra = {"n_calibration": len(calibration), "n_heldout": len(test), "beta": beta, "threshold": threshold,
             "candidate_heads": len(cand), "kept_heads": heads, "n_kept": len(heads),
             "calibration_base_accuracy": float(p_cal.correct.float().mean()),
             "gain_calibration": gain.tolist(), "heads_with_gain": int((gain > min_gain).sum()),
             "heads_with_loss": int((gain < 0).sum()), "min_gain": min_gain, "top_k": top_k, "sinks": sinks}
    s_cal, s_test = (None, None) if sinks == "online" else (p_cal.sinks, p_test.sinks)
    if heads:
        c_cal, _ = evaluate_heads(model, calibration, s_cal, heads, beta, batch_size, threshold=threshold)
        extra["calibration_act_accuracy"] = float(c_cal.float().mean())
        rows += selected_vs_random(lambda s: evaluate_heads(model, test, s_test, s, beta, batch_size,
                                                            threshold=threshold),
                                   heads, L, H, layers, n_random, seed,
                                   "ACT-selected ({k} heads)", "random {k} heads").rows
        rows.append(controls.Row(f"all heads of layers {layers[0]}..{layers[-1]}",
                                 evaluate_heads(model, test, s_test, cand, beta, batch_size, threshold=threshold)[0],
                                 n_heads=len(cand)))
    extra["seconds_sweep"] = t_sweep
    extra["seconds_heldout"] = time.time() - t1
    return rows, extra, p_test
