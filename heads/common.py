"""Helpers the analyzers (and interventions) share: forward passes for statistics, prefill-then-
generate decoding, prompt templates, head sets and batching.

Every pass that needs more than logits (a KV cache, hidden states, logits of chosen positions)
goes through one function here (``prefill``, ``last_token_forward``, ``final_hidden``); the rest
use the public ``HookedModel`` API.
"""
from __future__ import annotations

import contextlib
import random

import torch
from einops import reduce, repeat

from ..probe import Stats, logits_at, output_cache

# Zhou et al. 2025 ("On the Role of Attention Heads in LLM Safety", Sahara's prompt format): the plain
# template used for models without a chat template (base models such as Gemma-3-270M).
PLAIN_TEMPLATE = "## Query:{q}\n## Answer:"

# SentencePiece's byte-fallback token for "\n" (Llama-2, Mistral, Gemma vocabularies).
NEWLINE_BYTE_TOKEN = "<0x0A>"


# ------------------------------------------------------------------------------------------------
# prompt templates

def has_chat_template(model) -> bool:
    """True when the model has a tokenizer with a chat template (instruction models such as SmolLM2;
    False for base models such as Gemma-3-270M and for token-only models)."""
    tok = model.tokenizer
    return tok is not None and bool(getattr(tok, "chat_template", None))


def resolve_template(model, template: str | None) -> str | None:
    """``"chat"`` -> "chat" when the tokenizer has a chat template, else ``PLAIN_TEMPLATE`` (so base
    models run with the paper's plain format); a ``"{q}"`` string or None are returned as they are."""
    if template == "chat" and not has_chat_template(model):
        return PLAIN_TEMPLATE
    return template


def template_name(model, template: str | None) -> str:
    """What a template setting means on this model, for a result's params: "chat" (the tokenizer's chat
    template), the ``{q}`` string used (e.g. ``PLAIN_TEMPLATE`` on a base model), or "none"."""
    t = resolve_template(model, template)
    return "none" if t is None else t


def apply_template(model, queries: list[str], template: str | None = "chat", system: str | None = None) -> list[str]:
    """Wrap queries: ``template="chat"`` uses the tokenizer's chat template (``system`` None keeps the
    template's default system prompt, a string sets one), a string with ``{q}`` formats, None keeps
    the query as is. Resolve "chat" on a base model with ``resolve_template`` first."""
    if template == "chat":
        if not has_chat_template(model):
            raise ValueError(f"{model.cfg.name} has no chat template: pass template=None or a '{{q}}' string")
        tok = model.tokenizer
        msgs = (lambda q: [{"role": "user", "content": q}]) if system is None else \
            (lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}])
        return [tok.apply_chat_template(msgs(q), tokenize=False, add_generation_prompt=True) for q in queries]
    if template is None:
        return list(queries)
    if "{q}" not in template:
        raise ValueError(f"template must contain '{{q}}' (or be 'chat' / None), got {template!r}")
    return [template.replace("{q}", q) for q in queries]


# ------------------------------------------------------------------------------------------------
# forward passes for statistics

def run_quietly(model, tokens, fwd_hooks=()):
    """Forward pass for statistics only: asks the HF model for the last position's logits alone
    (``logits_to_keep=1``; Gemma-3's 262k-word head otherwise costs more than its layers)."""
    try:
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, logits_to_keep=1)
    except TypeError as e:                       # an architecture without logits_to_keep
        if "logits_to_keep" not in str(e):
            raise
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)


def received_importance(model, tokens: torch.Tensor, batch_size: int = 16, progress: bool = True,
                        desc: str = "received", divide_by: str = "causal") -> torch.Tensor:
    """alpha[sample, layer, head, key] = (1 / (T - s)) * sum_{t >= s} A[t, s] for tokens [sample, T]
    (unpadded), from ``Stats(received=True)`` — O(N) per layer.

    ``divide_by="causal"`` (default): the column sum over the T - s queries at or after key s, as Gu
    et al. 2024 eq. 1 (alpha_k, 1 / (T - k + 1) with 1-based k) and its reference
    (sail-sg/Attention-Sink ``compute_attention_sink``) and ACT's a_j (GATECH-EIC/ACT divides column
    sums by N - j). ``divide_by="visible"``: by the number of queries that can actually see s, which
    is smaller on sliding-window layers once T exceeds the window (identical on full-attention
    layers)."""
    from tqdm.auto import tqdm

    if divide_by not in ("causal", "visible"):
        raise ValueError(f"divide_by must be 'causal' (T - s queries, the papers' rule) or 'visible', "
                         f"got {divide_by!r}")
    L = model.cfg.n_layers
    out = []
    for b0 in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc=desc):
        toks = tokens[b0:b0 + batch_size]
        with torch.no_grad(), model.record(Stats(received=True)) as rec:
            run_quietly(model, toks)
        out.append(torch.stack([_received(rec, l, divide_by) for l in range(L)], 1))    # [b, L, H, T]
    return torch.cat(out, 0)


