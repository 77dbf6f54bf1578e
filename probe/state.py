"""What is active on a model for the current call: recorders, edits, hook functions.

Opening a context on ``HookedModel`` (``record``, ``edit``, ``hooks``) pushes a new immutable
``Frame`` into a ``contextvars.ContextVar`` owned by the model's ``ProbeState``; closing it resets
the variable to the frame before (``var.reset(token)``). So the active state belongs to the call,
not to the model: two threads (or two Streamlit sessions) sharing one model each see only their
own contexts (a new thread starts with an empty context), nested contexts compose and unwind in
order, and an entry is removed by identity, never by ``==``. The attention function and the torch
forward hooks run in the thread that called the model, so they read the caller's frame
(``plan(layer)``, ``hooks``).
"""
from __future__ import annotations

import contextvars
import copy
import itertools
from collections.abc import Mapping
from types import MappingProxyType
from dataclasses import dataclass, field

from ..kernels.spec import LayerEdits, StatRequest
from .record import Recorder


@dataclass
class LayerPlan:
    """What the attention function does on one layer for the current call.

    Fields: ``stats`` (the merged ``StatRequest`` or None), ``recorders`` (those recording this
    layer), ``edits`` (merged probability-space ``LayerEdits`` or None), ``out_edits`` (output-space
    edits on z [B, Q, H, d], in application order), ``hooks`` ({kind: hook functions})."""

    stats: StatRequest | None
    recorders: list[Recorder]
    edits: LayerEdits | None        # probability-space edits (applied by the kernel)
    out_edits: list                 # output-space edits on z [B, Q, H, d], in application order
    hooks: dict[str, tuple]         # kind -> hook functions (q, k, v, attn_scores, pattern, z)


@dataclass(frozen=True, eq=False)
class EditSet:
    """One ``model.edit`` block, compiled: probability-space ``LayerEdits`` and output-space edits
    per layer (output edits in the order they apply: replacements first, then affine ones)."""

    prob: dict                      # layer -> LayerEdits
    out: dict                       # layer -> tuple of output-space edits


@dataclass(frozen=True, eq=False)
class Frame:
    """An immutable snapshot of everything active; each context pushes a new one.

    Fields: ``recorders`` and ``edit_sets`` (outermost first) and ``hooks`` ((layer, kind, fn)
    triples, in the order they run)."""

    recorders: tuple = ()
    edit_sets: tuple = ()
    hooks: tuple = ()               # ((layer, kind, fn), ...) in the order they were added
    _plans: dict = field(default_factory=dict, compare=False, repr=False)   # layer -> LayerPlan | None
    _hook_map: list = field(default_factory=list, compare=False, repr=False)

    def hook_map(self) -> Mapping:
        """{(layer, kind): (fn, ...)}, read-only (add hooks with ``ProbeState.push``)."""
        if not self._hook_map:
            m: dict = {}
            for layer, kind, fn in self.hooks:
                m.setdefault((layer, kind), []).append(fn)
            self._hook_map.append(MappingProxyType({key: tuple(fns) for key, fns in m.items()}))
        return self._hook_map[0]


_EMPTY = Frame()
_ids = itertools.count()


