"""TransformerLens idioms on ``HookedModel``: the names a TransformerLens notebook uses, with the
same shapes and numbers as TransformerLens 4's ``TransformerBridge`` on the same weights.

``TLIdioms`` is a mixin that ``HookedModel`` inherits; ``TLConfigNames`` gives ``ModelInfo`` (the
model's ``cfg``) TransformerLens' config names. Nothing here touches attention: weights are read
from the Hugging Face modules (no copy is kept, nothing is folded or centred), tokens go through
the model's tokenizer, and persistent hooks (``add_hook``) ride on the probe's public ``hooks``
context, entered around every forward of the wrapped model.

Where headscope differs from TransformerLens on purpose, notes/tl-differences.md has the table.
The weight and residual-stream conventions follow Elhage et al. 2021, "A Mathematical Framework
for Transformer Circuits" (transformer-circuits.pub/2021/framework), sections "Residual stream"
and "Attention heads: QK and OV circuits".
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

# Attention projections, looked up by name on the attention module (no per-architecture classes).
_SPLIT_QKV = ("q_proj", "k_proj", "v_proj")            # Llama, Mistral, Qwen2/3, Gemma, OPT, ...
_FUSED_QKV = ("c_attn", "qkv_proj", "Wqkv")             # [q | k | v] blocks in one projection (GPT-2, Phi-3)
_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")
# Norms inside a decoder layer: the one before attention (ln1) and the one before the MLP (ln2).
_LN1 = ("input_layernorm", "ln_1", "self_attn_layer_norm")
_LN2 = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "final_layer_norm")


# ---------------------------------------------------------------------------------- tokens
def tokenizer_prepends_bos(tokenizer) -> bool:
    """Does ``tokenizer(text)`` put a BOS (or BERT's CLS) first by itself? Tested on "a", as
    TransformerLens' ``detect_tokenizer_bos_eos`` does."""
    ids = tokenizer("a")["input_ids"]
    lead = {t for t in (tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)) if t is not None}
    return len(ids) > 1 and ids[0] in lead


def bos_token_id(tokenizer) -> int:
    """The id TransformerLens prepends for ``prepend_bos=True``: the BOS token, or the EOS token
    for tokenizers without one (Qwen2's ``<|endoftext|>``, what TransformerLens' tokenizer setup
    installs as BOS)."""
    for t in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "cls_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if t is not None:
            return int(t)
    raise ValueError(f"{type(tokenizer).__name__} has no BOS, CLS or EOS token to prepend: "
                     "pass prepend_bos=False")


def tokens_with_bos(tokenizer, texts, prepend_bos: bool = True, padding_side: str = "left") -> dict:
    """Tokenize ``texts`` (a string or a list) with TransformerLens' ``prepend_bos`` semantics on
    every tokenizer: ``True`` -> exactly one BOS first, whether or not the tokenizer adds one by
    itself (SmolLM2's and Qwen2's do not, Llama's and Gemma's do); ``False`` -> no BOS. Nothing
    else special is added (no EOS). Returns ``{"input_ids", "attention_mask"}`` (long tensors
    [batch, pos]), padded on ``padding_side`` with the pad token (EOS if there is none). The
    tokenizer is not modified.

    Equal to TransformerLens 4: for a tokenizer that prepends BOS itself the text is tokenized
    as the tokenizer does it; otherwise TransformerLens reloads the tokenizer with
    ``add_bos_token=True`` (or prepends the BOS string), which gives the BOS id followed by the
    text's own tokens, as here."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not isinstance(t, str) for t in texts):
        raise ValueError("tokens_with_bos takes a string or a non-empty list of strings")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        bos = bos_token_id(tokenizer)
        rows = [[bos] + list(r) for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: give at least one non-empty string (or prepend_bos=True)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else int(pad)
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)           # [batch, pos]
    mask = torch.zeros((len(rows), n), dtype=torch.long)              # [batch, pos]
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------- norms
@dataclass(frozen=True)
class NormInfo:
    """A LayerNorm or RMSNorm written as TransformerLens does: ``norm(x) = (x - centre) / scale(x)
    * weight + bias`` with ``scale(x) = sqrt(mean((x - centre)^2) + eps)`` (``centre`` = the mean
    over d_model for LayerNorm, 0 for RMSNorm)."""

    module: nn.Module
    centering: bool               # LayerNorm (True) or RMSNorm (False)
    eps: float
    weight: torch.Tensor          # [d_model], the effective multiplier (Gemma's 1 + w included)
    bias: torch.Tensor | None     # [d_model] or None

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., 1] in float32 (what TransformerLens caches as ``hook_scale``)."""
        x = x.float()
        if self.centering:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()


