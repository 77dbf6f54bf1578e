"""What a kernel is asked to compute (statistics) and change (edits), as plain data.

Every kernel in this package (the PyTorch block path in ``reference.py``, the chunked CPU loop in
``chunked.py``, the Triton kernels) takes these objects and must give the same answer; the
definitions below are the contract and ``reference.attend_block`` is their executable meaning.

Positions. Keys are indexed by cache index ``j`` in ``[0, K)``; queries are the last ``Q`` keys, so
query ``i`` sits at cache index ``K - Q + i``. Token *positions* (what sinks, spans and argmax speak
about) are ``key_pos0[b] + j``: ``key_pos0`` is the position of cache index 0 (0 for an unpadded
prompt without a sliding cache; negative for left padding, so that the first real token is 0).
Distances ``t - s`` never depend on ``key_pos0``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

Span = tuple[int, int]  # half-open [start, end) in token positions


def _count(x, what: str) -> int:
    """A non-negative integer (int, numpy integer, 0-d integer tensor); floats and bools refused."""
    if isinstance(x, bool) or not (isinstance(x, numbers.Integral) or (
            isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool)):
        raise TypeError(f"StatRequest {what} must be an integer, got {x!r}")
    if int(x) < 0:
        raise ValueError(f"StatRequest {what} must be >= 0, got {int(x)}")
    return int(x)


@dataclass(frozen=True)
class StatRequest:
    """Per-head statistics wanted from one attention call. All are computed in fp32 from the
    final (edited) attention probabilities ``p[b, h, t, s]``.

    Outputs (names of the dict a kernel returns):
      ``sink_mass``       [B, H, Q]    sum of p over the first ``sink_k`` positions (s < sink_k)
      ``span_mass``       [B, H, Q, S] sum of p over each span in ``spans``
      ``entropy``         [B, H, Q]    -sum p log p (nats)
      ``distance``        [B, H, Q]    sum p (t - s)
      ``window_distance`` [B, H, Q]    sum p min(t - s, W)           (W = ``window_distance``)
      ``recent_mass``     [B, H, Q]    sum of p over keys with t - s < ``recent`` (local window)
      ``argmax``          [B, H, Q]    position s of the most-attended key (int64; first on ties)
      ``max_prob``        [B, H, Q]    that key's probability
      ``received_sum``    [B, H, K]    sum over queries of p[t, s]   (column sums)
      ``received_count``  [B, K]       how many queries could see key s (and fall in the window)
      ``lse``             [B, H, Q]    natural-log log-sum-exp of the (edited-query) scores
    ``received_window=(a, b)`` restricts column sums to queries with a <= t - s <= b (FAI); it
    needs ``received=True``. Counts (``sink_k``, ``window_distance``, ``recent``, span ends, the
    window) are non-negative integers; 0 or None switches a statistic off. Spans are half-open
    ``(start, end)`` with 0 <= start < end. Malformed values raise at construction.

    Learned attention sinks (``sinks`` [H], transformers' ``s_aux``; GPT-OSS, Xiao et al. 2024
    "Efficient Streaming Language Models with Attention Sinks", Sec. 3.3 "sink token" as a learned
    logit): each head's sink logit joins the softmax denominator but has no value vector,
    p[t, s] = exp(score[t, s]) / (sum_s' exp(score[t, s']) + exp(sink[h])). Every statistic above is
    then taken over the real keys only, from these p: rows sum to 1 - (the sink's share), so
    ``sink_mass`` etc. are fractions of the whole row including the sink, ``entropy`` is
    -sum over keys of p log p (the sink's own term left out), ``distance`` is sum p (t - s) without
    renormalising, ``argmax``/``max_prob`` are over keys, and ``lse`` is the log of the whole
    denominator (sink included), so p = exp(score - lse) holds on every path.

    NaN / inf. A row whose scores hold a NaN or +inf (a NaN or inf in q or k) is NaN throughout, as in
    eager attention: its output and every float statistic are NaN (``argmax`` is then unspecified).
    No path turns such a row into finite numbers.
    """

    sink_k: int = 0
    spans: tuple[Span, ...] = ()
    entropy: bool = False
    distance: bool = False
    window_distance: int | None = None
    recent: int | None = None
    argmax: bool = False
    received: bool = False
    received_window: tuple[int, int] | None = None

    def __post_init__(self):
        """Refuse malformed requests here, once, with a message (ints are never truncated)."""
        set_ = object.__setattr__
        set_(self, "sink_k", _count(self.sink_k, "sink_k"))
        for name in ("window_distance", "recent"):
            if getattr(self, name) is not None:
                set_(self, name, _count(getattr(self, name), name))
        for name in ("entropy", "distance", "argmax", "received"):
            v = getattr(self, name)
            if not isinstance(v, (bool, int)) or isinstance(v, int) and v not in (0, 1):
                raise TypeError(f"StatRequest {name} is a flag: True or False, got {v!r}")
            set_(self, name, bool(v))
        spans = []
        for sp in self.spans:
            try:
                a, b = sp
            except (TypeError, ValueError):
                raise TypeError(f"StatRequest spans are (start, end) pairs, e.g. spans=((0, 4),); got {sp!r}") from None
            a, b = _count(a, "span start"), _count(b, "span end")
            if b <= a:
                raise ValueError(f"span ({a}, {b}) is {'reversed' if b < a else 'empty'}: spans are half-open "
                                 "[start, end) with end > start")
            spans.append((a, b))
        set_(self, "spans", tuple(spans))
        if self.received_window is not None:
            try:
                a, b = self.received_window
            except (TypeError, ValueError):
                raise TypeError(f"received_window is a pair (a, b) of distances, got {self.received_window!r}") from None
            a, b = _count(a, "received_window a"), _count(b, "received_window b")
            if a > b:
                raise ValueError(f"received_window ({a}, {b}): need a <= b (queries with a <= t - s <= b)")
            if not self.received:
                raise ValueError("received_window restricts the column sums: set received=True as well")
            set_(self, "received_window", (a, b))

    def merge(self, other: "StatRequest") -> "StatRequest":
        """The union of two requests (what two probes on one layer need together)."""
        if self.sink_k and other.sink_k and self.sink_k != other.sink_k:
            raise ValueError(f"two probes ask for different sink sizes ({self.sink_k}, {other.sink_k}) on one layer")
        if self.window_distance and other.window_distance and self.window_distance != other.window_distance:
            raise ValueError("two probes ask for different distance windows on one layer")
        if self.recent and other.recent and self.recent != other.recent:
            raise ValueError("two probes ask for different recent windows on one layer")
        if self.received_window and other.received_window and self.received_window != other.received_window:
            raise ValueError("two probes ask for different received windows on one layer")
        spans = tuple(dict.fromkeys(self.spans + other.spans))
        return StatRequest(
            sink_k=self.sink_k or other.sink_k,
            spans=spans,
            entropy=self.entropy or other.entropy,
            distance=self.distance or other.distance,
            window_distance=self.window_distance or other.window_distance,
            recent=self.recent or other.recent,
            argmax=self.argmax or other.argmax,
            received=self.received or other.received,
            received_window=self.received_window or other.received_window,
        )

    @property
    def any_row(self) -> bool:
        """True when any row statistic is asked for (sink mass, spans, entropy, distance, window
        distance, recent mass, argmax); ``received`` is a column statistic and does not count."""
        return bool(self.sink_k or self.spans or self.entropy or self.distance
                    or self.window_distance or self.recent or self.argmax)


@dataclass(frozen=True)
class Redistribution:
    """Scale attention on source keys and give the freed mass back in proportion (ACT, VAR).

    For every selected row of every head in ``heads``:
      p'[s] = factor * p[s]                      for s in source
      p'[s] = p[s] * (1 + freed / mass(T))       for s in T = target minus source
      p'[s] = p[s]                               otherwise
    with freed = (1 - factor) * mass(source), 0 <= factor <= 1, and T defaulting to every key not
    in source.
    Rows sum to 1 afterwards (if mass(T) == 0 the row is left unchanged).
    Rows are selected when ``max_ratio`` is None, or (VAR, Kang et al. 2025) when
    mass(source ∩ target) / mass(target) <= max_ratio and mass(target) >= min_target; and, when
    ``min_query`` is set, only rows of queries at token position >= min_query (VAR's reference code
    edits the queries after the image only).
    """

    heads: tuple[int, ...]
    factor: float
    source: tuple[Span, ...]
    target: tuple[Span, ...] | None = None
    max_ratio: float | None = None
    min_target: float = 0.0
    min_query: int | None = None

    def __post_init__(self):
        f = float(self.factor)
        if not 0.0 <= f <= 1.0:           # also refuses NaN
            raise ValueError(f"Redistribution factor must be in [0, 1], got {self.factor}: a factor > 1 takes "
                             "more mass from the other keys than they hold (negative attention)")


@dataclass
class LayerEdits:
    """The probability-space edits of one layer, gathered per head (built by
    ``headscope.probe.edits``). They change attention itself, so every kernel applies them; their
    meaning is the small functions of ``reference.py`` (``scale_queries``, ``redistribute``,
    ``streaming_gate``). Output-space edits (ablation by replacement, LoFiT's affine, steering
    vectors) are not here: the probe applies them to the kernel's output z afterwards.

    Applied in this order:
      1. ``q_scale[h]`` multiplies the query (uniform attention when ~0; Wu et al. 2024,
         Zhou et al. 2025).
      2. softmax, then each ``Redistribution`` in order.
      3. statistics are taken here; out = p @ v.
      4. ``gate`` (DuoAttention, Xiao et al. 2024): out = (1 - a[h]) * streaming + a[h] * out, where
         streaming attention sees only positions s < gate_sink or t - s < gate_recent.
    (The probe then applies output-space edits: replacements, then affine edits.)
    Tensors are [H] and may require grad (gates train through here).

    Fields: ``q_scale`` [H] or None, ``redistributions`` (a tuple of ``Redistribution``), ``gate``
    [H] or None, ``gate_sink`` / ``gate_recent`` (the streaming window in positions).
    """

    q_scale: torch.Tensor | None = None          # [H]
    redistributions: tuple[Redistribution, ...] = ()
    gate: torch.Tensor | None = None             # [H]
    gate_sink: int = 0
    gate_recent: int = 0

    @property
    def empty(self) -> bool:
        """True when the layer has no probability-space edit (no query scale, redistribution or gate)."""
        return self.q_scale is None and not self.redistributions and self.gate is None

    def tensors(self) -> list[torch.Tensor]:
        """The edit tensors (for device moves and requires-grad checks)."""
        return [t for t in (self.q_scale, self.gate) if t is not None]

    def merge(self, other: "LayerEdits") -> "LayerEdits":
        """Two edit sets on one layer (nested ``model.edit`` blocks): ``other`` applies after this."""
        q = other.q_scale if self.q_scale is None else (
            self.q_scale if other.q_scale is None else self.q_scale * other.q_scale)
        gate, gs, gr = self.gate, self.gate_sink, self.gate_recent
        if other.gate is not None:
            if self.gate is not None:
                raise ValueError("two StreamingGate edit sets on one layer: put them in one model.edit([...])")
            gate, gs, gr = other.gate, other.gate_sink, other.gate_recent
        return LayerEdits(q_scale=q, redistributions=self.redistributions + other.redistributions,
                          gate=gate, gate_sink=gs, gate_recent=gr)


COLUMN_STATS = ("received_sum", "received_count")


def _kept(cache: dict, request: StatRequest, compute):
    """``compute(request)``, kept per request instance: a ``StatRequest`` is frozen and every layer
    of every step asks the same questions of it. The request itself is held, so its id is not
    reused while the answer is kept; at most 256 are kept."""
    got = cache.get(id(request))
    if got is not None and got[0] is request:
        return got[1]
    answer = compute(request)
    if len(cache) >= 256:
        cache.clear()
    cache[id(request)] = (request, answer)
    return answer


_ACTIVE: dict = {}        # id(StatRequest) -> (the request, its active fields)
_KEYS: dict = {}          # id(StatRequest) -> (the request, its expected keys)


def active(obj) -> frozenset[str]:
    """Names of the fields of a ``StatRequest`` or ``LayerEdits`` that ask for something (not None,
    not False / 0 / empty). None -> empty set."""
    if obj is None:
        return frozenset()
    if isinstance(obj, StatRequest):
        return _kept(_ACTIVE, obj, _active_fields)
    return _active_fields(obj)


def _active_fields(obj) -> frozenset[str]:
    out = set()
    for name in obj.__dataclass_fields__:
        v = getattr(obj, name)
        if isinstance(v, torch.Tensor) or (v is not None and v is not False and v != 0 and v != ()):
            out.add(name)
    return frozenset(out)


def expected_keys(stats: StatRequest | None) -> frozenset[str]:
    """The keys of the statistics dict every path returns for ``stats`` (the reference's keys)."""
    if stats is None:
        return frozenset()
    return _kept(_KEYS, stats, _expected_keys)


def _expected_keys(stats: StatRequest) -> frozenset[str]:
    keys = {"lse"}
    if stats.sink_k:
        keys.add("sink_mass")
    if stats.spans:
        keys.add("span_mass")
    for flag, name in ((stats.entropy, "entropy"), (stats.distance, "distance"),
                       (stats.window_distance, "window_distance"), (stats.recent, "recent_mass")):
        if flag:
            keys.add(name)
    if stats.argmax:
        keys |= {"argmax", "max_prob"}
    if stats.received:
        keys |= {"received_sum", "received_count"}
    return frozenset(keys)


_DECLINED: dict = {}      # (path, its declared sets) -> {id(StatRequest): (the request, the answer)}


def decline_reason(path: str, supported_stats: frozenset[str], supported_edits: frozenset[str],
                   stats: StatRequest | None, edits: "LayerEdits | None") -> str | None:
    """Why ``path`` cannot do this request (a sentence), or None when it can: every requested
    statistic field and every active edit field must be in the path's declared sets. (Without edits
    the answer is kept per request, as ``active``'s: every layer of every step asks it, up to three
    times a call.)"""
    if edits is None:
        if stats is None:
            return None
        cache = _DECLINED.get((path, supported_stats, supported_edits))
        if cache is None:
            cache = _DECLINED[(path, supported_stats, supported_edits)] = {}
        got = cache.get(id(stats))                      # _kept's hit, without building its function
        if got is not None and got[0] is stats:
            return got[1]
        return _kept(cache, stats, lambda s: _decline(path, supported_stats, supported_edits, s, None))
    return _decline(path, supported_stats, supported_edits, stats, edits)


def _decline(path, supported_stats, supported_edits, stats, edits) -> str | None:
    missing = sorted(active(stats) - supported_stats)
    if missing:
        return f"{path} does not compute the statistic field(s) {missing}"
    missing = sorted(active(edits) - supported_edits)
    if missing:
        return f"{path} does not apply the edit field(s) {missing}"
    return None
