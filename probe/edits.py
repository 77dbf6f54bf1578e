"""Head edits: small objects that say what to change in one or more heads; a list of them composes.

Two kinds (Zhou et al.'s uniform ablation and ACT/VAR/DuoAttention change attention itself;
replacement, LoFiT and steering change the head's output):

- **Probability-space** edits (``Ablate(how="uniform")``, ``ScaleKeys``, ``StreamingGate``) add
  themselves to the layer's ``kernels.LayerEdits`` (``add_to``); every kernel applies them, and
  their meaning is the small functions of ``kernels/reference.py``.
- **Output-space** edits (``Ablate(how="zero"|"mean")``, ``HeadAffine``, ``AddToHead``) are
  ``OutputEdit`` subclasses: ``apply(z) -> z`` on the named heads' outputs ``z [B, Q, n, d_head]``
  (fp32), run once by the probe after the kernel in plain PyTorch, so autograd, per-example and
  per-position values come free. Adding one is one small class here. They apply in stages:
  replacements (``stage = 0``) before additive/affine edits (``stage = 1``); within a stage, in
  the order given (outer ``model.edit`` blocks first). ``hook_z`` hooks see z after them.

Values of output-space edits (Ablate's ``mean``, HeadAffine's ``scale``/``bias``, AddToHead's
``vector``), with n = the number of heads named and d = d_head:
  one head (``head=3``):          [d] | [B, d] per example | [B, Q, d] per example and position
  several heads (``head=[1, 2]``): [d] (shared) | [n, d] | [B, n, d] | [B, Q, n, d]
A value's batch/position axes must match the forward (or be 1); under ``generate`` each step has
Q = 1, so per-position values apply only to full forwards.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..kernels.spec import LayerEdits, Redistribution, Span
from .checks import as_index, as_indices, as_real, as_spans, check_range
from .state import EditSet


def _norm_target(self, layer, head) -> None:
    """Validate and normalise ``layer`` / ``head`` on a frozen dataclass (ints, a tuple of heads)."""
    name = type(self).__name__
    object.__setattr__(self, "layer", as_index(layer, f"{name} layer"))
    h = as_indices(head, f"{name} head")
    object.__setattr__(self, "head", h[0] if len(h) == 1 and not _is_seq(head) else h)


def _is_seq(x) -> bool:
    return isinstance(x, (Sequence, range)) or getattr(x, "ndim", 0) > 0


def _heads(h) -> tuple[int, ...]:
    return (h,) if isinstance(h, int) else tuple(h)


def head_values(t: torch.Tensor, single: bool, n: int, d: int, what: str) -> torch.Tensor:
    """A value tensor in one of the documented shapes -> [B|1, Q|1, n|1, d] (see module doc)."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float32)
    if t.shape[-1:] != (d,) or t.dim() == 0:
        raise ValueError(f"{what}: last axis must be d_head = {d}, got shape {tuple(t.shape)}")
    if single:
        if t.dim() > 3:
            raise ValueError(f"{what} for one head: shape [d], [B, d] or [B, Q, d], got {tuple(t.shape)}")
        if t.dim() == 1:
            return t.view(1, 1, 1, d)
        return t[:, None, None] if t.dim() == 2 else t[:, :, None]          # [B, 1, 1, d] / [B, Q, 1, d]
    if t.dim() == 1:
        return t.view(1, 1, 1, d)
    if t.dim() > 4 or t.shape[-2] not in (1, n):
        raise ValueError(f"{what} for {n} heads: shape [d], [n, d], [B, n, d] or [B, Q, n, d] with n = {n}, "
                         f"got {tuple(t.shape)}")
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _fit(v: torch.Tensor, z: torch.Tensor, what: str) -> torch.Tensor:
    """v [B|1, Q|1, n|1, d] checked against z [B, Q, n, d]; on z's device in fp32."""
    B, Q = z.shape[:2]
    if v.shape[0] not in (1, B) or v.shape[1] not in (1, Q):
        raise ValueError(f"{what}: value covers (batch, pos) = {tuple(v.shape[:2])} but this forward has "
                         f"({B}, {Q}); per-example/per-position values must match the tokens (under "
                         "generate each step has one position)")
    return v.to(device=z.device, dtype=torch.float32)


