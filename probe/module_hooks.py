"""Hook points served by plain PyTorch module hooks, found without per-architecture code, and
backward (gradient) hooks for every hook name.

- ``hook_embed``: output of ``get_input_embeddings()`` ([batch, pos, d_model]; Gemma's embedding
  module already includes its sqrt(d_model) scale).
- ``blocks.{l}.hook_attn_out``: what decoder layer l's attention branch adds to the residual stream
  ([batch, pos, d_model]): the attention module's output, or, in layers with norms on the branches
  ("sandwich" norms: Gemma 2/3, OLMo-2, found by a ``post_feedforward_layernorm`` child), the output
  of the branch's ``post_attention_layernorm`` — as TransformerLens, so decompositions add up.
  ``hook_mlp_out`` likewise: the MLP's output, or ``post_feedforward_layernorm``'s.
- ``blocks.{l}.hook_mlp_in`` / ``hook_mlp_out``: input / output of layer l's MLP module, found as a
  child named ``mlp``/``feed_forward``/``ffn``/``block_sparse_moe`` or a child whose class name says
  MLP / FeedForward / MoE. A model without one gets a clear error when these hooks are asked for.
- ``blocks.{l}.mlp.hook_pre`` / ``hook_pre_linear`` / ``hook_post`` ([batch, pos, d_mlp], the
  neurons, as TransformerLens): in a gated MLP (``gate_proj``/``up_proj``/``down_proj``, also
  ``w1``/``w3``/``w2``) ``hook_pre`` is the gate projection's output, ``hook_pre_linear`` the up
  projection's and ``hook_post`` the input of the down projection, act(pre) * pre_linear; in a plain
  MLP (``fc1``/``fc2``, ``c_fc``/``c_proj``, ``dense_h_to_4h``/``dense_4h_to_h``, ``up_proj``/
  ``down_proj``) ``hook_pre`` is the first projection's output and ``hook_post`` the second's input.
  An MLP with a fused gate+up projection serves ``hook_post`` only; a mixture of experts none.

Backward hooks follow TransformerLens: ``bwd_hooks=[(name, fn)]`` call ``fn(grad, hook=...)`` with
d(whatever is back-propagated)/d(the hooked tensor), same shape as the forward tensor; they are
implemented as forward hooks that call ``tensor.register_hook`` on the hooked tensor, so they fire
whenever a backward pass runs through that forward (also after the ``hooks`` block closed).

Hooks are registered on first use (``LazyHooks``) and read per call through
``state.hooks.get((layer, kind), ())`` (``hook_embed`` is stored under layer -1).
"""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from .hooks import EMBED, MLP_KINDS, Hook, hook_name

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_MLP_TYPES = ("MLP", "FeedForward", "Moe", "MoE")


def find_mlp(layer: nn.Module, index: int) -> nn.Module:
    """The MLP module of one decoder layer (by attribute name, then by class name)."""
    for n in _MLP_NAMES:
        m = getattr(layer, n, None)
        if isinstance(m, nn.Module):
            return m
    for n, m in layer.named_children():
        if any(t in type(m).__name__ for t in _MLP_TYPES):
            return m
    kids = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children())
    raise TypeError(f"cannot find the MLP module of decoder layer {index} ({type(layer).__name__}); its "
                    f"children are: {kids}. hook_mlp_in / hook_mlp_out need a child named one of "
                    f"{_MLP_NAMES} or a class whose name contains one of {_MLP_TYPES}")


# (pre, pre_linear, post) projection names: the module whose output is hook_pre / hook_pre_linear,
# and the one whose input is hook_post
_GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_PLAIN = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"), ("up_proj", "down_proj"),
          ("fc_in", "fc_out"))
_FUSED_UP = ("gate_up_proj",)


def find_mlp_parts(mlp: nn.Module) -> dict[str, nn.Module]:
    """The MLP's projections by neuron hook: {"pre": module (output hooked), "pre_linear": module
    (output), "post": module (input)}; kinds this MLP cannot serve are left out."""
    kids = dict(mlp.named_children())
    for g, u, d in _GATED:
        if all(isinstance(kids.get(n), nn.Module) for n in (g, u, d)):
            return {"pre": kids[g], "pre_linear": kids[u], "post": kids[d]}
    if any(n in kids for n in _FUSED_UP) and isinstance(kids.get("down_proj"), nn.Module):
        return {"post": kids["down_proj"]}
    for a, b in _PLAIN:
        if all(isinstance(kids.get(n), nn.Module) for n in (a, b)):
            return {"pre": kids[a], "post": kids[b]}
    return {}


