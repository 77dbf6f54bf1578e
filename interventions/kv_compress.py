"""KV-cache compression by head class: streaming heads keep only sink + recent tokens, retrieval
(full) heads keep everything.

DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", §3.3 deployment): a fraction of KV heads becomes streaming heads whose cache
holds the first ``sink`` and the last ``recent`` tokens; RazorAttention (Tang et al. 2024,
"RazorAttention: Efficient KV Cache Compression Through Retrieval Heads", §3) keeps the full cache
only for its retrieval set (echo + induction heads).

``HeadClassCache`` is a transformers ``Cache`` whose layers (``HeadClassLayer``) store the full KV
heads ``[batch, n_full, T, d]`` and the streaming KV heads' sink ``[batch, n_stream, <=sink, d]`` and
recent ``[batch, n_stream, <=recent, d]`` parts in separate tensors: the memory held between decode
steps is the compressed size (``nbytes``). For the attention call of each step, ``update`` hands the
attention function one ``[batch, kv_heads, T, d]`` view assembled for that call only (positions a
streaming head dropped are zero) and the streaming heads run with ``StreamingGate(alpha=0)``
(``streaming_edits``), whose streaming attention reads exactly the sink and recent positions: the
result equals the mask-only computation over the full cache. No change to the attention path is
needed; the transient assembled tensor costs one layer's full K/V at a time. On a sliding-window
layer (``windows``) the full heads keep only the window, as transformers' own cache does there.

``compensate=True`` adds RazorAttention's compensation token (§3.3): the tokens a streaming head
drops are summarised by one token, k_c = mean of the dropped keys and v_c = mean of the dropped
values, which stands for all N_d of them in the softmax:

    o = (sum_{j kept} e^{q.k_j} v_j + N_d e^{q.k_c} v_c) / (sum_{j kept} e^{q.k_j} + N_d e^{q.k_c})

The layer stores the running sums of the dropped keys and values (one token per streaming head) and
their count; in the view handed to the attention function every dropped position holds (k_c, v_c),
so the unmodified softmax over the view is exactly the formula above. The streaming heads then run
without the gate, and, as in RazorAttention, the prompt itself (prefill) is computed with the full
cache; compression starts with the first decode step.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..probe.edits import StreamingGate

# The two deployments' budgets. DuoAttention (Xiao et al. 2024, §3.3 and its experiments): streaming
# heads keep 64 attention-sink tokens and the 256 most recent ones. RazorAttention (Tang et al. 2024,
# §3.3): every head outside the retrieval set keeps 4 sink tokens and the last max(4000, N/5) tokens
# (``razor_recent``), the dropped ones folded into one compensation token.
DUO_SINK, DUO_RECENT = 64, 256
RAZOR_SINK = 4


def razor_recent(n_tokens: int) -> int:
    """RazorAttention's recent window for an N-token input (§3.3): max(4000, N // 5) tokens. Inputs of
    at most 4004 tokens therefore lose nothing (4 sinks + 4000 recent cover them)."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return max(4000, int(n_tokens) // 5)