class OutputEdit:
    """Base of output-space edits: subclasses are frozen dataclasses with ``layer`` and ``head``
    and implement ``apply(z)``: z [B, Q, n, d_head] fp32, the outputs of ``self.head`` (in that
    order) -> the same shape. ``check(n_heads, d_head)`` validates value shapes once, when the edit
    is compiled; ``stage`` orders kinds (0 replacement, 1 additive/affine)."""

    stage: ClassVar[int] = 1

    @property
    def output_space(self) -> bool:
        """True: the probe applies this edit to the head outputs z after the kernel (``Ablate`` with
        ``how="uniform"`` says False and goes to the kernel through ``add_to``)."""
        return True

    def heads(self) -> tuple[int, ...]:
        """The edited heads as a tuple of head indices (``head`` may be one int or several)."""
        return _heads(self.head)

    def check(self, n_heads: int, d_head: int) -> None:
        """Validate the edit's values against the model's ``n_heads`` and ``d_head`` once, when the edit
        is compiled; raises ValueError on a bad shape. The base class checks nothing."""
        pass

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, Q, n, d_head] fp32, the outputs of ``self.heads()`` in that order -> the edited z, same
        shape. Subclasses implement it (the base raises NotImplementedError)."""
        raise NotImplementedError

    def _value(self, t, d, what):
        return head_values(t, isinstance(self.head, int), len(self.heads()), d, f"{type(self).__name__} {what}")


@dataclass(frozen=True)
class Ablate(OutputEdit):
    """Knock out heads. ``how``:
    - "zero": the head's output z is zero;
    - "mean": z is replaced by ``mean`` (shapes in the module doc: e.g. [d_head] or
      [n_heads_given, d_head]), e.g. its mean over a dataset (``HookedModel.mean_z``);
    - "uniform": the query is multiplied by ``eps`` (>= 0; 0: exactly uniform) so attention is ~uniform over the
      visible keys ("undifferentiated attention": Zhou et al. 2025, Ships/Sahara §3; Wu et al.
      2024's retrieval-head masking). This one is a probability-space edit.

    ``layer``: the layer; ``head``: one head (int) or several (a list), the values' n axis in list order.
    """

    layer: int
    head: int | Sequence[int]
    how: str = "zero"
    mean: torch.Tensor | None = None
    eps: float = 1e-4

    stage: ClassVar[int] = 0

    def __post_init__(self):
        _norm_target(self, self.layer, self.head)
        if self.how not in ("zero", "mean", "uniform"):
            raise ValueError(f"Ablate(how={self.how!r}): use 'zero', 'mean' or 'uniform'")
        if self.how == "mean" and self.mean is None:
            raise ValueError("Ablate(how='mean') needs mean=tensor [d_head] (see HookedModel.mean_z)")
        if self.how != "mean" and self.mean is not None:
            raise ValueError(f"Ablate(how={self.how!r}) got mean=...: the mean is used only with how='mean'")
        if self.how == "uniform":
            object.__setattr__(self, "eps", as_real(self.eps, "Ablate eps"))
            if not self.eps >= 0:
                raise ValueError(f"Ablate eps must be >= 0 (the query scale; ~0 = uniform attention), got {self.eps}")

    @property
    def output_space(self) -> bool:
        """False for ``how="uniform"`` (a probability-space edit: the kernel scales the query, see
        ``add_to``); True for "zero" and "mean" (the head's output z is replaced)."""
        return self.how != "uniform"

    def check(self, n_heads: int, d_head: int) -> None:
        """``how="mean"``: raise ValueError unless ``mean`` has one of the module doc's shapes for these
        heads with last axis ``d_head``. Nothing to check for "zero" / "uniform"."""
        if self.how == "mean":
            self._value(self.mean, d_head, "mean")

    def apply(self, z):
        """z [B, Q, n, d_head] -> zeros (``how="zero"``) or ``mean`` broadcast to z's shape (``how="mean"``);
        raises ValueError when ``mean``'s batch/position axes do not match this forward."""
        if self.how == "zero":
            return torch.zeros_like(z)
        v = _fit(self._value(self.mean, z.shape[-1], "mean"), z, "Ablate mean")
        return v.expand_as(z)

    def add_to(self, e: LayerEdits, n_heads: int, d_head: int) -> None:
        """``how="uniform"``: set these heads' query scale in the layer's ``LayerEdits`` to ``eps`` (other heads
        keep theirs, 1 by default), so their attention becomes ~uniform (Zhou et al. 2025, Ships/Sahara §3)."""
        qs = e.q_scale if e.q_scale is not None else torch.ones(n_heads)
        e.q_scale = qs.index_fill(0, torch.tensor(self.heads()), self.eps)


@dataclass(frozen=True)
class HeadAffine(OutputEdit):
    """LoFiT (Yin et al. 2024, eq. 2): z <- (1 + scale) * z + bias before o_proj. ``scale`` and
    ``bias`` take the shapes in the module doc (e.g. [d_head] or [n_heads_given, d_head]) and may
    require grad.

    ``layer``: the layer; ``head``: one head (int) or several (a list), the values' n axis in list order."""

    layer: int
    head: int | Sequence[int]
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self):
        _norm_target(self, self.layer, self.head)

    def check(self, n_heads, d_head):
        """Raise ValueError unless ``scale`` and ``bias`` (those given) have one of the module doc's shapes
        for these heads with last axis ``d_head``."""
        for name in ("scale", "bias"):
            if getattr(self, name) is not None:
                self._value(getattr(self, name), d_head, name)

    def apply(self, z):
        """z [B, Q, n, d_head] -> (1 + scale) * z + bias (LoFiT, Yin et al. 2024, eq. 2); a missing scale or
        bias is left out. Raises ValueError when a value's batch/position axes do not match this forward."""
        d = z.shape[-1]
        if self.scale is not None:
            z = z * (1 + _fit(self._value(self.scale, d, "scale"), z, "HeadAffine scale"))
        if self.bias is not None:
            z = z + _fit(self._value(self.bias, d, "bias"), z, "HeadAffine bias")
        return z


@dataclass(frozen=True)
class AddToHead(OutputEdit):
    """A steering vector on a head's output: z <- z + ``vector`` before o_proj (activation
    addition on one head, as in Turner et al. 2023's ActAdd, here per head; ``vector`` takes the
    shapes in the module doc and may require grad).

    ``layer``: the layer; ``head``: one head (int) or several (a list), the values' n axis in list order."""

    layer: int
    head: int | Sequence[int]
    vector: torch.Tensor

    def __post_init__(self):
        _norm_target(self, self.layer, self.head)

    def check(self, n_heads, d_head):
        """Raise ValueError unless ``vector`` has one of the module doc's shapes for these heads with last
        axis ``d_head``."""
        self._value(self.vector, d_head, "vector")

    def apply(self, z):
        """z [B, Q, n, d_head] -> z + vector (broadcast); raises ValueError when the vector's batch/position
        axes do not match this forward."""
        return z + _fit(self._value(self.vector, z.shape[-1], "vector"), z, "AddToHead vector")


@dataclass(frozen=True)
class ScaleKeys:
    """Multiply a head's attention on ``keys`` (token-position spans) by ``factor`` in [0, 1] and
    give the freed mass to ``target`` keys (default: all other keys) in proportion to their
    attention. Spans are half-open ``(start, end)`` token positions with 0 <= start < end; a span
    that reaches beyond the sequence raises at forward time.

    ACT (Yu et al. 2024, §3.2 eq. 4): keys = the hidden sinks, factor beta = 0.4, target None.
    VAR (Kang et al. 2025, §4.2): keys = sink tokens, factor p = 0.6, target = the token group,
    max_ratio rho = 0.5, min_target 0.2 (only rows that look at the group but not mostly at sinks),
    min_query = the group's end (the reference code edits only the queries after the image).

    ``min_query``: only rows of queries at token position >= min_query change (None: every row;
    during generation every new token is past it).

    ``layer``: the layer; ``head``: one head (int) or several (a list).
    """

    layer: int
    head: int | Sequence[int]
    keys: Sequence[Span]
    factor: float
    target: Sequence[Span] | None = None
    max_ratio: float | None = None
    min_target: float = 0.0
    min_query: int | None = None

    def __post_init__(self):
        _norm_target(self, self.layer, self.head)
        f = as_real(self.factor, "ScaleKeys factor")
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"ScaleKeys factor must be in [0, 1] (the share of attention the keys keep), got {f}; "
                             "a factor > 1 would take mass from the other keys and make attention negative")
        object.__setattr__(self, "factor", f)
        object.__setattr__(self, "keys", as_spans(self.keys, "ScaleKeys keys"))
        if self.target is not None:
            object.__setattr__(self, "target", as_spans(self.target, "ScaleKeys target"))
        if self.max_ratio is not None:
            object.__setattr__(self, "max_ratio", as_real(self.max_ratio, "ScaleKeys max_ratio", 0.0, 1.0))
        object.__setattr__(self, "min_target", as_real(self.min_target, "ScaleKeys min_target", 0.0, 1.0))
        if self.min_query is not None:
            q = as_index(self.min_query, "ScaleKeys min_query")
            if q < 0:
                raise ValueError(f"ScaleKeys min_query must be a token position >= 0, got {q}")
            object.__setattr__(self, "min_query", q)

    @property
    def output_space(self) -> bool:
        """False: a probability-space edit, applied inside the kernel after the softmax (``add_to``)."""
        return False

    def add_to(self, e: LayerEdits, n_heads: int, d_head: int) -> None:
        """Append this edit as a ``kernels.spec.Redistribution`` to the layer's ``LayerEdits`` ``e``;
        redistributions apply after the softmax in the order added."""
        e.redistributions = e.redistributions + (Redistribution(
            heads=_heads(self.head), factor=self.factor, source=tuple(self.keys),
            target=None if self.target is None else tuple(self.target),
            max_ratio=self.max_ratio, min_target=self.min_target, min_query=self.min_query),)