def mlp_part_error(mlp: nn.Module, layer: int, kind: str) -> str:
    """The message for an MLP neuron hook (``blocks.{layer}.mlp.hook_{kind}``) that this MLP cannot serve:
    its children and the projection names headscope looks for."""
    kids = ", ".join(f"{n} ({type(m).__name__})" for n, m in mlp.named_children())
    return (f"blocks.{layer}.mlp.hook_{kind} is not available for {type(mlp).__name__} (children: {kids}): "
            f"headscope finds neurons through gated projections {['/'.join(x) for x in _GATED]} or plain ones "
            f"{['/'.join(x) for x in _PLAIN]}; a fused gate_up_proj serves hook_post only, a mixture of "
            "experts none")


STATE_ATTR = "_headscope_hook_state"      # set on every hooked module: the model's ProbeState


def active_hooks(mod: nn.Module):
    """{(layer, kind): (fn, ...)} active on the model that ``mod`` (a hooked module) belongs to, for the
    current call. Read from the module, not from a closure, so that a deep copy of the model reads
    its own state (its copied modules carry the copied state)."""
    return mod.__dict__[STATE_ATTR].hooks


def run(hooks, layer: int, kind: str, t):
    """Apply the hook functions of (layer, kind) in ``hooks`` (``active_hooks``) to t, in order."""
    for fn in hooks.get((layer, kind), ()):
        r = fn(t, hook=Hook(hook_name(kind, layer)))
        if r is not None:
            t = r
    return t


class LazyHooks:
    """The torch module hooks of a ``HookedModel``'s hook points, registered on first use: the module
    search runs at load (so an unservable hook point still fails with its message when asked for),
    but the hooks themselves are only registered by the first ``ProbeState.push`` that adds hook
    functions (``register``, thread-safe and idempotent). Until then a model that only records
    statistics or applies edits runs its modules without hooks: each hooked module costs ~1 µs of
    torch's hook dispatch per call, ~10 of them per layer (about 24 µs per layer and decode step on
    the 2-core CPU). A deep copy keeps its own pending list, on the copied modules."""

    def __init__(self, state):
        self.state = state
        self._pending: list = []            # (module.register_forward_hook or _pre_hook, fn, kwargs)
        self._lock = threading.Lock()
        self.registered = False

    def forward(self, module: nn.Module, fn, **kwargs) -> None:
        """Queue ``module.register_forward_hook(fn, **kwargs)``; ``module`` learns the model's state."""
        module.__dict__[STATE_ATTR] = self.state
        self._pending.append((module.register_forward_hook, fn, kwargs))

    def forward_pre(self, module: nn.Module, fn, **kwargs) -> None:
        """Queue ``module.register_forward_pre_hook(fn, **kwargs)``; ``module`` learns the model's state."""
        module.__dict__[STATE_ATTR] = self.state
        self._pending.append((module.register_forward_pre_hook, fn, kwargs))

    def register(self) -> None:
        """Register every pending hook (once; a second thread waits until the first has finished)."""
        if self.registered:
            return
        with self._lock:
            while self._pending:
                reg, fn, kwargs = self._pending.pop(0)
                reg(fn, **kwargs)
            self.registered = True

    def __deepcopy__(self, memo):
        new = LazyHooks.__new__(LazyHooks)
        memo[id(self)] = new
        new.state = copy.deepcopy(self.state, memo)
        new._pending = copy.deepcopy(self._pending, memo)   # bound methods: of the copied modules
        new._lock = threading.Lock()
        new.registered = self.registered
        return new


