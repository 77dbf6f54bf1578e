"""Streaming vs retrieval heads — DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient
Long-Context LLM Inference with Retrieval and Streaming Heads", §3.1–3.3, eq. 1–3; reference repo
mit-han-lab/duo-attention).

Two analyzers, both returning ``HeadScores`` where a high score means "needs full attention"
(retrieval head) and a low one "sink + recent window suffices" (streaming head):

``StreamingProxy`` ("streaming") — training-free proxy (§3; not a paper metric): per head, the
attention mass that falls outside sink ∪ recent window, i.e. on keys s >= ``sink`` with t - s >=
``recent``, averaged over the queries that have such keys (t >= sink + recent) of long natural-text
inputs. It is exact and O(N) from one recorded pass: the column statistic ``received_sum`` with
``received_window=(recent, N)`` sums, per key s, the attention s gets from queries with t - s >=
recent; summing it over keys s >= sink gives sum_t mass_t(outside), which is divided by the number
of queries t >= sink + recent (all earlier queries have no key outside the window). Under GQA the
score is per query head; ``extra["kv_scores"]`` holds the max over each KV head's query heads
(a KV head can only stream if all its query heads can).

``DuoGates`` ("duo") — the gate optimisation (§3.2): one alpha per KV head (init 1), each layer gets a
``StreamingGate`` (out = (1 - alpha) · streaming + alpha · full), loss = mean over answer tokens of
the squared difference of final hidden states (full model vs gated model; the decoder's last,
normed hidden state, as the reference's ``model.model(...)[0]``; mean over d_model) + 0.05 · mean |alpha|;
only the gates train, AdamW (weight decay 0) lr 0.02 with the reference's linear warm-up over the first
20% and decay over the last 20% (factor floored at 0.1), gates clamped to [0, 1] before each step.
Data: synthetic multi-passkey retrieval (NATO-alphabet passkeys at random depths of the shipped
haystack; labels = the question + passkey tokens). Gate scores are per KV head and are expanded
to the query heads of each group (``params["per_kv_head"]``; ``extra["alpha_kv"]`` holds [layer, kv_head]).

Deployment split at sparsity s (both analyzers): threshold = quantile(KV-head score, s); KV heads
scoring below it are streaming (``extra["streaming"]``, 1 = streaming, expanded to query heads).

Run ``python experiments/streaming.py --model smollm2`` (see ``--help``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from einops import rearrange
from tqdm.auto import tqdm

from ..probe import StreamingGate, Stats
from .base import Analyzer, register
from .common import expand_kv, final_hidden, kv_group_max
from .data import haystack_batch, load_haystack, prefix_ids, repeated_tokens
from .scores import HeadScores

NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
        "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
        "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
            "eighteenth", "nineteenth", "twentieth")


# ------------------------------------------------------------------------------------ helpers
def split(kv_scores: torch.Tensor, sparsity: float, n_heads: int | None = None):
    """DuoAttention deployment (reference ``sparsify_attention_heads``): threshold =
    quantile(kv_scores, sparsity); KV heads below it become streaming. Returns (threshold, streaming
    mask [L, G] or [L, n_heads] if given)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    # like the reference, break ties (e.g. many heads at exactly 0) with noise in [0, 1e-6) (seeded)
    noisy = kv_scores.float() + torch.rand(kv_scores.shape, generator=torch.Generator().manual_seed(0)) * 1e-6
    if sparsity >= 1:
        thr = float("inf")
    elif sparsity <= 0:
        thr = float("-inf")
    else:
        thr = float(torch.quantile(noisy.flatten(), sparsity))
    stream = noisy < thr
    if n_heads is not None:
        stream = expand_kv(stream, n_heads)
    return thr, stream