@dataclass(frozen=True)
class StreamingGate:
    """DuoAttention (Xiao et al. 2024, eq. 1): out = (1 - alpha) * streaming + alpha * full, where
    streaming attention sees the first ``sink`` positions and the last ``recent`` ones. ``alpha``
    holds one gate per query head listed (or one for all; may require grad).

    ``layer``: the layer; ``head``: one head (int) or several (a list; ``alpha`` in list order)."""

    layer: int
    head: int | Sequence[int]
    alpha: torch.Tensor
    sink: int = 64
    recent: int = 256

    def __post_init__(self):
        _norm_target(self, self.layer, self.head)
        for name in ("sink", "recent"):
            v = as_index(getattr(self, name), f"StreamingGate {name}")
            if v < 0:
                raise ValueError(f"StreamingGate {name} must be >= 0, got {v}")
            object.__setattr__(self, name, v)
        a = torch.as_tensor(self.alpha)
        if a.numel() not in (1, len(_heads(self.head))):
            raise ValueError(f"StreamingGate alpha has {a.numel()} values for {len(_heads(self.head))} heads: "
                             "give one per head listed (or one)")

    @property
    def output_space(self) -> bool:
        """False: a probability-space edit, applied inside the kernel (``add_to``)."""
        return False

    def add_to(self, e: LayerEdits, n_heads: int, d_head: int) -> None:
        """Write ``alpha`` into the layer's per-head gate ``e.gate`` [n_heads] (heads not listed keep 1 =
        full attention) with this ``sink`` / ``recent`` window. Raises ValueError when another
        StreamingGate on the layer uses a different sink or recent size."""
        if e.gate is not None and (e.gate_sink, e.gate_recent) != (self.sink, self.recent):
            raise ValueError("two StreamingGates on one layer need the same sink and recent sizes")
        g = e.gate if e.gate is not None else torch.ones(n_heads)
        idx = torch.tensor(_heads(self.head))
        alpha = torch.as_tensor(self.alpha)
        e.gate = g.to(alpha.device).index_put((idx.to(alpha.device),), alpha.float().reshape(-1).expand(len(idx)))
        e.gate_sink, e.gate_recent = self.sink, self.recent


