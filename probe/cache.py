"""``ActivationCache``: what ``run_with_cache`` returns, with TransformerLens 4's cache helpers.

It extends the name -> tensor store of ``hooks.ActivationCache`` (``cache["pattern", 3]``,
``cache.stack(kind)``) with TransformerLens' indexing (negative layers ``cache["pattern", -1]``,
``(name, layer, sublayer)`` keys, short names ``cache["embed"]``) and helpers: ``stack_activation``,
``accumulated_resid`` (logit lens), ``decompose_resid``, ``stack_head_results``,
``apply_ln_to_stack``, ``logit_attrs`` (direct logit attribution), ``get_full_resid_decomposition``,
``remove_batch_dim``. Same names, arguments, shapes and numbers as TransformerLens 4.

Norm scales are not cached (headscope has no ``hook_scale``): ``ln_final.hook_scale`` and
``blocks.{l}.ln1/ln2.hook_scale`` are computed when asked for, from the cached residual stream that
enters that norm (``blocks.{n_layers-1}.hook_resid_post`` for the final norm, ``hook_resid_pre`` /
``hook_resid_mid`` for a layer's ln1 / ln2): ``sqrt(mean((x - centre)^2) + eps)`` in float32, the
value TransformerLens caches. The decomposition of the residual stream into component outputs is
that of Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits", section
"Residual stream"; the logit lens is nostalgebraist 2020, "interpreting GPT: the logit lens".
"""
from __future__ import annotations

import logging
import re

import torch

from . import hooks

logger = logging.getLogger(__name__)

_LN_NAME = re.compile(r"^(?:ln_final|blocks\.(\d+)\.ln([12]))\.hook_scale$")
_TL_ATTN = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_TL_MLP = ("pre", "post", "mid", "pre_linear")
_TL_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
             "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_TL_SUBLAYER = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


def tl_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' ``get_act_name``: ("pattern", 3) -> "blocks.3.attn.hook_pattern",
    ("scale", 4, "ln1") -> "blocks.4.ln1.hook_scale", "embed" -> "hook_embed"."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    m = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if m is not None:
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or None
    name = _TL_ALIAS.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in _TL_ATTN:
        layer_type = "attn"
    elif name in _TL_MLP:
        layer_type = "mlp"
    elif layer_type in _TL_SUBLAYER:
        layer_type = _TL_SUBLAYER[layer_type]
    full += (f"{layer_type}." if layer_type else "") + f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


def apply_slice(t: torch.Tensor, s, dim: int) -> torch.Tensor:
    """TransformerLens' ``Slice`` on one dimension: None (all), an int (index, drops the dim), a
    (start, stop[, step]) tuple, a ``slice``, or a list / tensor of indices."""
    if s is None:
        return t
    if isinstance(s, int):
        return t.select(dim, s)
    if isinstance(s, tuple):
        s = slice(*s)
    elif isinstance(s, (list, torch.Tensor)):
        s = torch.as_tensor(s, device=t.device, dtype=torch.long)
    elif not isinstance(s, slice):
        raise TypeError(f"unsupported slice {s!r}: give None, an int, a tuple, a slice, a list or a tensor")
    idx = [slice(None)] * t.dim()
    idx[dim] = s
    return t[tuple(idx)]