def outside_mass(model, tokens: torch.Tensor, sink: int, recent: int):
    """Per head mass outside sink ∪ recent, mean over queries t >= sink + recent: [L, B, H], plus
    the sink mass (s < sink) over the same queries [L, B, H]. One recorded pass (see module doc)."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    B, N = tokens.shape
    if N <= sink + recent:
        raise ValueError(f"inputs of {N} tokens have no key outside sink ({sink}) + recent ({recent}): use "
                         f"inputs longer than {sink + recent} tokens")
    req = Stats(sink_k=sink, received=True, received_window=(recent, N))
    with torch.no_grad(), model.record(req) as rec:
        model(tokens)
    n_q = N - sink - recent                                          # queries t >= sink + recent
    out, sinkm = [], []
    for l in rec.layers:
        rs = rec["received_sum", l]                                  # [B, H, K]
        out.append(rs[..., sink:].sum(-1) / n_q)
        sinkm.append(rec["sink_mass", l][..., sink + recent:].mean(-1))
    return torch.stack(out).cpu(), torch.stack(sinkm).cpu()


# ------------------------------------------------------------------------------------ proxy
@register
@dataclass
class StreamingProxy(Analyzer):
    """DuoAttention's training-free proxy: attention mass outside sink ∪ recent window (exact, O(N)).

    Defaults: DuoAttention's deployment window (sink 64, recent 256) on 1 haystack text of 1024
    tokens (about 10–17 s on SmolLM2 on 2 busy CPU cores); ``StreamingProxy.paper_config()`` uses longer
    inputs (8 texts of the model's context, capped at 8192 tokens).

    Parameters: ``sink`` / ``recent`` (the window in tokens), ``length`` (tokens per text; None =
    the model's context, capped at 8192), ``n_texts`` (haystack texts), ``sparsity`` (share of KV
    heads marked streaming in ``extra["streaming"]``: threshold = quantile of the KV-head scores)."""

    name = "streaming"
    paper = ("Xiao et al. 2024, DuoAttention, §3 (retrieval vs streaming heads; training-free proxy: "
             "attention outside sink + recent window)")
    description = ("mean attention mass on keys outside the first `sink` and the last `recent` tokens "
                   "(high: retrieval head that needs the full KV cache; ~0: streaming head)")
    threshold = None

    sink: int = 64
    recent: int = 256
    length: int = 1024
    n_texts: int = 1
    sparsity: float = 0.5

    @classmethod
    def paper_config(cls, **kw) -> "StreamingProxy":
        """Longer inputs: 8 haystack texts as long as the model's context (capped at 8192 tokens), with
        DuoAttention's deployment window (sink 64, recent 256; Xiao et al. 2024 §3)."""
        base = dict(length=None, n_texts=8)
        base.update(kw)
        return cls(**base)

    def score(self, model, data=None, progress: bool = True) -> HeadScores:
        """``data``: None (the shipped haystack), a text (str), or token ids [batch, pos] / [pos]."""
        t0 = time.time()
        if data is None:
            n = self.length if self.length is not None else min(model.cfg.max_ctx, 8192)
            toks = haystack_batch(model, self.n_texts, n)
            dataset = f"{toks.shape[0]} x {toks.shape[1]} tokens of Pride and Prejudice"
        elif isinstance(data, str):
            n = self.length or min(model.cfg.max_ctx, 8192)
            toks = haystack_batch(model, self.n_texts, n, data)
            dataset = f"{toks.shape[0]} x {toks.shape[1]} tokens of the given text"
        else:
            toks = torch.as_tensor(data)
            toks = toks[None] if toks.dim() == 1 else toks
            dataset = f"{toks.shape[0]} x {toks.shape[1]} given tokens"
        if toks.numel() == 0:
            raise ValueError("empty data")
        outs, sinks = [], []
        for b in tqdm(range(toks.shape[0]), desc="streaming proxy", disable=not progress):
            o, s = outside_mass(model, toks[b:b + 1], self.sink, self.recent)
            outs.append(o)
            sinks.append(s)
        out = torch.cat(outs, 1)                                     # [L, B, H]
        sink_m = torch.cat(sinks, 1)
        scores = out.mean(1)
        kv = kv_group_max(scores, model.cfg.n_kv_heads)
        thr, stream = split(kv, self.sparsity, model.cfg.n_heads)
        res = self._result(model, scores, dataset=dataset, started=t0, per_text=rearrange(out, "l b h -> b l h"),
                           sink_mass=sink_m.mean(1), recent_mass=(1 - sink_m - out).mean(1), kv_scores=kv,
                           streaming=stream.to(torch.uint8), threshold=thr,
                           params=dict(split_threshold=thr, per_kv_head="kv_scores = max over the query heads of "
                                       "a KV head; the split is per KV head, expanded to its query heads"))
        return res


# ------------------------------------------------------------------------------------ gate training
def passkey(gen: torch.Generator, n_words: int) -> str:
    """A passkey of ``n_words`` random NATO-alphabet words drawn with ``gen``, joined by spaces
    (DuoAttention's synthetic retrieval data, Xiao et al. 2024 §3.2)."""
    return " ".join(NATO[int(i)] for i in torch.randint(0, len(NATO), (n_words,), generator=gen))


def passkey_samples(model, n_samples: int, length_min: int, length_max: int, num_passkeys: int = 10,
                    passkey_length: int = 32, min_depth: float = 0.05, max_depth: float = 0.95,
                    depth_intervals: int = 1000, seed: int = 0, text: str | None = None) -> list[dict]:
    """Synthetic multi-passkey retrieval (DuoAttention reference ``MultiplePasskeyRetrievalDataset``):
    ``num_passkeys`` needles "Remember this sequence of words, it's the {k-th} passkey to the vault:
    <passkey>" (passkey = ``passkey_length`` random NATO words) at sorted random depths of the haystack,
    inside "This is a very long story book: <book> ... </book>.", followed by every question + passkey.
    Context lengths are spread over [length_min, length_max] (total tokens, approximately). Returns
    dicts with input_ids [N] and label_mask [N] (True on the question + passkey tokens)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer: pass samples as dicts with input_ids and label_mask")
    if not 1 <= num_passkeys <= len(ORDINALS):
        raise ValueError(f"num_passkeys must be in 1..{len(ORDINALS)}")
    hay = repeated_tokens(tok, load_haystack() if text is None else text, int(length_max))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    sep = enc("\n\n")
    p1 = prefix_ids(tok) + enc("This is a very long story book: <book> ")
    p2 = enc(" </book>.\n\n")
    gen = torch.Generator().manual_seed(seed)
    depths_all = torch.linspace(min_depth, max_depth, depth_intervals)
    lengths = torch.linspace(length_min, length_max, n_samples).round().long().tolist() if n_samples > 1 \
        else [length_max]
    out = []
    for n in lengths:
        keys = [passkey(gen, passkey_length) for _ in range(num_passkeys)]
        needles = [enc(f"Remember this sequence of words, it's the {ORDINALS[i]} passkey to the vault: ") + enc(k)
                   for i, k in enumerate(keys)]
        qa = []
        for i, k in enumerate(keys):
            qa += enc(f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\n"
                      f"Passkey: ") + enc(k) + sep
        other = len(p1) + len(p2) + len(qa) + sum(len(x) + 2 * len(sep) for x in needles)
        n_hay = int(n) - other
        if n_hay < num_passkeys:
            raise ValueError(f"length {n} is too short for {num_passkeys} passkeys of {passkey_length} words "
                             f"({other} tokens without haystack)")
        h = hay[:n_hay]
        depths = depths_all[torch.randperm(depth_intervals, generator=gen)[:num_passkeys]].sort().values
        ctx, last = [], 0
        for d, nd in zip(depths.tolist(), needles):
            p = int(len(h) * d)
            ctx += h[last:p] + sep + nd + sep
            last = p
        ctx += h[last:]
        ids = p1 + ctx + p2 + qa
        label = [False] * (len(p1) + len(ctx) + len(p2)) + [True] * len(qa)
        out.append({"input_ids": torch.tensor(ids), "label_mask": torch.tensor(label), "passkeys": keys})
    return out


def lr_factor(step: int, steps: int) -> float:
    """The reference schedule: min(1, max((step+1)/(steps//5), 0.1), max((steps-step)/(steps//5), 0.1))."""
    w = max(1, steps // 5)
    return min(1.0, max((step + 1) / w, 0.1), max((steps - step) / w, 0.1))


def gate_edits(model, alpha_kv: torch.Tensor, sink: int, recent: int) -> list:
    """One StreamingGate per layer with the KV-head gates expanded to their query heads."""
    H = model.cfg.n_heads
    r = H // alpha_kv.shape[1]
    return [StreamingGate(l, list(range(H)), alpha_kv[l].repeat_interleave(r), sink=sink, recent=recent)
            for l in range(alpha_kv.shape[0])]


@register
@dataclass
class DuoGates(Analyzer):
    """DuoAttention gate optimisation (Xiao et al. 2024 §3.2, eq. 2–3): per-KV-head gates trained
    on the CPU by distilling the full model's final hidden states on passkey answers.

    The defaults are a CPU-sized run, much smaller than the paper: 200 steps (paper 2000) on
    contexts of 384–640 tokens (paper 1000–32000) with 3 passkeys of 8 words (paper 10 of 32) and a
    window scaled down with the contexts (sink 32, recent 128; paper: sink 128, recent 256 in
    training). About 10 minutes on SmolLM2 on 2 free cores. ``DuoGates.quick()`` (12 steps on
    224–288-token contexts, sink 16, recent 64: well under a minute) is for smoke runs and reports;
    ``DuoGates.paper_config()`` is the paper's recipe (needs a GPU and a long-context model).

    Parameters: ``steps`` (optimiser steps, one sample each), ``lr`` (AdamW), ``reg`` (weight of
    mean |alpha|; 0.05), ``sink`` / ``recent`` (streaming window in tokens), ``length_min`` /
    ``length_max`` (context lengths of the synthetic samples), ``num_passkeys`` / ``passkey_length``
    (passkeys per sample, NATO words per passkey), ``n_samples`` (synthetic samples), ``sparsity``
    (share of KV heads marked streaming), ``seed`` (samples and their order).
    """

    name = "duo"
    paper = ("Xiao et al. 2024, DuoAttention, §3.2 eq. 2-3 (gates trained by hidden-state distillation on "
             "synthetic multi-passkey retrieval; repo mit-han-lab/duo-attention)")
    description = ("trained gate alpha of the head's KV head (1: keeps full attention = retrieval head; "
                   "0: sink + recent window suffices = streaming head)")
    threshold = None

    steps: int = 200
    lr: float = 0.02
    reg: float = 0.05
    sink: int = 32
    recent: int = 128
    length_min: int = 384
    length_max: int = 640
    num_passkeys: int = 3
    passkey_length: int = 8
    n_samples: int = 20
    sparsity: float = 0.5
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "DuoGates":
        """Smoke-run settings: 12 steps on 4 contexts of 224-288 tokens, 2 passkeys of 8 words, sink 16,
        recent 64 (well under a minute on a CPU: for smoke runs, too short to rank heads)."""
        base = dict(steps=12, sink=16, recent=64, length_min=224, length_max=288, num_passkeys=2,
                    passkey_length=8, n_samples=4)
        base.update(kw)
        return cls(**base)

    @classmethod
    def paper_config(cls, **kw) -> "DuoGates":
        """The paper's recipe (Xiao et al. 2024 §3.2; needs a GPU and a long-context model): 2000 steps,
        50 contexts of 1000-32000 tokens, 10 passkeys of 32 words, sink 128, recent 256."""
        base = dict(steps=2000, sink=128, recent=256, length_min=1000, length_max=32000, num_passkeys=10,
                    passkey_length=32, n_samples=50)
        base.update(kw)
        return cls(**base)

    def samples(self, model, data=None) -> list[dict]:
        """The training samples: synthetic multi-passkey contexts (``passkey_samples``) for ``data`` None or
        a haystack text, else ``data`` checked: dicts with input_ids [N] and label_mask [N] holding at
        least one True. Raises ValueError for empty data or a malformed sample."""
        if data is None or isinstance(data, str):
            return passkey_samples(model, self.n_samples, self.length_min, self.length_max, self.num_passkeys,
                                   self.passkey_length, seed=self.seed, text=data)
        data = list(data)
        if not data:
            raise ValueError("empty data")
        for d in data:
            if "input_ids" not in d or "label_mask" not in d:
                raise ValueError("each sample needs input_ids [N] and label_mask [N]")
            if not bool(torch.as_tensor(d["label_mask"]).any()):
                raise ValueError("a sample has no labelled (answer) token")
        return data

    def score(self, model, data=None, progress: bool = True) -> HeadScores:
        """``data``: None (synthetic passkeys in the shipped haystack), a haystack text, or dicts
        with input_ids [N] and label_mask [N]."""
        t0 = time.time()
        samples = self.samples(model, data)
        L, H, G = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads
        longest = max(int(torch.as_tensor(s["input_ids"]).numel()) for s in samples)
        if longest > model.cfg.max_ctx:
            raise ValueError(f"samples of {longest} tokens exceed {model.cfg.name}'s context of {model.cfg.max_ctx}")
        if longest <= self.sink + self.recent:
            raise ValueError(f"samples of at most {longest} tokens never leave sink ({self.sink}) + recent "
                             f"({self.recent}): the gates would learn nothing")
        # targets: the full model's final hidden states on the labelled positions (plain fast path)
        targets = []
        with torch.no_grad():
            for s in samples:
                ids = torch.as_tensor(s["input_ids"]).reshape(1, -1)
                m = torch.as_tensor(s["label_mask"]).reshape(-1).bool()
                targets.append(final_hidden(model, ids)[0, m.to(model.device)].float())
        alpha = torch.nn.Parameter(torch.ones(L, G, device=model.device))
        opt = torch.optim.AdamW([alpha], lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda st: lr_factor(st, self.steps))
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        hist, dist_hist = [], []
        try:
            for step in tqdm(range(self.steps), desc="duo gates", disable=not progress):
                with torch.no_grad():
                    alpha.clamp_(0.0, 1.0)
                if not order:
                    order = torch.randperm(len(samples), generator=gen).tolist()
                i = order.pop()
                ids = torch.as_tensor(samples[i]["input_ids"]).reshape(1, -1)
                m = torch.as_tensor(samples[i]["label_mask"]).reshape(-1).bool().to(model.device)
                with model.edit(gate_edits(model, alpha, self.sink, self.recent)):
                    h = final_hidden(model, ids)[0, m].float()
                distill = (targets[i] - h).pow(2).mean(-1).mean()
                loss = distill + self.reg * alpha.abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                hist.append(loss.item())
                dist_hist.append(distill.item())
        finally:
            for p in frozen:
                p.requires_grad_(True)
        with torch.no_grad():
            alpha.clamp_(0.0, 1.0)
        kv = alpha.detach().cpu()
        thr, stream = split(kv, self.sparsity, H)
        res = self._result(model, expand_kv(kv, H), dataset=f"{len(samples)} synthetic multi-passkey samples "
                           f"({self.num_passkeys} passkeys of {self.passkey_length} NATO words in Pride and "
                           "Prejudice)" if data is None else f"{len(samples)} given samples", started=t0,
                           alpha_kv=kv, streaming=stream.to(torch.uint8), loss=torch.tensor(hist),
                           distill_loss=torch.tensor(dist_hist), threshold=thr,
                           params=dict(split_threshold=thr, per_kv_head="one gate per KV head, expanded to the "
                                       "query heads of its group (scores[l, h] = alpha[l, h // (H // G)])"))
        return res