EDIT_TYPES = "Ablate, ScaleKeys, HeadAffine, AddToHead, StreamingGate"


def compile_edits(edits, n_layers: int, n_heads: int, d_head: int, device=None) -> EditSet:
    """A list of edits -> ``EditSet``: {layer: LayerEdits} for the kernels and {layer: (output
    edits, ...)} for the probe, with range checks that name the model's size."""
    prob: dict[int, LayerEdits] = {}
    out: dict[int, list] = {}
    for ed in edits:
        if not (hasattr(ed, "add_to") or isinstance(ed, OutputEdit)) or not hasattr(ed, "layer"):
            raise TypeError(f"{ed!r} is not a headscope edit ({EDIT_TYPES})")
        name = type(ed).__name__
        check_range(ed.layer, n_layers, f"{name}: layer", f"the model has {n_layers} layers")
        for h in _heads(ed.head):
            check_range(h, n_heads, f"{name}: head", f"layer {ed.layer} has {n_heads} heads")
        if getattr(ed, "output_space", False):
            ed.check(n_heads, d_head)
            out.setdefault(ed.layer, []).append(ed)
        else:
            ed.add_to(prob.setdefault(ed.layer, LayerEdits()), n_heads, d_head)
    if device is not None:                # one device, or one per layer (a model split with device_map)
        for l, e in prob.items():
            dev = device[l] if isinstance(device, (list, tuple)) else device
            for f in ("q_scale", "gate"):
                t = getattr(e, f)
                if t is not None:
                    setattr(e, f, t.to(dev))
    return EditSet(prob, {l: tuple(sorted(v, key=lambda e: e.stage)) for l, v in out.items()})


def apply_output_edits(z: torch.Tensor, edits) -> torch.Tensor:
    """z [B, Q, H, d] -> z with each output-space edit applied (in order) to its heads, in fp32,
    out of place (autograd flows to z and to the edits' tensors)."""
    for ed in edits:
        idx = torch.tensor(ed.heads(), device=z.device)
        new = ed.apply(z.index_select(2, idx).float())
        z = z.index_copy(2, idx, new.to(z.dtype))
    return z