class ActivationCache(hooks.ActivationCache):
    """Name -> tensor from one forward, indexable and analysable as TransformerLens' cache.

    ``model`` (set by ``run_with_cache``) gives the layer count for negative indices and the
    weights and norms the helpers need; ``has_batch_dim`` is False after ``remove_batch_dim``."""

    def __init__(self, *args, model=None, has_batch_dim: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---------------------------------------------------------------- indexing
    @property
    def cache_dict(self) -> dict:
        """TransformerLens' attribute: the name -> tensor mapping (the cache itself)."""
        return self

    def _model(self, what: str):
        if self.model is None:
            raise ValueError(f"{what} needs the model: use the cache from model.run_with_cache(...) or build "
                             "it as ActivationCache(..., model=model)")
        return self.model

    @property
    def n_layers(self) -> int:
        """The model's layer count (what negative layer indices count from)."""
        return self._model("the layer count").cfg.n_layers

    def __getitem__(self, key):
        if isinstance(key, str):
            if dict.__contains__(self, key):
                return dict.__getitem__(self, key)
            m = _LN_NAME.match(key)
            if m is not None:
                layer = self.n_layers if m.group(1) is None else int(m.group(1))
                return self.ln_scale(layer, mlp_input=m.group(2) == "2")
            full = tl_act_name(key)
            if full != key:
                return self[full]
            try:                                   # an alias: hook_rot_q / hook_rot_k are stored as hook_q / hook_k
                layer, kind = hooks.parse(key, self.n_layers if self.model is not None else 1 << 30)
                canonical = hooks.hook_name(kind, layer)
            except (ValueError, KeyError, IndexError):
                canonical = key
            if canonical != key and dict.__contains__(self, canonical):
                return dict.__getitem__(self, canonical)
            return super().__getitem__(key)        # KeyError listing what was cached
        if not isinstance(key, tuple) or not 1 <= len(key) <= 3:
            raise KeyError(f"cache keys are names or (name, layer[, sublayer]) tuples, got {key!r}")
        kind, layer, sub = (tuple(key) + (None, None))[:3]
        if layer is not None and layer < 0:
            layer += self.n_layers                   # cache["pattern", -1]: the last layer
        if sub is None and layer is not None:
            try:
                return super().__getitem__((kind, layer))
            except KeyError:
                pass
        return self[tl_act_name(kind, layer, sub)]

    def to(self, device) -> "ActivationCache":
        """Move every tensor to ``device`` (in place; returns the cache)."""
        for k in list(self):
            dict.__setitem__(self, k, dict.__getitem__(self, k).to(device))
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dimension of a batch-1 cache (in place; returns the cache)."""
        if not self.has_batch_dim:
            logger.warning("Tried removing batch dimension after already having removed it.")
            return self
        sizes = {v.shape[0] for v in self.values() if v.dim() > 0}
        if sizes - {1}:
            raise ValueError(f"cannot remove the batch dimension: the cache holds batch sizes {sorted(sizes)}, "
                             "not 1 (index one example first, e.g. tokens[i:i+1])")
        for k in list(self):
            v = dict.__getitem__(self, k)
            if v.dim() > 0:
                dict.__setitem__(self, k, v[0])
        self.has_batch_dim = False
        return self

    # ---------------------------------------------------------------- norms
    def ln_scale(self, layer: int | None = None, mlp_input: bool = False) -> torch.Tensor:
        """The scale [batch, pos, 1] (float32) of the norm in front of layer ``layer``'s attention
        (ln1) or MLP (``mlp_input``, ln2), or of the final norm (``layer`` None, -1 or n_layers),
        computed from the cached residual stream entering that norm."""
        model = self._model("a norm scale")
        n = model.cfg.n_layers
        if layer is None or layer == -1 or layer == n:
            if mlp_input:
                raise ValueError("mlp_input=True has no meaning for the final norm (layer=n_layers)")
            return model.final_norm().scale(self["resid_post", n - 1])
        return model.layer_norm(layer, mlp_input).scale(self["resid_mid" if mlp_input else "resid_pre", layer])

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Treat each component of ``residual_stack`` [components, (batch,) pos, d_model] as input to
        the norm before layer ``layer`` (None / -1 / n_layers: the final norm) and apply the norm's
        scaling with the scale of the whole residual stream there (``ln_scale``): centre (LayerNorm
        only) and divide. The norm's weight and bias are not applied (TransformerLens folds them
        into the next weights; headscope keeps weights as stored, and ``logit_attrs`` multiplies
        the final norm's weight into the token directions). ``pos_slice`` / ``batch_slice``:
        slices already applied to the stack, applied here to the scale. With ``recompute_ln`` at
        the final layer each component goes through the final norm module itself (its own
        statistics, weight and bias: the logit lens)."""
        model = self._model("apply_ln_to_stack")
        n = model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n
        if has_batch_dim:
            residual_stack = apply_slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == n:
            norm = model.final_norm().module
            out = []
            for comp in residual_stack:                                  # [(batch,) pos, d_model]
                x = comp
                if not has_batch_dim:
                    x = x.unsqueeze(0)
                if x.dim() == 2:
                    x = x.unsqueeze(1)
                out.append(norm(x).reshape(comp.shape))
            return torch.stack(out)
        info = model.final_norm() if layer == n else model.layer_norm(layer, mlp_input)
        if info.centering:
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scale = apply_slice(self.ln_scale(layer, mlp_input), pos_slice, -2)   # [(batch,) pos, 1]
        if self.has_batch_dim:
            scale = apply_slice(scale, batch_slice, 0)
        return residual_stack / scale

    # ---------------------------------------------------------------- stacks
    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
                         ) -> torch.Tensor:
        """``activation_name`` of every layer below ``layer`` (-1 / None: all) stacked on a new first
        axis: [layers, ...]."""
        if layer is None or layer == -1:
            layer = self.n_layers
        return torch.stack([self[activation_name, l, sublayer_type] for l in range(layer)])

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream at each layer's input up to ``layer`` (None / -1: also the final
        residual, labelled "final_post"): [components, (batch,) pos, d_model], labels "{l}_pre",
        "{l}_mid". ``apply_ln`` at the final layer runs each through the final norm (logit lens:
        ``@ model.W_U`` gives logits); at an inner layer it divides by that layer's cached scale."""
        n = self.n_layers
        if layer is None or layer == -1:
            layer = n
        comps, labels = [], []
        for l in range(layer + 1):
            if l == n:
                comps.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            comps.append(self["resid_pre", l])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                comps.append(self["resid_mid", l])
                labels.append(f"{l}_mid")
        stack = torch.stack([apply_slice(c, pos_slice, -2) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def embeddings(self) -> list:
        """[(label, tensor [(batch,) pos, d_model])] of what enters the residual stream before layer 0:
        "embed" (``hook_embed``) and, for models with learned absolute positions (GPT-2), "pos_embed"
        (``hook_pos_embed`` if cached, else ``resid_pre`` of layer 0 minus ``hook_embed`` when that
        is not zero: the position embedding added to the token embedding)."""
        out = []
        if dict.__contains__(self, "hook_embed"):
            out.append(("embed", dict.__getitem__(self, "hook_embed")))
        if dict.__contains__(self, "hook_pos_embed"):
            out.append(("pos_embed", dict.__getitem__(self, "hook_pos_embed")))
        elif out and dict.__contains__(self, "blocks.0.hook_resid_pre"):
            rest = dict.__getitem__(self, "blocks.0.hook_resid_pre") - out[0][1]
            if rest.abs().max() > 0:
                out.append(("pos_embed", rest))
        return out

    def _check_additive(self, stack: torch.Tensor, layer: int, mlp_input: bool, pos_slice, what: str) -> None:
        """Warn when the components do not sum to the residual stream they decompose (when cached)."""
        target = f"blocks.{layer}.hook_resid_mid" if mlp_input else f"blocks.{layer - 1}.hook_resid_post"
        if layer == 0 and not mlp_input:
            target = "blocks.0.hook_resid_pre"
        if not dict.__contains__(self, target):
            return
        want = apply_slice(dict.__getitem__(self, target), pos_slice, -2)
        if stack.shape[1:] != want.shape:
            return
        err = (stack.sum(0) - want).abs().max().item()
        if err > 1e-3 * max(1.0, want.abs().max().item()):
            logger.warning("%s: the components miss %s by up to %.3g: they are not additive terms of the "
                           "residual stream on this model (e.g. Gemma normalises each branch's output again "
                           "before adding it, so per-head results do not add up to hook_attn_out).", what, target, err)

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream entering ``layer`` (None / -1: the final one) as the stack of what
        wrote it: "embed" and "pos_embed" (see ``embeddings``), then "{l}_attn_out" and
        "{l}_mlp_out" per layer below (``mode`` "attn" / "mlp" keeps one kind), and with
        ``mlp_input`` layer ``layer``'s attention too. [components, (batch,) pos, d_model]; the
        components sum to the residual stream (a warning says so where they do not: Gemma's
        post-attention / post-MLP norms). Needs ``hook_embed``, ``hook_attn_out`` and ``hook_mlp_out``
        in the cache (``run_with_cache`` with no ``names_filter`` caches them)."""
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', not {mode!r}")
        if layer is None or layer == -1:
            layer = self.n_layers
        comps, labels = [], []
        if incl_embeds:
            for label, t in self.embeddings():
                comps.append(t)
                labels.append(label)
        for l in range(layer):
            if mode != "mlp":
                comps.append(self["attn_out", l])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                comps.append(self["mlp_out", l])
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            comps.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        if not comps:
            raise ValueError("decompose_resid found nothing to stack (cache hook_embed, or pick layer > 0)")
        stack = torch.stack([apply_slice(c, pos_slice, -2) for c in comps])
        if mode == "all" and incl_embeds:
            self._check_additive(stack, layer, mlp_input, pos_slice, "decompose_resid")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Fill ``blocks.{l}.attn.hook_result`` [batch, pos, head, d_model] = z @ W_O per head from
        the cached ``hook_z`` where it was not cached."""
        W_O = None
        for l in range(self.n_layers):
            name = hooks.hook_name("result", l)
            if dict.__contains__(self, name):
                continue
            if W_O is None:
                W_O = self.model.W_O.detach()                           # [layer, head, d_head, d_model]
            z = self["z", l]                                            # [(batch,) pos, head, d_head]
            dict.__setitem__(self, name, torch.einsum("...hd,hdm->...hm", z, W_O[l].to(z.dtype)))

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's output of the layers below ``layer`` (-1 / None: all) as a stack
        [layer * head, (batch,) pos, d_model] labelled "L{l}H{h}" (``hook_result``, computed from
        ``hook_z`` if not cached); ``incl_remainder`` adds the rest of the residual stream
        (``resid_post`` of layer - 1 minus the heads) as "remainder"."""
        n = self.n_layers
        if layer is None or layer == -1:
            layer = n
        self.compute_head_results()
        H = self.model.cfg.n_heads
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(H)]
        if layer > 0:
            parts = [apply_slice(self["result", l], pos_slice, -3) for l in range(layer)]   # [.., pos, H, d]
            comps = torch.cat(parts, dim=-2).movedim(-2, 0)             # [layer*H, (batch,) pos, d_model]
            if incl_remainder:
                rest = apply_slice(self["resid_post", layer - 1], pos_slice, -2) - comps.sum(0)
                comps = torch.cat([comps, rest[None]])
                labels.append("remainder")
        elif incl_remainder:
            comps = apply_slice(self["resid_post", layer - 1], pos_slice, -2)[None]
            labels.append("remainder")
        else:
            ref = apply_slice(self["z", 0], pos_slice, -3)
            comps = ref.new_zeros((0, *ref.shape[:-2], self.model.cfg.d_model))
        if apply_ln:
            comps = self.apply_ln_to_stack(comps, layer, pos_slice=pos_slice)
        return (comps, labels) if return_labels else comps

    def stack_neuron_results(self, layer: int = -1, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False):
        """Every MLP neuron's output of the layers below ``layer`` (-1 / None: all), TransformerLens'
        ``stack_neuron_results``: [layer * n_neurons, (batch,) pos, d_model] labelled "L{l}N{n}",
        ``hook_post[..., n] * W_out[l, n]`` (b_out left out); ``neuron_slice`` picks neurons within
        each layer; ``incl_remainder`` adds the rest of the residual stream (``resid_post`` of
        layer - 1 minus the neurons) as "remainder"."""
        model = self._model("stack_neuron_results")
        if layer is None or layer == -1:
            layer = model.cfg.n_layers
        d_mlp = model.W_out.shape[1]
        idx = apply_slice(torch.arange(d_mlp), neuron_slice, 0).reshape(-1)
        comps = self.neuron_terms(layer, pos_slice)                         # [layer*d_mlp, ..., d_model]
        keep = (torch.arange(layer)[:, None] * d_mlp + idx[None]).reshape(-1)
        comps = comps[keep]
        labels = [f"L{l}N{int(i)}" for l in range(layer) for i in idx]
        if incl_remainder and layer > 0:
            rest = apply_slice(self["resid_post", layer - 1], pos_slice, -2) - comps.sum(0)
            comps = torch.cat([comps, rest[None].to(comps.dtype)])
            labels.append("remainder")
        if apply_ln:
            comps = self.apply_ln_to_stack(comps, layer, pos_slice=pos_slice)
        return (comps, labels) if return_labels else comps

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False):
        """Every head's output, each MLP's output, the embeddings and the summed output biases
        ("bias") entering ``layer`` (None / -1: the final residual stream), stacked: the components
        sum to the residual stream. ``expand_neurons=True`` (TransformerLens' default) splits each
        MLP into its neurons, "L{l}N{n}" = ``hook_post[..., n] * W_out[l, n]`` [(batch,) pos, d_model]
        (the MLP's output bias joins "bias"): layers × d_mlp terms, so slice positions
        (``pos_slice``) on long inputs. Needs ``blocks.{l}.mlp.hook_post`` cached."""
        model = self._model("get_full_resid_decomposition")
        n = model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        comps = [heads]
        if layer > 0 and expand_neurons:
            comps.append(self.neuron_terms(layer, pos_slice).to(heads.dtype))     # [layer*d_mlp, ..., d_model]
            labels = labels + [f"L{l}N{i}" for l in range(layer) for i in range(model.W_out.shape[1])]
        elif layer > 0:
            mlps, mlp_labels = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                                    incl_embeds=False, mode="mlp", return_labels=True)
            comps.append(mlps)
            labels = labels + mlp_labels
        for label, t in self.embeddings():
            comps.append(apply_slice(t, pos_slice, -2)[None])
            labels.append(label)
        n_bias = layer + (1 if mlp_input else 0)
        b_O = model.b_O.detach()[:n_bias].sum(0) if n_bias else heads.new_zeros(model.cfg.d_model)
        if expand_neurons and layer > 0:
            b_O = b_O + model.b_out.detach()[:layer].sum(0).to(b_O.dtype)
        comps.append(b_O.to(heads.dtype).expand(1, *heads.shape[1:]))
        labels.append("bias")
        stack = torch.cat(comps)
        self._check_additive(stack, layer, mlp_input, pos_slice, "get_full_resid_decomposition")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def neuron_terms(self, layer: int, pos_slice=None) -> torch.Tensor:
        """What each MLP neuron of the layers below ``layer`` writes to the residual stream,
        ``hook_post[..., n] * W_out[l, n]``: [layer * d_mlp, (batch,) pos, d_model] (labels
        "L{l}N{n}"; the output bias b_out is left out)."""
        model = self._model("neuron_terms")
        W_out = model.W_out.detach()                                         # [L, d_mlp, d_model]
        parts = []
        for l in range(layer):
            name = hooks.hook_name("post", l)
            if not dict.__contains__(self, name):
                raise KeyError(f"{name!r} was not cached: per-neuron terms need the MLP activations; "
                               "cache them (run_with_cache caches every hook by default) or pass "
                               "expand_neurons=False")
            post = apply_slice(dict.__getitem__(self, name), pos_slice, -2)   # [(batch,) pos, d_mlp]
            parts.append(torch.einsum("...n,nm->n...m", post, W_out[l].to(post.dtype)))
        return torch.cat(parts)

    # ---------------------------------------------------------------- attribution
    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Direct logit attribution (Elhage et al. 2021, "Residual stream"; Wang et al. 2022, IOI,
        section 3.1): each component's contribution to the logit of ``tokens`` (minus that of
        ``incorrect_tokens``): ``apply_ln_to_stack(stack) . model.tokens_to_residual_directions(t)``,
        i.e. the component divided by the final norm's scale, dotted with the unembedding column
        times the final norm's weight. Over a ``decompose_resid`` stack of the final layer the
        attributions sum to the logit (minus b_U and a LayerNorm's bias term). ``tokens``: a
        string, an id, [batch] (one per example), [pos] or [batch, pos]. Returns
        [components, (batch,) (pos)]."""
        model = self._model("logit_attrs")

        def as_shape(t):
            if isinstance(t, str):
                return torch.as_tensor(model.to_single_token(t))
            return torch.as_tensor(t)

        directions = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if as_shape(tokens).shape != as_shape(incorrect_tokens).shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got "
                                 f"{tuple(as_shape(tokens).shape)} and {tuple(as_shape(incorrect_tokens).shape)}")
            directions = directions - model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if (has_batch_dim and not isinstance(batch_slice, int) and scaled.dim() == 4 and directions.dim() == 2
                and directions.shape[0] == scaled.shape[1]):
            directions = directions.unsqueeze(-2)       # one token per example: broadcast over positions
        return (scaled * directions.to(scaled.dtype)).sum(-1)