def norm_info(module: nn.Module, d_model: int) -> NormInfo:
    """Read a norm module's kind, eps, weight and bias without per-architecture code: eps from
    ``eps`` / ``variance_epsilon``; the kind by whether the output ignores a constant shift of the
    input (LayerNorm does); the effective weight and bias from the outputs on a unit-RMS vector
    ``u`` and on ``-u`` (``(f(u) - f(-u)) / 2 = weight * u / sqrt(1 + eps)``), snapped to the
    module's own ``weight`` (or ``1 + weight``, Gemma) when they agree."""
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        raise TypeError(f"{type(module).__name__} has no eps / variance_epsilon: cannot treat it as a "
                        "LayerNorm or RMSNorm")
    eps = float(eps)
    p = next(module.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    u = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(d_model)], device=dev)
    u = u - u.mean()
    u = u / u.pow(2).mean().sqrt()                                   # mean 0, mean square 1
    dt = p.dtype if p is not None else torch.float32
    with torch.no_grad():          # .forward: the probe vectors must not reach hooks on the module (resid_mid)
        f_pos = module.forward(u.to(dt)[None, None]).float()[0, 0]          # [d_model]
        f_neg = module.forward((-u).to(dt)[None, None]).float()[0, 0]
        f_shift = module.forward((u + 3.0).to(dt)[None, None]).float()[0, 0]
    centering = bool(torch.allclose(f_shift, f_pos, rtol=1e-3, atol=1e-4 * float(f_pos.abs().max()) + 1e-6))
    weight = (f_pos - f_neg) / 2 * math.sqrt(1.0 + eps) / u           # [d_model]
    bias = (f_pos + f_neg) / 2
    own_w = getattr(module, "weight", None)
    if isinstance(own_w, torch.Tensor) and own_w.shape == weight.shape:
        tol = dict(rtol=1e-3, atol=1e-5 * float(weight.abs().max()) + 1e-6)
        if torch.allclose(own_w.float(), weight, **tol):
            weight = own_w
        elif torch.allclose(1.0 + own_w.float(), weight, **tol):
            weight = 1.0 + own_w
    own_b = getattr(module, "bias", None)
    if isinstance(own_b, torch.Tensor) and own_b.shape == bias.shape and torch.allclose(own_b.float(), bias, atol=1e-4):
        bias = own_b
    elif not centering or float(bias.abs().max()) <= 1e-6 * (float(weight.abs().max()) + 1):
        bias = None
    return NormInfo(module, centering, eps, weight, bias)