def install(hm, hooks: LazyHooks) -> None:
    """The module hooks of a ``HookedModel``'s hook points (called once, at construction), handed to
    ``hooks`` (registered on first use); the module search's errors go to ``hm.module_hook_errors``."""
    hm.module_hook_errors = {}

    emb = hm.model.get_input_embeddings()

    def embed(mod, args, output):
        hk = active_hooks(mod)
        if not hk.get((-1, EMBED)):
            return None
        return run(hk, -1, EMBED, output)
    hooks.forward(emb, embed)

    for i, layer in enumerate(hm.layers):
        sandwich = isinstance(getattr(layer, "post_feedforward_layernorm", None), nn.Module) and \
            isinstance(getattr(layer, "post_attention_layernorm", None), nn.Module)

        def attn_out(mod, args, output, i=i):
            hk = active_hooks(mod)
            if not hk.get((i, "attn_out")):
                return None
            if isinstance(output, tuple):
                return (run(hk, i, "attn_out", output[0]),) + tuple(output[1:])
            return run(hk, i, "attn_out", output)
        hooks.forward(layer.post_attention_layernorm if sandwich else hm.attn[i], attn_out)
        try:
            mlp = find_mlp(layer, i)
        except TypeError as e:
            hm.module_hook_errors[i] = str(e)
            continue

        def mlp_in(mod, args, kwargs, i=i):
            hk = active_hooks(mod)
            if not hk.get((i, "mlp_in")):
                return None
            if args:
                return (run(hk, i, "mlp_in", args[0]),) + tuple(args[1:]), kwargs
            k = next(iter(kwargs))
            kwargs[k] = run(hk, i, "mlp_in", kwargs[k])
            return args, kwargs

        def mlp_out(mod, args, output, i=i):
            hk = active_hooks(mod)
            if not hk.get((i, "mlp_out")):
                return None
            if isinstance(output, tuple):
                return (run(hk, i, "mlp_out", output[0]),) + tuple(output[1:])
            return run(hk, i, "mlp_out", output)
        hooks.forward_pre(mlp, mlp_in, with_kwargs=True)
        hooks.forward(layer.post_feedforward_layernorm if sandwich else mlp, mlp_out)
        install_neurons(hm, mlp, i, hooks)


def install_neurons(hm, mlp: nn.Module, i: int, hooks: LazyHooks) -> None:
    """Forward hooks for blocks.{i}.mlp.hook_pre / hook_pre_linear (module outputs) and a forward
    pre-hook for hook_post (the output projection's input)."""
    parts = find_mlp_parts(mlp)
    for kind in MLP_KINDS:
        if kind not in parts:
            hm.module_hook_errors[(i, kind)] = mlp_part_error(mlp, i, kind)

    def out_hook(kind):
        def fn(mod, args, output):
            hk = active_hooks(mod)
            if not hk.get((i, kind)):
                return None
            return run(hk, i, kind, output)
        return fn

    for kind in ("pre", "pre_linear"):
        if kind in parts:
            hooks.forward(parts[kind], out_hook(kind))
    if "post" in parts:
        def post(mod, args, kwargs):
            hk = active_hooks(mod)
            if not hk.get((i, "post")):
                return None
            if args:
                return (run(hk, i, "post", args[0]),) + tuple(args[1:]), kwargs
            k = next(iter(kwargs))
            kwargs[k] = run(hk, i, "post", kwargs[k])
            return args, kwargs
        hooks.forward_pre(parts["post"], post, with_kwargs=True)


def check(hm, layer: int, kind: str) -> None:
    """Raise the module-search error for a hook that this model cannot serve."""
    errors = getattr(hm, "module_hook_errors", {})
    if kind in ("mlp_in", "mlp_out") + MLP_KINDS and layer in errors:
        raise TypeError(errors[layer])
    if (layer, kind) in errors:
        raise TypeError(errors[(layer, kind)])


def servable(hm, layer: int, kind: str) -> bool:
    """Can this model serve hook ``kind`` on ``layer`` (the module search found its module)?"""
    try:
        check(hm, layer, kind)
    except TypeError:
        return False
    return True


def as_forward(bwd_hooks) -> list:
    """TransformerLens ``bwd_hooks`` [(name or filter, fn(grad, hook))] -> forward hooks that
    register ``fn`` as a tensor hook on the hooked tensor (``register_hook``)."""
    out = []
    for name, fn in bwd_hooks:
        def fwd(t, hook, fn=fn):
            if not t.requires_grad:
                return None
            if hook.name.endswith("hook_result"):
                # hook_result is computed beside the output projection; returning a fresh tensor makes
                # the probe add (new - result) to the output, so the gradient reaches this tensor
                t = t * 1.0
                t.register_hook(lambda g: fn(g, hook=hook))
                return t
            t.register_hook(lambda g: fn(g, hook=hook))
            return None
        out.append((name, fwd))
    return out


def grad_savers(names, cache) -> list:
    """Backward hooks (as forward hooks) storing d(metric)/d(tensor) as ``cache[name + "_grad"]``."""
    def saver(n):
        def fn(g, hook):
            cache[n + "_grad"] = g.detach()
        return fn
    return as_forward([(n, saver(n)) for n in names])


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (TransformerLens' return_type="loss"): logits [B, N, V]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
