"""TransformerLens hook names, parsed; the hook object handed to hook functions; the cache.

Names (layer l):
  blocks.{l}.hook_resid_pre / hook_resid_mid / hook_resid_post   [batch, pos, d_model]
  blocks.{l}.attn.hook_q                                         [batch, pos, head, d_head]  (after RoPE)
  blocks.{l}.attn.hook_k / hook_v                                [batch, pos, kv_head, d_head] (GQA: KV heads)
  blocks.{l}.attn.hook_attn_scores                               [batch, head, query_pos, key_pos] (-inf masked)
  blocks.{l}.attn.hook_pattern                                   [batch, head, query_pos, key_pos]
  blocks.{l}.attn.hook_z                                         [batch, pos, head, d_head]
  blocks.{l}.attn.hook_result                                    [batch, pos, head, d_model]
  hook_embed                                                     [batch, pos, d_model] (token embedding as it
                                                                 enters the residual, scaled where the model scales)
  blocks.{l}.hook_attn_out                                       [batch, pos, d_model] (attention module output)
  blocks.{l}.hook_mlp_in / hook_mlp_out                          [batch, pos, d_model] (MLP module input / output)
  blocks.{l}.mlp.hook_pre                                        [batch, pos, d_mlp] (pre-activation: the gate
                                                                 projection's output in a gated MLP)
  blocks.{l}.mlp.hook_pre_linear                                 [batch, pos, d_mlp] (gated MLPs: the up projection)
  blocks.{l}.mlp.hook_post                                       [batch, pos, d_mlp] (the neurons: input of the
                                                                 MLP's output projection)
Gradients: any name + "_grad" in ``run_with_cache(..., incl_bwd=True)``; ``bwd_hooks`` get d(metric)/d(tensor).
hook_embed, hook_attn_out, hook_mlp_in, hook_mlp_out and the mlp.* neuron hooks are served by ``module_hooks`` (torch hooks on the
embedding, attention and MLP modules found by type/name search). hook_mlp_in is the MLP module's input, i.e.
after the pre-MLP norm (TransformerLens hooks it before ln2).
q and k are taken where the attention function sees them, after rotary embeddings (TransformerLens
calls these hook_rot_q / hook_rot_k; both names are accepted). Under a KV cache, k and v cover every
cached position and q only the new ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

ATTN_KINDS = ("q", "k", "v", "attn_scores", "pattern", "z", "result")
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
MODULE_KINDS = ("attn_out", "mlp_in", "mlp_out")           # block-level, served by probe/module_hooks.py
MLP_KINDS = ("pre", "pre_linear", "post")                  # blocks.{l}.mlp.hook_*, also module_hooks.py
EMBED = "embed"                                            # "hook_embed"; stored under layer -1
_ALIASES = {"rot_q": "q", "rot_k": "k", "scores": "attn_scores"}
_NAME = re.compile(r"^blocks\.(\d+)\.(?:(attn|mlp)\.)?hook_(\w+)$")
_KINDS = ATTN_KINDS + RESID_KINDS + MODULE_KINDS + MLP_KINDS


def hook_name(kind: str, layer: int) -> str:
    """(kind, layer) -> the TransformerLens hook name, e.g. ("pattern", 3) -> "blocks.3.attn.hook_pattern";
    aliases ``rot_q``/``rot_k``/``scores`` accepted, "embed" -> "hook_embed". Raises KeyError for an
    unknown kind."""
    kind = _ALIASES.get(kind, kind)
    if kind == EMBED:
        return "hook_embed"
    if kind in RESID_KINDS + MODULE_KINDS:
        return f"blocks.{layer}.hook_{kind}"
    if kind in ATTN_KINDS:
        return f"blocks.{layer}.attn.hook_{kind}"
    if kind in MLP_KINDS:
        return f"blocks.{layer}.mlp.hook_{kind}"
    raise KeyError(f"unknown hook kind {kind!r}; known: {_KINDS + (EMBED,)}")


def parse(name: str, n_layers: int) -> tuple[int, str]:
    """'blocks.3.attn.hook_pattern' -> (3, 'pattern'), with a clear error for anything else."""
    if name == "hook_embed":
        return -1, EMBED
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"unknown hook name {name!r}: expected e.g. 'blocks.0.attn.hook_pattern' "
                         f"or 'blocks.0.hook_resid_pre'")
    layer, prefix, kind = int(m.group(1)), m.group(2), _ALIASES.get(m.group(3), m.group(3))
    if kind not in _KINDS:
        raise ValueError(f"unknown hook {name!r}: kinds are {_KINDS} (and 'hook_embed')")
    if (prefix == "attn") != (kind in ATTN_KINDS) or (prefix == "mlp") != (kind in MLP_KINDS):
        raise ValueError(f"hook {name!r}: did you mean {hook_name(kind, layer)!r}?")
    if not 0 <= layer < n_layers:
        raise IndexError(f"hook {name!r}: layer {layer} out of range, the model has {n_layers} layers")
    return layer, kind


def all_names(n_layers: int) -> list[str]:
    """Every hook name of an ``n_layers``-layer model in TransformerLens order: "hook_embed", then per
    layer resid_pre, the attention hooks, attn_out, resid_mid, mlp_in, the MLP neuron hooks, mlp_out,
    resid_post. ``HookedModel.hook_names`` filters it to what a model serves."""
    per_layer = RESID_KINDS[:1] + ATTN_KINDS + ("attn_out", "resid_mid", "mlp_in") + MLP_KINDS + \
        ("mlp_out", "resid_post")
    return ["hook_embed"] + [hook_name(k, l) for l in range(n_layers) for k in per_layer]


@dataclass
class Hook:
    """What a hook function receives as ``hook`` (TransformerLens' HookPoint, reduced).

    ``name``: the hook point's name, e.g. "blocks.3.attn.hook_pattern"."""

    name: str

    def layer(self) -> int:
        """The layer index of a ``blocks.{l}....`` hook name (as TransformerLens' ``HookPoint.layer``);
        raises IndexError for "hook_embed", which has none."""
        return int(self.name.split(".")[1])


class ActivationCache(dict):
    """Name -> tensor, indexable TransformerLens-style: ``cache["pattern", 3]``, ``cache["z", 0]``."""

    def __getitem__(self, key):
        if isinstance(key, tuple):
            kind, layer = key
            grad = kind.endswith("_grad")
            key = hook_name(kind[:-5] if grad else kind, layer) + ("_grad" if grad else "")
        try:
            return super().__getitem__(key)
        except KeyError:
            raise KeyError(f"{key!r} was not cached; cached names: {sorted(self)[:8]}…") from None

    def stack(self, kind: str) -> torch.Tensor:
        """All cached layers of one kind stacked on a new first (layer) axis."""
        grad = kind.endswith("_grad")
        base, suffix = (kind[:-5], "_grad") if grad else (kind, "")
        layers = sorted(int(n.split(".")[1]) for n in self
                        if n.startswith("blocks.") and n == hook_name(base, int(n.split(".")[1])) + suffix)
        return torch.stack([self[kind, l] for l in layers])