def _received(rec, layer: int, divide_by: str) -> torch.Tensor:
    """One layer's received attention [b, H, T], divided as ``received_importance`` says."""
    if divide_by == "visible":
        return rec.received_mean(layer).float().cpu()
    s = rec["received_sum", layer].float().cpu()                                         # [b, H, T]
    T = s.shape[-1]
    return s / torch.arange(T, 0, -1, dtype=s.dtype)                                     # T - s queries


def resid_pre_all(model, tokens: torch.Tensor, **kwargs):
    """One unedited forward that keeps every layer's input: -> (logits, {layer: resid_pre [B, N, d]})."""
    resid: dict[int, torch.Tensor] = {}

    def keep(t, hook):
        resid[hook.layer()] = t.detach()

    hooks = [(f"blocks.{l}.hook_resid_pre", keep) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)
    return logits, resid


def last_token_forward(model, tokens: torch.Tensor, last: torch.Tensor):
    """tokens [B, N] (right-padded, no mask needed under causal attention), last [B] index of each
    row's last real token -> (log-probs [B, V] float64, final normed hidden state [B, d] float32) at
    those positions; only those positions' logits are computed."""
    logits, out = logits_at(model.model, last, input_ids=tokens, use_cache=False, output_hidden_states=True)
    logits = logits.double()                                                           # [B, V]
    h = out.hidden_states[-1]                                                          # [B, N, d]
    hidden = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]         # [B, d]
    return torch.log_softmax(logits, -1), hidden.float()