class ProbeState:
    """The model's view of the active contexts. Read it through ``recorders``, ``edit_sets``,
    ``hooks`` ({(layer, kind): (fn, ...)}), ``active()`` and ``plan(layer)``; change it only
    through ``push`` / ``pop`` (what ``HookedModel``'s contexts do):

        handle = model.state.push(hooks=[(layer, kind, fn)])   # or recorders=[...], edit_sets=[...]
        try:
            ...
        finally:
            model.state.pop(handle)
    """

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self._var: contextvars.ContextVar[Frame] = contextvars.ContextVar(f"headscope_probe_{next(_ids)}",
                                                                          default=_EMPTY)
        self.on_hooks = None        # called by each push that adds hooks (HookedModel: register its module hooks)

    def __deepcopy__(self, memo):
        """A deep copy of the HF model (e.g. ``copy.deepcopy(model.model)``) gets a fresh, empty
        state: a ContextVar cannot be copied, and the copy must not see the original's contexts. Its
        ``on_hooks`` is copied with it (the copied model's lazy module hooks, on the copied modules)."""
        new = ProbeState(self.n_layers)
        memo[id(self)] = new
        if self.on_hooks is not None:           # the copy registers its own (copied) modules' hooks
            new.on_hooks = copy.deepcopy(self.on_hooks, memo)
        return new

    # ---------------------------------------------------------------- read
    @property
    def frame(self) -> Frame:
        """The current call's ``Frame`` (an empty one outside every context)."""
        return self._var.get()

    @property
    def recorders(self) -> tuple:
        """The ``Recorder`` objects active for the current call, outermost first."""
        return self.frame.recorders

    @property
    def edit_sets(self) -> tuple:
        """The compiled ``EditSet`` of each active ``model.edit`` block, outermost first."""
        return self.frame.edit_sets

    @property
    def hooks(self) -> Mapping:
        """{(layer, kind): (fn, ...)} for the current call, read-only: hooks are added with
        ``push(hooks=[(layer, kind, fn), ...])`` and removed with ``pop`` (what
        ``HookedModel.hooks`` does), so they stay with the call."""
        return self.frame.hook_map()

    def active(self) -> bool:
        """True when the current call has any recorder, edit set or hook active."""
        f = self.frame
        return bool(f.recorders or f.edit_sets or f.hooks)

    def plan(self, layer: int) -> LayerPlan | None:
        """The ``LayerPlan`` for ``layer`` in the current call (the merged statistics request, the
        recorders, the merged probability-space edits, the output-space edits in application order, the
        hooks), or None when nothing is active on it; cached per frame."""
        f = self.frame
        if layer in f._plans:
            return f._plans[layer]
        recs = [r for r in f.recorders if layer in r.layers]
        stats = None
        for r in recs:
            stats = r.request if stats is None else stats.merge(r.request)
        edits = None
        out_edits: list = []
        for es in f.edit_sets:
            if layer in es.prob:
                edits = es.prob[layer] if edits is None else edits.merge(es.prob[layer])
            out_edits += es.out.get(layer, ())
        out_edits.sort(key=lambda e: e.stage)          # stable: replacements, then affine edits
        hooks = {kind: fns for (l, kind), fns in f.hook_map().items() if l == layer and fns}
        plan = None
        if stats is not None or edits is not None or out_edits or hooks:
            plan = LayerPlan(stats, recs, edits, out_edits, hooks)
        f._plans[layer] = plan
        return plan

    # ---------------------------------------------------------------- change
    def push(self, *, recorders=(), edit_sets=(), hooks=(), hooks_first: bool = False):
        """Activate more entries for the current call; returns a handle for ``pop``. ``hooks_first``:
        the new hooks run before the active ones on the same hook point (``add_hook``'s hooks)."""
        if hooks and self.on_hooks is not None:
            self.on_hooks()                  # the model's torch module hooks, registered on first use
        old = self.frame
        new = Frame(old.recorders + tuple(recorders), old.edit_sets + tuple(edit_sets),
                    tuple(hooks) + old.hooks if hooks_first else old.hooks + tuple(hooks))
        return (self._var.set(new), new, tuple(recorders), tuple(edit_sets), tuple(hooks))

    def pop(self, handle) -> None:
        """Undo one ``push``. In the usual (nested) case this restores the frame from before the
        push; if contexts were closed out of order or in another context, only this push's entries
        are removed (by identity) from whatever is active now."""
        token, pushed, recs, sets, hooks = handle
        if self._var.get() is pushed:
            try:
                self._var.reset(token)
                return
            except ValueError:          # token made in another Context: fall through
                pass
        cur = self.frame

        def drop(entries, mine):
            out = list(entries)
            for m in mine:
                for i in range(len(out) - 1, -1, -1):
                    if out[i] is m:
                        del out[i]
                        break
            return tuple(out)

        def drop_hooks(entries, mine):
            out = list(entries)
            for m in mine:
                for i in range(len(out) - 1, -1, -1):
                    if out[i][0] == m[0] and out[i][1] == m[1] and out[i][2] is m[2]:
                        del out[i]
                        break
            return tuple(out)

        self._var.set(Frame(drop(cur.recorders, recs), drop(cur.edit_sets, sets), drop_hooks(cur.hooks, hooks)))