def _norm_in(layer: nn.Module, names) -> nn.Module | None:
    return next((getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)


# ---------------------------------------------------------------------------------- config names
class TLConfigNames:
    """TransformerLens' config names on ``ModelInfo`` (``model.cfg``): ``d_vocab``, ``n_ctx``,
    ``n_key_value_heads`` (``n_layers``, ``n_heads``, ``d_model``, ``d_head`` are fields already).
    ``n_key_value_heads`` is always an int (TransformerLens leaves it None without GQA)."""

    @property
    def d_vocab(self) -> int:
        """Vocabulary size (``vocab_size``)."""
        return self.vocab_size

    @property
    def n_ctx(self) -> int:
        """Context length (``max_ctx``)."""
        return self.max_ctx

    @property
    def n_key_value_heads(self) -> int:
        """Key/value heads per layer (``n_kv_heads``; = n_heads without GQA)."""
        return self.n_kv_heads


# ---------------------------------------------------------------------------------- the mixin
def _in_out(proj: nn.Module) -> torch.Tensor:
    """A projection's weight as [in, out] (nn.Linear stores [out, in], GPT-2's Conv1D [in, out])."""
    if isinstance(proj, nn.Linear):
        return proj.weight.T
    if type(proj).__name__ == "Conv1D":
        return proj.weight
    raise TypeError(f"unsupported projection type {type(proj).__name__}: expected nn.Linear or Conv1D")


def _bias(proj: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    b = getattr(proj, "bias", None)
    return b if isinstance(b, torch.Tensor) else like.new_zeros(n)


class TLIdioms:
    """TransformerLens' model-side idioms for ``HookedModel``: tokens (``to_str_tokens``,
    ``to_single_token``, ``get_token_position``), weights with TransformerLens' shapes (``W_Q`` ...
    ``b_U``, ``QK``/``OV`` as ``FactoredMatrix``), ``tokens_to_residual_directions`` and persistent
    hooks (``add_hook`` / ``reset_hooks``). Expects ``model``, ``tokenizer``, ``cfg``, ``layers``,
    ``attn``, ``hooks`` and ``hook_names`` on the class it is mixed into."""

    # ------------------------------------------------------------------ tokens
    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids instead of text")
        return self.tokenizer

    def to_str_tokens(self, input, prepend_bos: bool = True, padding_side=None) -> list:
        """Text or token ids -> one string per token (a list of lists for a list of texts or a
        [batch, pos] tensor with batch > 1). Text gets a BOS with ``prepend_bos=True``, as
        TransformerLens' default; token ids are decoded as they are."""
        tok = self._tokenizer()
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
        if isinstance(input, str):
            ids = tokens_with_bos(tok, input, prepend_bos)["input_ids"][0]
        else:
            ids = torch.as_tensor(input)
            if ids.dim() == 2 and ids.shape[0] > 1:
                return [self.to_str_tokens(row) for row in ids]
            ids = ids.reshape(-1)
        return tok.batch_decode([[int(t)] for t in ids.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); ValueError otherwise."""
        ids = tokens_with_bos(self._tokenizer(), string, prepend_bos=False)["input_ids"][0]
        if ids.numel() != 1:
            raise ValueError(f"{string!r} is {ids.numel()} tokens ({self.to_str_tokens(ids)}), not one: "
                             "to_single_token needs a string that is a single token")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        """One token id -> its string."""
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool = True,
                           padding_side=None) -> int:
        """Position of ``single_token`` (a one-token string or an id) in ``input`` (text, tokenized
        with ``prepend_bos``, or token ids [pos] / [1, pos]); ``mode`` "first" or "last"."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        if isinstance(input, str):
            toks = tokens_with_bos(self._tokenizer(), input, prepend_bos)["input_ids"][0]
        else:
            toks = torch.as_tensor(input)
            if toks.dim() == 2:
                if toks.shape[0] != 1:
                    raise ValueError(f"token ids must be [pos] or [1, pos], got {tuple(toks.shape)}")
                toks = toks[0]
        t = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = (toks == t).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"token {t} ({self.to_single_str_token(t)!r}) does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])

    # ------------------------------------------------------------------ weights
    def _attn_weights(self, layer: int) -> dict:
        """One layer's attention weights in TransformerLens' per-head layout."""
        a = self.attn[layer]
        H, KV, d, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.d_head, self.cfg.d_model
        mods = dict(a.named_children())
        if all(n in mods for n in _SPLIT_QKV):
            projs = [mods[n] for n in _SPLIT_QKV]
            ws = [_in_out(p) for p in projs]                                  # [D, heads*d]
            bs = [_bias(p, w.shape[1], w) for p, w in zip(projs, ws)]
        else:
            fused = next((mods[n] for n in _FUSED_QKV if n in mods), None)
            if fused is None:
                raise TypeError(
                    f"cannot find the q/k/v projections of {type(a).__name__} (looked for "
                    f"{'/'.join(_SPLIT_QKV)} or a fused {'/'.join(_FUSED_QKV)} with [q | k | v] blocks): "
                    "W_Q/W_K/W_V/QK/OV are not available for this architecture")
            w = _in_out(fused)                                                # [D, (H + 2 KV) d]
            b = _bias(fused, w.shape[1], w)
            sizes = [H * d, KV * d, KV * d]
            if w.shape[1] != sum(sizes):
                raise TypeError(f"{type(a).__name__}'s fused projection has {w.shape[1]} outputs, not "
                                f"(n_heads + 2 n_kv_heads) d_head = {sum(sizes)}: unknown layout")
            ws, bs = list(w.split(sizes, dim=1)), list(b.split(sizes))
        for w, n in zip(ws, (H, KV, KV)):
            if w.shape != (D, n * d):
                raise TypeError(f"{type(a).__name__}: a q/k/v projection is {tuple(w.shape)}, expected "
                                f"({D}, {n * d})")
        out = next((mods[n] for n in _OUT_PROJ if n in mods), None)
        if out is None:
            raise TypeError(f"cannot find the output projection of {type(a).__name__} (looked for "
                            f"{'/'.join(_OUT_PROJ)}): W_O/OV are not available for this architecture")
        wo = _in_out(out)                                                     # [H d, D]
        return {
            "W_Q": ws[0].reshape(D, H, d).permute(1, 0, 2),                   # [H, D, d]
            "W_K": ws[1].reshape(D, KV, d).permute(1, 0, 2),                  # [KV, D, d]
            "W_V": ws[2].reshape(D, KV, d).permute(1, 0, 2),                  # [KV, D, d]
            "W_O": wo.reshape(H, d, D),                                       # [H, d, D]
            "b_Q": bs[0].reshape(H, d), "b_K": bs[1].reshape(KV, d), "b_V": bs[2].reshape(KV, d),
            "b_O": _bias(out, D, wo),                                         # [D]
        }

    def _stack(self, key: str) -> torch.Tensor:
        return torch.stack([self._attn_weights(l)[key] for l in range(self.cfg.n_layers)])

    @property
    def W_Q(self) -> torch.Tensor:
        """Query weights [n_layers, n_heads, d_model, d_head] (``q = x @ W_Q + b_Q`` per head,
        before rotary embeddings and any q-norm)."""
        return self._stack("W_Q")

    @property
    def W_K(self) -> torch.Tensor:
        """Key weights [n_layers, n_key_value_heads, d_model, d_head]: at the KV-head count under
        GQA, as TransformerLens 4's ``W_K`` (HookedTransformer's ``_W_K``). Query head h reads KV
        head ``h // (n_heads // n_key_value_heads)``; ``QK`` uses the expanded form."""
        return self._stack("W_K")

    @property
    def W_V(self) -> torch.Tensor:
        """Value weights [n_layers, n_key_value_heads, d_model, d_head] (KV-head count, see W_K)."""
        return self._stack("W_V")

    @property
    def W_O(self) -> torch.Tensor:
        """Output weights [n_layers, n_heads, d_head, d_model]: head h writes ``z[h] @ W_O[l, h]``."""
        return self._stack("W_O")

    @property
    def b_Q(self) -> torch.Tensor:
        """[n_layers, n_heads, d_head]; zeros for bias-free models (TransformerLens 4 raises)."""
        return self._stack("b_Q")

    @property
    def b_K(self) -> torch.Tensor:
        """[n_layers, n_key_value_heads, d_head]; zeros for bias-free models."""
        return self._stack("b_K")

    @property
    def b_V(self) -> torch.Tensor:
        """[n_layers, n_key_value_heads, d_head]; zeros for bias-free models."""
        return self._stack("b_V")

    @property
    def b_O(self) -> torch.Tensor:
        """[n_layers, d_model]; zeros for bias-free models."""
        return self._stack("b_O")

    def _mlp_weights(self, layer: int) -> dict:
        """One layer's MLP weights in TransformerLens' layout (W_in/W_gate [d_model, d_mlp], W_out
        [d_mlp, d_model]), from the projections ``module_hooks.find_mlp_parts`` finds."""
        from .module_hooks import find_mlp, find_mlp_parts, mlp_part_error
        mlp = find_mlp(self.layers[layer], layer)
        parts = find_mlp_parts(mlp)
        if "pre" not in parts or "post" not in parts:
            raise TypeError(mlp_part_error(mlp, layer, "pre") + "; W_in/W_gate/W_out are not available")
        gated = "pre_linear" in parts
        w_in = _in_out(parts["pre_linear"] if gated else parts["pre"])          # [D, d_mlp]
        w_out = _in_out(parts["post"])                                          # [d_mlp, D]
        r = {"W_in": w_in, "W_out": w_out, "b_in": _bias(parts["pre_linear"] if gated else parts["pre"],
                                                          w_in.shape[1], w_in),
             "b_out": _bias(parts["post"], w_out.shape[1], w_out)}
        if gated:
            r["W_gate"] = _in_out(parts["pre"])
        return r

    def _mlp_stack(self, key: str) -> torch.Tensor:
        ws = [self._mlp_weights(l) for l in range(self.cfg.n_layers)]
        if key not in ws[0]:
            raise TypeError(f"{key} exists for gated MLPs only; {type(self.model).__name__}'s MLP has no "
                                 "gate projection (use W_in)")
        return torch.stack([w[key] for w in ws])

    @property
    def W_in(self) -> torch.Tensor:
        """MLP input weights [n_layers, d_model, d_mlp]: the up projection of a gated MLP
        (``hook_pre_linear = x @ W_in``), the first projection of a plain one (``hook_pre``)."""
        return self._mlp_stack("W_in")

    @property
    def W_gate(self) -> torch.Tensor:
        """Gate weights [n_layers, d_model, d_mlp] of a gated MLP (``hook_pre = x @ W_gate``);
        TypeError for plain MLPs."""
        return self._mlp_stack("W_gate")

    @property
    def W_out(self) -> torch.Tensor:
        """MLP output weights [n_layers, d_mlp, d_model]: ``mlp_out = hook_post @ W_out + b_out``
        (before a post-MLP norm where the model has one)."""
        return self._mlp_stack("W_out")

    @property
    def b_in(self) -> torch.Tensor:
        """[n_layers, d_mlp]; zeros for bias-free models."""
        return self._mlp_stack("b_in")

    @property
    def b_out(self) -> torch.Tensor:
        """[n_layers, d_model]; zeros for bias-free models."""
        return self._mlp_stack("b_out")

    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding [d_vocab, d_model], the stored weights (Gemma multiplies the looked-up
        rows by sqrt(d_model) in its forward; that factor is not in W_E)."""
        return self.model.get_input_embeddings().weight

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [d_model, d_vocab]: the LM head as stored (the final norm's weight is NOT
        folded in, as TransformerLens 4's default bridge; see ``tokens_to_residual_directions``)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise TypeError(f"{type(self.model).__name__} has no output embedding (LM head)")
        return _in_out(head)

    @property
    def b_U(self) -> torch.Tensor:
        """Unembedding bias [d_vocab] (zeros when the LM head has none)."""
        W_U = self.W_U                                                         # raises without an LM head
        return _bias(self.model.get_output_embeddings(), W_U.shape[1], W_U)

    @staticmethod
    def _expand_kv(w: torch.Tensor, n_heads: int) -> torch.Tensor:
        """[n_layers, n_kv, ...] -> [n_layers, n_heads, ...]: query head h reads KV head h // group."""
        return w if w.shape[1] == n_heads else w.repeat_interleave(n_heads // w.shape[1], dim=1)

    @property
    def QK(self):
        """QK circuit (Elhage et al. 2021, "QK and OV circuits"): ``FactoredMatrix(W_Q, W_K^T)``,
        [n_layers, n_heads, d_model, d_model], with W_K expanded to every query head. Bilinear in
        the residual stream before rotary embeddings (RoPE makes the true score position-dependent)."""
        from transformer_lens import FactoredMatrix
        return FactoredMatrix(self.W_Q, self._expand_kv(self.W_K, self.cfg.n_heads).transpose(-2, -1))

    @property
    def OV(self):
        """OV circuit (Elhage et al. 2021): ``FactoredMatrix(W_V, W_O)`` [n_layers, n_heads,
        d_model, d_model], W_V expanded to every query head."""
        from transformer_lens import FactoredMatrix
        return FactoredMatrix(self._expand_kv(self.W_V, self.cfg.n_heads), self.W_O)

    # ------------------------------------------------------------------ norms and directions
    def final_norm(self) -> NormInfo:
        """The norm before the unembedding, found as the last LayerNorm/RMSNorm outside the
        decoder layers (Llama's ``model.norm``, GPT-2's ``ln_f``, Gemma's ``model.norm``)."""
        inside = {id(m) for layer in self.layers for m in layer.modules()}
        cands = [m for m in self.model.modules()
                 if id(m) not in inside and "norm" in type(m).__name__.lower() and not list(m.children())]
        if not cands:
            raise TypeError(f"cannot find the final norm of {type(self.model).__name__} (no LayerNorm/RMSNorm "
                            "outside the decoder layers)")
        return norm_info(cands[-1], self.cfg.d_model)

    def layer_norm(self, layer: int, mlp_input: bool = False) -> NormInfo:
        """The norm at the input of layer ``layer``'s attention (``ln1``) or MLP (``ln2``)."""
        names = _LN2 if mlp_input else _LN1
        m = _norm_in(self.layers[layer], names)
        if m is None:
            raise TypeError(f"cannot find the {'pre-MLP' if mlp_input else 'pre-attention'} norm of layer {layer} "
                            f"(looked for {', '.join(names)})")
        return norm_info(m, self.cfg.d_model)

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The residual-stream direction whose dot product with ``resid / scale`` (the final norm's
        scale, see ``ActivationCache.apply_ln_to_stack``) is each token's logit: ``W_U[:, t]`` times
        the final norm's weight. That is TransformerLens' value with ``fold_ln`` (its
        ``enable_compatibility_mode``), so direct logit attributions sum to the logits (minus b_U
        and the final LayerNorm bias's contribution). ``tokens``: a one-token string, an id, or a
        tensor of ids -> [..., d_model] (a single token -> [d_model])."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        w = self.final_norm().weight                                           # [d_model]
        W_U = self.W_U                                                         # [d_model, d_vocab]
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return W_U[:, tokens.to(W_U.device)].movedim(0, -1) * w            # [..., d_model]
        t = int(tokens.item()) if isinstance(tokens, torch.Tensor) else int(tokens)
        return W_U[:, t] * w

    # ------------------------------------------------------------------ persistent hooks
    def add_hook(self, name, hook, dir: str = "fwd", is_permanent: bool = False, level=None,
                 prepend: bool = False) -> None:
        """Add a hook that stays until ``reset_hooks()`` (TransformerLens' ``add_hook``): ``name`` a
        hook name or a predicate on names, ``hook(tensor, hook=...)``; ``dir="bwd"``: ``hook(grad,
        hook=...)`` during backward passes. It is active in every forward of this model
        (``model(...)``, ``run_with_cache``, ``generate``) in every thread, entered through the
        probe's ``hooks`` context (``first=True``) around the wrapped model's forward, so on a hook
        point it runs before the hooks of a ``hooks`` / ``run_with_hooks`` / ``run_with_cache``
        context, as in TransformerLens (``run_with_cache`` stores the edited value).
        ``is_permanent`` hooks survive ``reset_hooks()`` unless ``including_permanent=True``;
        ``level`` is accepted and ignored."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', not {dir!r}")
        if not callable(hook):
            raise TypeError(f"hook for {name!r} is not callable: {hook!r}")
        with self.hooks(**{f"{dir}_hooks": [(name, hook)]}):   # validates the name now, not at the next forward
            pass
        entries = self.__dict__.setdefault("_tl_persistent", [])
        entry = (name, hook, bool(is_permanent), dir)
        if prepend:
            entries.insert(0, entry)
        else:
            entries.append(entry)
        if not self.model.__dict__.get("_headscope_tl_runner"):
            # the wrapped model's forward enters the persistent hooks; the hooks find this HookedModel
            # through the module (kept out of the module tree), so a deepcopy's hooks find the copy
            self.model.__dict__["_headscope_owner"] = self
            self.model.__dict__["_headscope_tl_runner"] = True
            self.model.register_forward_pre_hook(_enter_persistent)
            self.model.register_forward_hook(_leave_persistent, always_call=True)

    def reset_hooks(self, including_permanent: bool = False, **_ignored) -> None:
        """Remove hooks added with ``add_hook`` (permanent ones too with ``including_permanent``).
        Context hooks (``with model.hooks(...)``, ``run_with_hooks``) are not touched."""
        entries = self.__dict__.get("_tl_persistent", [])
        entries[:] = [] if including_permanent else [e for e in entries if e[2]]


_persistent = threading.local()        # per thread: the stack of entered ``hooks`` contexts


def _enter_persistent(mod, args):
    owner = mod.__dict__.get("_headscope_owner")
    entries = owner.__dict__.get("_tl_persistent", []) if owner is not None else []
    stack = _persistent.__dict__.setdefault("stack", [])
    stack.append(None)               # first, so that _leave_persistent pops this entry even if entering fails
    if entries:
        cm = owner.hooks(fwd_hooks=[(n, f) for n, f, _, d in entries if d == "fwd"],
                         bwd_hooks=[(n, f) for n, f, _, d in entries if d == "bwd"], first=True)
        cm.__enter__()
        stack[-1] = cm


def _leave_persistent(mod, args, output):
    stack = _persistent.__dict__.get("stack", [])
    cm = stack.pop() if stack else None
    if cm is not None:
        cm.__exit__(None, None, None)