def _decoder(model):
    hf = model.model
    dec = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    if dec is None or dec is hf:
        dec = getattr(hf, "model", None)
    if dec is None:
        raise TypeError(f"cannot find the decoder of {type(hf).__name__} (need its last normed hidden state)")
    return dec


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state (after the final norm) [B, N, d_model]."""
    return _decoder(model)(input_ids=ids.to(model.device)).last_hidden_state


def prefill(model, ids: torch.Tensor, mask: torch.Tensor | None = None):
    """Run ids [B, N] once on the plain path (nothing recorded) and return the KV cache. With a
    left-padding ``mask`` [B, N] positions count real tokens only, as ``generate`` does."""
    pre = {} if mask is None else dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    with torch.no_grad():
        # logits_to_keep=1: the prefill needs only the cache, not N x vocab logits (Gemma: 262k vocab)
        return output_cache(model.model(input_ids=ids, use_cache=True, logits_to_keep=1, **pre))


# ------------------------------------------------------------------------------------------------
# decoding

def end_of_turn_ids(model) -> list[int]:
    """The ids that end a response: EOS (tokenizer and generation config) and the chat end-of-turn
    tokens (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``) the vocabulary has."""
    tok = model.tokenizer
    out = []
    gc = getattr(model.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is not None:
        out += [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    if tok is not None:
        if tok.eos_token_id is not None:
            out.append(int(tok.eos_token_id))
        vocab = tok.get_vocab()
        for s in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            if s in vocab:
                out.append(int(tok.convert_tokens_to_ids(s)))
    return sorted(set(out))


def newline_ids(model) -> list[int]:
    """The newline token ids: the tokenizer's encoding of "\\n" when that is one token, and the
    SentencePiece byte token ``<0x0A>`` when the vocabulary has it. Tokens that merely contain a
    newline ("\\n\\n", ".\\n") are not in the list. [] without a tokenizer."""
    tok = model.tokenizer
    if tok is None:
        return []
    out = []
    ids = tok.encode("\n", add_special_tokens=False)
    if len(ids) == 1:
        out.append(int(ids[0]))
    if NEWLINE_BYTE_TOKEN in tok.get_vocab():
        out.append(int(tok.convert_tokens_to_ids(NEWLINE_BYTE_TOKEN)))
    return sorted(set(out))


def stop_ids(model, at_eos: bool = False) -> list[int]:
    """The tokens that end a retrieval-head decode (Wu et al. 2024 §2).

    ``at_eos=False`` (default, the reference's rule): the newline token only (``newline_ids``). The
    reference (nightdessert/Retrieval_Head, ``retrieval_head_detection.py``,
    ``LLMNeedleHaystackTester.decode``) stops when the generated token is the newline byte token
    ``<0x0A>`` (or its hard-coded id 144) and otherwise decodes every step, through EOS.
    ``at_eos=True``: headscope's earlier rule, which also stops at ``end_of_turn_ids`` (EOS and the
    chat end-of-turn tokens) and at a blank-line token ("\\n\\n" when it is one token)."""
    out = newline_ids(model)
    tok = model.tokenizer
    if at_eos:
        out += end_of_turn_ids(model)
        if tok is not None:
            ids = tok.encode("\n\n", add_special_tokens=False)
            if len(ids) == 1:
                out.append(int(ids[0]))
    return sorted(set(out))


_model_stop_ids = stop_ids          # decode's ``stop_ids`` argument shadows the function's name


def output_text(model, new: torch.Tensor, answer):
    """Generated ids -> the text to score against ``answer`` (a string), or the ids as a list when
    ``answer`` is token ids or the model has no tokenizer."""
    if isinstance(answer, str) and model.tokenizer is not None:
        return model.tokenizer.decode(new, skip_special_tokens=True).strip()
    return [int(t) for t in new]


def token_strings(model, ids) -> list[str]:
    """Each token id decoded on its own (``<id>`` without a tokenizer)."""
    ids = [int(i) for i in ids]
    if model.tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]


def decode(model, prompts, max_new_tokens: int, stop_ids=None, record: bool = False, edits=(),
           **generate_kw):
    """Greedy decoding the retrieval-head reference's way, for one prompt [N] or a list of prompts
    (left-padded into one batch): prefill prompt[:-1] (no probe, no edit), then ``model.generate``
    from the last prompt token with ``edits`` active (decoding only) and, if ``record``, the
    ``argmax`` statistic on every layer. Returns a list of (new token ids [T_i] up to and including
    the first stop token, argmax [L, H, T_i] or None): row i is the top-1 key (token position, 0 =
    first prompt token) of the query that produced new token i.

    ``stop_ids``: the tokens that end a row (None: ``stop_ids(model)``, the newline token); ``[]``
    decodes all ``max_new_tokens`` steps (the generation config's EOS does not stop it either). A
    row that has stopped waits (its later tokens are dropped) while the others go on."""
    single = torch.is_tensor(prompts) and prompts.dim() == 1
    prompts = [torch.as_tensor(p).reshape(-1).cpu() for p in ([prompts] if single else prompts)]
    if any(p.numel() < 2 for p in prompts):
        raise ValueError("a prompt to decode needs at least 2 tokens")
    B, N = len(prompts), max(p.numel() for p in prompts)
    pad_id = 0
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        pad_id = int(model.tokenizer.pad_token_id)
    ids = torch.full((B, N), pad_id, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, N - p.numel():] = p
        mask[b, N - p.numel():] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    stops = _model_stop_ids(model) if stop_ids is None else list(stop_ids)
    kw = dict(generate_kw)
    kw["eos_token_id"] = stops or None          # None: no stop at all, not the generation config's EOS
    padded = bool((mask == 0).any())
    cache = prefill(model, ids[:, :-1], mask[:, :-1] if padded else None)
    rec_ctx = model.record(argmax=True) if record else contextlib.nullcontext()
    edit_ctx = model.edit(list(edits)) if edits else contextlib.nullcontext()
    with edit_ctx, rec_ctx as rec:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, cache=cache,
                             **kw)
    new = out[:, N:].cpu()
    am = rec.stack("argmax").cpu() if record else None                       # [L, B, H, T]
    if am is not None and am.shape[-1] != new.shape[1]:
        raise RuntimeError(f"recorded {am.shape[-1]} decode steps for {new.shape[1]} new tokens")
    res = []
    for b in range(B):
        T = new.shape[1]
        hits = [i for i in range(T) if int(new[b, i]) in stops] if stops else []
        if hits:
            T = hits[0] + 1
        res.append((new[b, :T], None if am is None else am[:, b, :, :T]))
    return res[0] if single else res


# ------------------------------------------------------------------------------------------------
# head sets and batching

def random_heads(n_layers: int, n_heads: int, k: int, exclude=(), seed: int = 0,
                 layers=None) -> list[tuple[int, int]]:
    """k distinct (layer, head) pairs drawn with ``random.Random(seed)`` among ``layers`` (default:
    all) outside ``exclude``, sorted. The one way every analyzer and experiment draws random heads."""
    ex = {(int(l), int(h)) for l, h in exclude}
    ls = range(n_layers) if layers is None else [int(l) for l in layers]
    pool = [(l, h) for l in ls for h in range(n_heads) if (l, h) not in ex]
    if k > len(pool):
        raise ValueError(f"cannot draw {k} random heads from the {len(pool)} left after excluding {len(ex)}")
    return sorted(random.Random(seed).sample(pool, k))


def kv_group_max(scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[L, H] -> [L, G]: max over the query heads that share each KV head (GQA)."""
    return reduce(torch.as_tensor(scores), "l (g r) -> l g", "max", g=n_kv)


def expand_kv(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[L, G] -> [L, H]: each KV head's value for every query head of its group."""
    return repeat(kv, "l g -> l (g r)", r=n_heads // kv.shape[1])


def batches(items, size: int, key=None) -> list[list[int]]:
    """Indices of ``items`` in groups of at most ``size``, in order, or sorted by ``key(item)`` first
    (e.g. prompt length: batches of similar lengths need little padding)."""
    order = list(range(len(items)))
    if key is not None:
        order.sort(key=lambda i: key(items[i]))
    size = max(1, int(size))
    return [order[i:i + size] for i in range(0, len(order), size)]