class HeadClassLayer(DynamicLayer):
    """One layer's cache with KV heads ``stream`` kept as sink + recent tokens only. ``window``: the
    layer's sliding window (None: full attention); its full heads then keep only the last ``window``
    tokens, the only ones their queries can see (as transformers' own cache does for such layers)."""

    def __init__(self, stream: list[int], sink: int, recent: int, compensate: bool = False,
                 window: int | None = None):
        super().__init__()
        self.stream = sorted(int(g) for g in stream)
        self.sink, self.recent = int(sink), int(recent)
        self.compensate = bool(compensate)
        self.window = None if window is None else int(window)
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if self.compensate and self.stream and self.window is not None:
            raise ValueError("RazorAttention's compensation token is not supported on a sliding-window layer "
                             f"(window {self.window}) with streaming heads: the token would sit outside the "
                             "window; pass compensate=False or keep that layer's KV heads full")
        self.n = 0                                       # tokens seen (the logical length)
        self.n_dropped = 0                               # tokens folded into the compensation sums

    def lazy_initialization(self, key_states, value_states):
        """Allocate empty full / sink / recent stores (and the compensation sums) from the first
        key_states [B, G, q, d]. Raises IndexError if a streaming KV head is not below G."""
        super().lazy_initialization(key_states, value_states)
        G = key_states.shape[1]
        if any(not 0 <= g < G for g in self.stream):
            raise IndexError(f"streaming KV heads {self.stream} out of range: the layer has {G} KV heads")
        dev = key_states.device
        self.full_idx = torch.tensor([g for g in range(G) if g not in self.stream], dtype=torch.long, device=dev)
        self.stream_idx = torch.tensor(self.stream, dtype=torch.long, device=dev)
        B, _, _, d = key_states.shape
        empty = lambda n: key_states.new_zeros(B, n, 0, d)
        self.kf, self.vf = empty(len(self.full_idx)), empty(len(self.full_idx))     # [B, Gf, T, d]
        self.ks, self.vs = empty(len(self.stream)), empty(len(self.stream))         # sink part
        self.kr, self.vr = empty(len(self.stream)), empty(len(self.stream))         # recent part
        self.kc = key_states.new_zeros(B, len(self.stream), 1, d)                    # sum of dropped keys
        self.vc = key_states.new_zeros(B, len(self.stream), 1, d)                    # sum of dropped values

    def _assembled_old(self, which: str) -> torch.Tensor:
        """[B, G, n, d] of what is stored, streaming heads zero outside sink/recent."""
        full, sink, rec = (self.kf, self.ks, self.kr) if which == "k" else (self.vf, self.vs, self.vr)
        B, _, _, d = full.shape
        G = len(self.full_idx) + len(self.stream)
        out = full.new_zeros(B, G, self.n, d)
        out[:, self.full_idx, self.n - full.shape[2]:] = full          # windowed: only the last tokens
        s = torch.zeros(B, len(self.stream), self.n, d, dtype=full.dtype, device=full.device)
        s[:, :, :sink.shape[2]] = sink
        if rec.shape[2]:
            s[:, :, self.n - rec.shape[2]:] = rec
        if self.compensate and self.n_dropped:
            comp = (self.kc if which == "k" else self.vc) / self.n_dropped               # [B, Gs, 1, d]
            a = sink.shape[2]
            s[:, :, a:a + self.n_dropped] = comp.to(s.dtype)
        out[:, self.stream_idx] = s
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        """key/value_states [B, G, q, d] -> the [B, G, n + q, d] keys/values for this call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.stream and self.window is None:
            # every KV head full, no window: exactly DynamicLayer (no view to assemble)
            self.kf = torch.cat([self.kf, key_states], dim=2)
            self.vf = torch.cat([self.vf, value_states], dim=2)
            self.n += key_states.shape[2]
            self.keys, self.values = self.kf, self.vf
            return self.kf, self.vf
        keys = torch.cat([self._assembled_old("k"), key_states], dim=2)
        values = torch.cat([self._assembled_old("v"), value_states], dim=2)
        q = key_states.shape[2]
        self.kf = torch.cat([self.kf, key_states[:, self.full_idx]], dim=2)
        self.vf = torch.cat([self.vf, value_states[:, self.full_idx]], dim=2)
        if self.window is not None and self.kf.shape[2] > self.window:       # older keys are never seen again
            self.kf, self.vf = self.kf[:, :, -self.window:], self.vf[:, :, -self.window:]
        ks, vs = key_states[:, self.stream_idx], value_states[:, self.stream_idx]
        room = max(0, self.sink - self.n)
        self.ks = torch.cat([self.ks, ks[:, :, :room]], dim=2)
        self.vs = torch.cat([self.vs, vs[:, :, :room]], dim=2)
        kr, vr = torch.cat([self.kr, ks], dim=2), torch.cat([self.vr, vs], dim=2)
        first = self.n + q - kr.shape[2]                          # position of kr's first token
        over = max(0, kr.shape[2] - self.recent)                  # tokens leaving the recent window
        if self.compensate and over:
            lo = max(0, self.sink - first)                        # those also in the sink are kept
            if over > lo:
                self.kc = self.kc + kr[:, :, lo:over].float().sum(2, keepdim=True).to(self.kc.dtype)
                self.vc = self.vc + vr[:, :, lo:over].float().sum(2, keepdim=True).to(self.vc.dtype)
                self.n_dropped += over - lo
        self.kr, self.vr = kr[:, :, over:], vr[:, :, over:]
        self.n += q
        self.keys, self.values = self.kf, self.vf        # what DynamicLayer's helpers look at
        return keys, values

    def get_seq_length(self) -> int:
        """Tokens seen so far (the logical length, not what a streaming head keeps)."""
        return self.n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for the attention mask: (tokens seen + ``query_length``, 0); the
        view ``update`` hands out always spans every position."""
        return self.n + query_length, 0

    def _refuse(self, what: str):
        raise NotImplementedError(
            f"HeadClassCache does not support {what} (beam search, assisted decoding, cache cropping): its "
            "streaming heads keep sink + recent tokens apart from the full heads. Generate with greedy or "
            "sampling decoding (num_beams=1, no assistant model)")

    def crop(self, tokens_to_remove: int):
        """Refused: see ``_refuse`` (the inherited version would crop the full heads only). The argument
        carries transformers' current name (``max_length`` was deprecated in 5.17 and is gone in 5.24)."""
        self._refuse("crop")

    def batch_repeat_interleave(self, repeats: int):
        """Refused: see ``_refuse``."""
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor):
        """Refused: see ``_refuse``."""
        self._refuse("batch_select_indices")

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Refused: see ``_refuse``."""
        self._refuse("reorder_cache")

    def nbytes(self) -> int:
        """Bytes held between steps (full heads' K/V, streaming heads' sink + recent K/V, and the
        compensation sums when ``compensate``); 0 before the first update."""
        if not self.is_initialized:
            return 0
        parts = [self.kf, self.vf, self.ks, self.vs, self.kr, self.vr] + ([self.kc, self.vc] if self.compensate else [])
        return sum(t.numel() * t.element_size() for t in parts)


class HeadClassCache(Cache):
    """A cache for ``n_layers`` layers; ``stream[l]`` lists layer l's streaming KV heads. ``windows``:
    each layer's sliding window or None (``model.cfg.windows``; Gemma-3: 512 on 5 of 6 layers), so
    that full heads of sliding layers keep only their window; None = no layer has one."""

    def __init__(self, stream: dict[int, list[int]], n_layers: int, sink: int = DUO_SINK,
                 recent: int = DUO_RECENT,
                 compensate: bool = False, windows=None):
        if sink < 0 or recent < 1:
            raise ValueError(f"sink must be >= 0 and recent >= 1, got sink={sink}, recent={recent}")
        windows = [None] * n_layers if windows is None else list(windows)
        if len(windows) != n_layers:
            raise ValueError(f"windows has {len(windows)} entries for {n_layers} layers (pass model.cfg.windows)")
        super().__init__(layers=[HeadClassLayer(stream.get(l, []), sink, recent, compensate, windows[l])
                                 for l in range(n_layers)])
        self.sink, self.recent, self.compensate = sink, recent, compensate

    def nbytes(self) -> int:
        """Bytes held by the cache (all layers, keys and values)."""
        return sum(layer.nbytes() for layer in self.layers)


def streaming_edits(model, stream: dict[int, list[int]], sink: int = DUO_SINK,
                    recent: int = DUO_RECENT) -> list[StreamingGate]:
    """StreamingGate(alpha=0) on the query heads of each streaming KV head (GQA: H/G query heads
    share one KV head): pure streaming attention, the mask-only version of the compressed cache."""
    rep = model.cfg.n_heads // model.cfg.n_kv_heads
    out = []
    for l, gs in sorted(stream.items()):
        heads = [g * rep + i for g in gs for i in range(rep)]
        if heads:
            out.append(StreamingGate(l, heads, alpha=torch.zeros(len(heads)), sink=sink, recent=recent))
    return out


def stream_from_scores(scores, frac: float) -> dict[int, list[int]]:
    """The ``frac`` of KV heads with the LOWEST scores (a ``HeadScores`` over [layer, kv_head] or
    [layer, query head], e.g. DuoAttention gates or retrieval scores; query-head scores are reduced
    to KV heads by max) become streaming: {layer: [kv heads]}."""
    s = scores.scores if hasattr(scores, "scores") else torch.as_tensor(scores)
    G = int(scores.model.get("n_kv_heads", s.shape[1])) if hasattr(scores, "model") else s.shape[1]
    if s.shape[1] != G:
        s = s.reshape(s.shape[0], G, -1).amax(-1)
    n = int(round(frac * s.numel()))
    out: dict[int, list[int]] = {}
    for i in s.flatten().argsort()[:n].tolist():
        out.setdefault(i // G, []).append(i % G)
    return out


def kv_groups(heads, n_heads: int, n_kv_heads: int) -> set[tuple[int, int]]:
    """Query heads [(layer, head)] -> the (layer, KV head) pairs that hold them (GQA groups)."""
    rep = n_heads // n_kv_heads
    return {(int(l), int(h) // rep) for l, h in heads}


def head_class_stream(n_layers: int, n_kv_heads: int, keep, frac: float, seed: int = 0) -> dict[int, list[int]]:
    """The head-class split: ``frac`` of all KV heads become streaming, drawn (in a seeded order)
    from the KV heads NOT in ``keep`` (the retrieval class, which keeps its full cache); at most all
    of them. -> {layer: [streaming KV heads]}."""
    import random
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac}")
    keep = {(int(l), int(g)) for l, g in keep}
    others = [(l, g) for l in range(n_layers) for g in range(n_kv_heads) if (l, g) not in keep]
    random.Random(f"head-class-{seed}").shuffle(others)
    out: dict[int, list[int]] = {}
    for l, g in sorted(others[:min(len(others), round(frac * n_layers * n_kv_heads))]):
        out.setdefault(l, []).append(g)
    return out


def random_stream(n_layers: int, n_kv_heads: int, n: int, n_sets: int, seed: int = 0) -> list[dict[int, list[int]]]:
    """``n_sets`` random choices of ``n`` streaming KV heads among all of them (the control)."""
    import random
    rng = random.Random(f"random-stream-{seed}-{n}")
    pool = [(l, g) for l in range(n_layers) for g in range(n_kv_heads)]
    sets = []
    for _ in range(n_sets):
        d: dict[int, list[int]] = {}
        for l, g in sorted(rng.sample(pool, n)):
            d.setdefault(l, []).append(g)
        sets.append(d)
    return sets


def generate_compressed(model, prompt: torch.Tensor, stream: dict[int, list[int]], sink: int = DUO_SINK,
                        recent: int = DUO_RECENT, max_new_tokens: int = 24, compensate: bool = False):
    """Greedy decoding of prompt [N] with the compressed cache (streaming KV heads ``stream``) and the
    matching streaming edits; full heads of sliding-window layers keep only their window.
    -> (new tokens [n], cache bytes at the end, seconds)."""
    import time
    cache = HeadClassCache(stream, model.cfg.n_layers, sink, recent, compensate=compensate,
                           windows=model.cfg.windows)
    gate = streaming_edits(model, stream, sink, recent) if stream and not compensate else []
    t0 = time.time()
    with torch.no_grad(), model.edit(gate):
        out = model.generate(prompt[None], max_new_tokens=max_new_tokens, cache=cache)
    if torch.cuda.is_available() and prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, prompt.numel():].cpu(), cache.nbytes(), time.time() - t0
