"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", §2, retrieval score eq. 1; reference repo nightdessert/Retrieval_Head).

Needle in a haystack: a needle sentence is put at depth d% of n haystack tokens, a question asks for
it and the model decodes greedily. While it decodes, each head's top-1 attended key is read from the
probe's O(N) ``argmax`` statistic (no N×N pattern). Per decode step producing token w (the step whose
query *produced* w), a head earns 1/|span| when its top-1 key lies in the needle span and the prompt
token there equals w ("copy-paste"). A test counts only when the ROUGE-1 recall of the answer in the
output exceeds 50%; a head's score is the mean over counted tests; retrieval head: score > 0.1.

The needle span is the first window of len(answer tokens) prompt tokens whose token set covers more
than 90% of the answer's token set (reference ``find_needle_idx``). As in the reference the prompt
minus its last token is prefilled once (here: on the plain fast path, nothing recorded), and decoding
starts by feeding the last prompt token, so every recorded ``argmax`` row is a decode step.

``masking_experiment`` repeats the test with the top-k heads made uniform (``hs.Ablate(how="uniform")``,
query × 1e-4) during decoding only (the prefill runs unedited, like the reference which zeroes the
heads' queries in its decode loop), against k random heads (seeded draws outside the top heads).

Run ``python -m headscope.heads.retrieval --model smollm2`` (see ``--help``).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import Analyzer, register
from .scores import HeadScores

DATA = Path(__file__).parent / "data"
SENTENCE_END = (".", '."', ".'", "!", "?", '!"', '?"')


# ------------------------------------------------------------------------------------ data
def load_haystack() -> str:
    """The shipped haystack: the opening chapters of Pride and Prejudice (public domain; SOURCES.md)."""
    return (DATA / "haystack.txt").read_text(encoding="utf-8")


def load_needles() -> list[dict]:
    """The shipped (needle, question, answer) triples (needles.json; SOURCES.md)."""
    return json.loads((DATA / "needles.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ ROUGE-1
_WORD = re.compile(r"[a-z0-9]+")


def _stem(w: str) -> str:
    """A light suffix stripper standing in for the Porter stemmer that rouge_score uses
    (``use_stemmer=True`` in the reference): plural and verb endings, with Porter's undoubling
    (sitting -> sit)."""
    if len(w) <= 3:
        return w
    for suf, rep in (("sses", "ss"), ("ies", "y"), ("ing", ""), ("edly", ""), ("ed", ""), ("ly", ""),
                     ("es", ""), ("s", "")):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            w = w[: len(w) - len(suf)] + rep
            if suf in ("ing", "ed", "edly") and len(w) > 3 and w[-1] == w[-2] and w[-1] not in "aeiouylsz":
                w = w[:-1]
            return w
    return w


def _units(x, stem: bool) -> list:
    if isinstance(x, str):
        words = _WORD.findall(x.lower())            # rouge_score's tokenizer: lowercase, [a-z0-9]+ runs
        return [_stem(w) for w in words] if stem else words
    return [int(t) for t in x]                      # token ids: compare ids


def rouge1_recall(reference, prediction, stem: bool = True) -> float:
    """ROUGE-1 recall of ``reference`` in ``prediction``: clipped unigram overlap / reference unigrams.
    Strings are split into lowercase alphanumeric words (optionally stemmed); sequences of ints are
    compared as token ids. An empty reference gives 0."""
    ref, pred = _units(reference, stem), _units(prediction, stem)
    if not ref:
        return 0.0
    cp: dict = {}
    for u in pred:
        cp[u] = cp.get(u, 0) + 1
    hit = 0
    for u, n in _count(ref).items():
        hit += min(n, cp.get(u, 0))
    return hit / len(ref)


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


# ------------------------------------------------------------------------------------ tests
@dataclass
class NeedleTest:
    """One needle-in-a-haystack prompt, as token ids. ``span`` = [start, end) token positions of
    the needle answer in ``prompt``; ``answer`` the reference for the ROUGE gate (text or ids)."""

    prompt: torch.Tensor            # [N] int64
    span: tuple[int, int]
    answer: str | list[int]
    length: int = 0                 # haystack + needle tokens asked for
    depth: float = 0.0              # percent
    needle: int = 0                 # index into the needle list


def find_needle_span(prompt_ids, answer_ids, overlap: float = 0.9) -> tuple[int, int]:
    """First window of len(answer_ids) prompt tokens whose token set covers more than ``overlap``
    of the answer's token set (Wu et al. 2024, reference ``find_needle_idx``); (-1, -1) if none."""
    ids = [int(t) for t in prompt_ids]
    ans = [int(t) for t in answer_ids]
    n = len(ans)
    if n == 0:
        return -1, -1
    aset = set(ans)
    for i in range(len(ids)):
        if len(set(ids[i:i + n]) & aset) / len(aset) > overlap:
            return i, i + n
    return -1, -1


class _Builder:
    """Builds NeedleTests for a model with a tokenizer (haystack tokenised once)."""

    def __init__(self, model, haystack: str, chat: bool | None):
        tok = model.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer: pass a list of NeedleTest (token ids) as data")
        self.model, self.tok = model, tok
        self.chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
        if not haystack.strip():
            raise ValueError("the haystack is empty")
        self.hay = tok.encode(haystack, add_special_tokens=False)
        self._base = list(self.hay)
        ends = {}
        for t in set(self.hay):
            ends[t] = tok.decode([t]).strip().endswith(SENTENCE_END)
        self.is_end = [ends[t] for t in self.hay]
        self._base_end = list(self.is_end)

    def context(self, needle: str, length: int, depth: float) -> str:
        """Reference ``insert_needle``: trim the haystack to length - len(needle) tokens (repeating the
        haystack when it is too short, as the reference does), insert the needle at depth% after the
        closest preceding sentence end."""
        nt = self.tok.encode(" " + needle.strip(), add_special_tokens=False)
        n_hay = length - len(nt)
        if n_hay <= 0:
            raise ValueError(f"length {length} is shorter than the needle ({len(nt)} tokens)")
        while n_hay > len(self.hay):     # the reference repeats its haystack files until long enough
            sep = self.tok.encode("\n\n", add_special_tokens=False)
            self.is_end = self.is_end + [True] * len(sep) + self._base_end
            self.hay = self.hay + sep + self._base
        hay = self.hay[:n_hay]
        if depth >= 100:
            ids = hay + nt
        else:
            p = int(n_hay * depth / 100)
            while p > 0 and not self.is_end[p - 1]:
                p -= 1
            ids = hay[:p] + nt + hay[p:]
        return self.tok.decode(ids)

    def prompt(self, context: str, question: str) -> torch.Tensor:
        if self.chat:
            text = f"<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
        else:
            text = f"{context}\nBased on the content of the book, Question: {question}\nAnswer:"
        return self.model.to_tokens(text, chat=self.chat)[0]

    def build(self, needles: list[dict], lengths, depths) -> list[NeedleTest]:
        tests = []
        for ni, nd in enumerate(needles):
            for n in lengths:
                for d in depths:
                    ids = self.prompt(self.context(nd["needle"], int(n), float(d)), nd["question"])
                    span = (-1, -1)
                    for a in (nd["answer"], " " + nd["answer"]):   # the answer alone or mid-sentence
                        span = find_needle_span(ids, self.tok.encode(a, add_special_tokens=False))
                        if span[0] >= 0:
                            break
                    if span[0] < 0:
                        raise ValueError(f"needle {ni}: answer {nd['answer']!r} not found in the prompt "
                                         f"(length {n}, depth {d}); is the answer part of the needle?")
                    tests.append(NeedleTest(ids, span, nd["answer"], int(n), float(d), ni))
        return tests


def _stop_ids(model) -> list[int]:
    """The model's EOS ids (tokenizer and generation config), its end-of-turn token and the newline
    token (the reference stops decoding at a newline)."""
    tok = model.tokenizer
    out = []
    gc = getattr(model.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is not None:
        out += [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    if tok is not None:
        if tok.eos_token_id is not None:
            out.append(int(tok.eos_token_id))
        for nl in ("\n", "\n\n"):                      # the reference stops at a newline
            ids = tok.encode(nl, add_special_tokens=False)
            if len(ids) == 1:
                out.append(int(ids[0]))
        for s in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            i = tok.convert_tokens_to_ids(s) if s in tok.get_vocab() else None
            if i is not None:
                out.append(int(i))
    return sorted(set(out))


def decode(model, prompts, max_new_tokens: int, stop_ids=None, record: bool = False, edits=(),
           **generate_kw):
    """Greedy decoding the reference's way, for one prompt [N] or a list of prompts (left-padded
    into one batch): prefill prompt[:-1] (no probe, no edit), then ``model.generate`` from the last
    prompt token with ``edits`` active (decoding only) and, if ``record``, the ``argmax`` statistic
    on every layer. Returns a list of (new token ids [T_i] up to and including the first stop token,
    argmax [L, H, T_i] or None): row i is the top-1 key (token position, 0 = first prompt token)
    of the query that produced new token i."""
    single = torch.is_tensor(prompts) and prompts.dim() == 1
    prompts = [torch.as_tensor(p).reshape(-1).cpu() for p in ([prompts] if single else prompts)]
    if any(p.numel() < 2 for p in prompts):
        raise ValueError("a needle prompt needs at least 2 tokens")
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
    stop_ids = _stop_ids(model) if stop_ids is None else list(stop_ids)
    kw = dict(generate_kw)
    if stop_ids:
        kw["eos_token_id"] = stop_ids
    padded = bool((mask == 0).any())
    with torch.no_grad():
        pre = dict(attention_mask=mask[:, :-1], position_ids=(mask[:, :-1].cumsum(-1) - 1).clamp_min(0)) \
            if padded else {}
        # logits_to_keep=1: the prefill needs only the cache, not N x vocab logits (Gemma: 262k vocab)
        cache = model.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, **pre).past_key_values
    rec_ctx = model.record(argmax=True) if record else contextlib.nullcontext()
    edit_ctx = model.edit(list(edits)) if edits else contextlib.nullcontext()
    with edit_ctx, rec_ctx as rec:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, past_key_values=cache,
                             **kw)
    new = out[:, N:].cpu()
    am = rec.stack("argmax").cpu() if record else None                       # [L, B, H, T]
    if am is not None and am.shape[-1] != new.shape[1]:
        raise RuntimeError(f"recorded {am.shape[-1]} decode steps for {new.shape[1]} new tokens")
    res = []
    for b in range(B):
        T = new.shape[1]
        hits = [i for i in range(T) if int(new[b, i]) in stop_ids] if stop_ids else []
        if hits:
            T = hits[0] + 1
        res.append((new[b, :T], None if am is None else am[:, b, :, :T]))
    return res[0] if single else res


def _batches(tests, size: int):
    """Indices of tests in groups of ``size`` with similar prompt lengths (little padding)."""
    order = sorted(range(len(tests)), key=lambda i: tests[i].prompt.numel())
    return [order[i:i + size] for i in range(0, len(order), max(1, size))]


def retrieval_step_scores(argmax: torch.Tensor, sequence: torch.Tensor, new: torch.Tensor,
                          span: tuple[int, int]) -> torch.Tensor:
    """Wu et al. 2024 eq. 1 for one test: argmax [L, H, T] top-1 key positions, ``sequence`` = prompt
    + new tokens, ``new`` [T] the generated tokens. A head earns 1/|span| per step whose top-1 key
    lies in the span and holds the token generated at that step. Returns [L, H]."""
    a, b = span
    seq = torch.as_tensor(sequence).reshape(-1).to(argmax.device)
    pos = argmax.clamp(0, seq.numel() - 1)
    hit = (argmax >= a) & (argmax < b) & (seq[pos] == new.to(argmax.device).view(1, 1, -1))
    return hit.float().sum(-1) / (b - a)


def _output_text(model, new: torch.Tensor, answer):
    if isinstance(answer, str) and model.tokenizer is not None:
        return model.tokenizer.decode(new, skip_special_tokens=True).strip()
    return [int(t) for t in new]


# ------------------------------------------------------------------------------------ analyzer
@register
@dataclass
class Retrieval(Analyzer):
    """Retrieval heads by the needle-in-a-haystack copy-paste score (Wu et al. 2024, §2 eq. 1).

    ``lengths`` are haystack + needle tokens (the question and chat template come on top); None =
    the paper's 20 lengths from 1000 to the model's context minus ``buffer``. ``depths`` in percent.
    ``needles``: how many of the shipped needles to use (or None = all). The quick default (3 lengths
    × 3 depths × 1 needle, 24 new tokens) needs about 45 s of one CPU core on SmolLM2;
    ``Retrieval.paper()`` is the reference grid (20 lengths × 10 depths, all needles, 50 tokens).
    """

    name = "retrieval"
    paper = ("Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality, §2 eq. 1 "
             "(repo nightdessert/Retrieval_Head)")
    description = ("share of the needle that the head copies: per decode step, 1/|span| when its top-1 key is "
                   "the needle token being generated; mean over needle tests answered with ROUGE-1 recall > 50%")
    threshold = 0.1

    lengths: tuple | None = (200, 400, 800)
    depths: tuple = (0.0, 50.0, 100.0)
    needles: int | None = 1
    max_new_tokens: int = 24
    rouge_gate: float = 0.5
    span_overlap: float = 0.9
    buffer: int = 200                    # paper lengths: up to max_ctx - buffer (room for question + answer)
    n_lengths: int = 20                  # paper grid when lengths is None
    chat: bool | None = None             # None: use the chat template when the tokenizer has one
    batch_size: int = 3                  # prompts decoded together (left-padded); 1 = the reference's loop
    generate_kwargs: dict | None = None  # passed on to model.generate (e.g. a logits_processor)

    @classmethod
    def paper_config(cls, **kw) -> "Retrieval":
        """The reference configuration: 20 lengths from 1000 to the context limit, depths 0..100 in
        10 steps, every shipped needle, up to 50 new tokens."""
        base = dict(lengths=None, depths=tuple(float(round(x)) for x in torch.linspace(0, 100, 10).tolist()),
                    needles=None, max_new_tokens=50)
        base.update(kw)
        return cls(**base)

    def grid_lengths(self, model) -> list[int]:
        if self.lengths is not None:
            return [int(n) for n in self.lengths]
        hi = model.cfg.max_ctx - self.buffer
        lo = min(1000, hi)
        return sorted({int(round(x)) for x in torch.linspace(lo, hi, self.n_lengths).tolist()})

    def tests(self, model, data=None) -> list[NeedleTest]:
        """The NeedleTests for ``data``: None (shipped haystack + needles), a dict with optional keys
        'haystack' (str) and 'needles' (list of {needle, question, answer}), or a list of NeedleTest."""
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], NeedleTest):
            return list(data)
        data = {} if data is None else dict(data)
        needles = data.get("needles") or load_needles()
        if self.needles is not None:
            needles = needles[: self.needles]
        if not needles:
            raise ValueError("no needles given")
        for nd in needles:
            missing = {"needle", "question", "answer"} - set(nd)
            if missing:
                raise ValueError(f"needle {nd!r} lacks {sorted(missing)}")
        lengths = self.grid_lengths(model)
        if not lengths or not self.depths:
            raise ValueError("empty grid: give at least one length and one depth")
        for d in self.depths:
            if not 0 <= float(d) <= 100:
                raise ValueError(f"depth {d} is not a percentage in [0, 100]")
        b = _Builder(model, data.get("haystack") or load_haystack(), self.chat)
        tests = b.build(needles, lengths, [float(d) for d in self.depths])
        return tests

    def _check(self, model, tests):
        if not tests:
            raise ValueError("no needle tests")
        longest = max(t.prompt.numel() for t in tests)
        if longest + self.max_new_tokens > model.cfg.max_ctx:
            raise ValueError(f"the longest needle prompt is {longest} tokens; with {self.max_new_tokens} new "
                             f"tokens it exceeds {model.cfg.name}'s context of {model.cfg.max_ctx}: use "
                             "shorter lengths")

    def score(self, model, data=None, progress: bool = True) -> HeadScores:
        t0 = time.time()
        tests = self.tests(model, data)
        self._check(model, tests)
        L, H = model.cfg.n_layers, model.cfg.n_heads
        per_test = torch.zeros(len(tests), L, H)
        recall = torch.zeros(len(tests))
        stop = _stop_ids(model)
        outputs = [None] * len(tests)
        bar = tqdm(total=len(tests), desc="retrieval NIAH", disable=not progress)
        for idx in _batches(tests, self.batch_size):
            got = decode(model, [tests[i].prompt for i in idx], self.max_new_tokens, stop_ids=stop, record=True,
                         **(self.generate_kwargs or {}))
            for i, (new, am) in zip(idx, got):
                t = tests[i]
                per_test[i] = retrieval_step_scores(am, torch.cat([t.prompt.cpu(), new]), new, t.span)
                outputs[i] = _output_text(model, new, t.answer)
                recall[i] = rouge1_recall(t.answer, outputs[i])
            bar.update(len(idx))
        bar.close()
        counted = recall > self.rouge_gate
        if counted.any():
            scores = per_test[counted].mean(0)
        else:
            warnings.warn(f"retrieval: none of the {len(tests)} needle tests passed the ROUGE-1 gate "
                          f"(> {self.rouge_gate:.0%} recall); every score is 0. Try shorter lengths or "
                          "more new tokens.", stacklevel=2)
            scores = torch.zeros(L, H)
        lengths = sorted({t.length for t in tests})
        depths = sorted({t.depth for t in tests})
        grid = torch.zeros(len(lengths), len(depths), L, H)
        grid_n = torch.zeros(len(lengths), len(depths))
        grid_recall = torch.zeros(len(lengths), len(depths))
        grid_tests = torch.zeros(len(lengths), len(depths))
        for i, t in enumerate(tests):
            a, b = lengths.index(t.length), depths.index(t.depth)
            grid_tests[a, b] += 1
            grid_recall[a, b] += recall[i]
            if counted[i]:
                grid[a, b] += per_test[i]
                grid_n[a, b] += 1
        grid = grid / grid_n.clamp_min(1)[..., None, None]
        grid_recall = grid_recall / grid_tests.clamp_min(1)
        res = self._result(
            model, scores, dataset=f"needle-in-a-haystack: {len(tests)} tests (Pride and Prejudice haystack)"
            if data is None else f"needle-in-a-haystack: {len(tests)} tests",
            started=t0,
            test_scores=per_test, test_recall=recall, test_counted=counted.to(torch.uint8),
            test_length=torch.tensor([t.length for t in tests]),
            test_depth=torch.tensor([t.depth for t in tests]),
            test_needle=torch.tensor([t.needle for t in tests]),
            test_prompt_tokens=torch.tensor([t.prompt.numel() for t in tests]),
            test_span=torch.tensor([t.span for t in tests]),
            grid_lengths=torch.tensor(lengths), grid_depths=torch.tensor(depths),
            grid_scores=grid, grid_counted=grid_n, grid_recall=grid_recall)
        res.params["outputs"] = [o if isinstance(o, str) else list(o) for o in outputs]
        return res


# ------------------------------------------------------------------------------------ masking
def _heads_of(scores) -> tuple[torch.Tensor, int, int]:
    s = scores.scores if isinstance(scores, HeadScores) else torch.as_tensor(scores)
    return s.float(), s.shape[0], s.shape[1]


def _ablations(heads):
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))
    from ..probe import Ablate
    return [Ablate(l, hs_, how="uniform") for l, hs_ in sorted(by_layer.items())]


def random_heads(n_layers: int, n_heads: int, k: int, exclude=(), seed: int = 0) -> list[tuple[int, int]]:
    """k distinct (layer, head) pairs drawn with ``random.Random(seed)`` outside ``exclude``."""
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in set(exclude)]
    if k > len(pool):
        raise ValueError(f"cannot draw {k} random heads from the {len(pool)} left after excluding {len(exclude)}")
    return sorted(random.Random(seed).sample(pool, k))


def niah_accuracy(model, tests: list[NeedleTest], heads=(), max_new_tokens: int = 24, progress: bool = False,
                  desc: str = "NIAH", batch_size: int = 3, **generate_kw) -> tuple[float, list[float], list]:
    """Mean ROUGE-1 recall over ``tests`` with ``heads`` made uniform while decoding."""
    edits = _ablations(heads) if heads else ()
    stop = _stop_ids(model)
    rec, outs = [0.0] * len(tests), [None] * len(tests)
    bar = tqdm(total=len(tests), desc=desc, disable=not progress)
    for idx in _batches(tests, batch_size):
        got = decode(model, [tests[i].prompt for i in idx], max_new_tokens, stop_ids=stop, edits=edits,
                     **generate_kw)
        for i, (new, _) in zip(idx, got):
            outs[i] = _output_text(model, new, tests[i].answer)
            rec[i] = rouge1_recall(tests[i].answer, outs[i])
        bar.update(len(idx))
    bar.close()
    return (sum(rec) / len(rec) if rec else float("nan")), rec, outs


def masking_experiment(model, scores, k: int = 20, n_random: int = 3, seed: int = 0, data=None,
                       analyzer: Retrieval | None = None, exclude_top: int | None = None,
                       progress: bool = True, baseline: tuple | None = None) -> dict:
    """Wu et al. 2024 §4 (needle test with heads masked): NIAH accuracy (mean ROUGE-1 recall) with
    the top-k heads by ``scores`` made uniform during decoding vs ``n_random`` draws of k random heads
    (seeds seed..seed+n_random-1) and vs no masking.

    Random heads are drawn outside the top ``exclude_top`` heads (the reference excludes its top-100
    list; default here: the heads scoring above the 0.1 threshold together with the top k, or only the
    top k when that leaves too few heads). Masking = ``hs.Ablate(how="uniform")`` (query × 1e-4) on
    the decode steps only: the prefill of prompt[:-1] runs unedited, as in the reference.
    """
    s, L, H = _heads_of(scores)
    if not 0 < k <= L * H:
        raise ValueError(f"k must be in 1..{L * H}")
    an = analyzer or Retrieval()
    tests = an.tests(model, data)
    an._check(model, tests)
    order = [(int(i) // H, int(i) % H) for i in torch.argsort(s.flatten(), descending=True, stable=True)]
    top = order[:k]
    if exclude_top is None:
        n_ex = max(k, int((s > Retrieval.threshold).sum()))
        if L * H - n_ex < k:
            n_ex = k
    else:
        n_ex = max(k, exclude_top)
    excluded = order[:n_ex]
    draws = [random_heads(L, H, k, excluded, seed + j) for j in range(n_random)]
    gk = an.generate_kwargs or {}
    base, base_r, base_o = baseline if baseline is not None else niah_accuracy(
        model, tests, (), an.max_new_tokens, progress, "NIAH no mask", an.batch_size, **gk)
    topk, top_r, top_o = niah_accuracy(model, tests, top, an.max_new_tokens, progress, f"NIAH top-{k} masked",
                                       an.batch_size, **gk)
    rand = [niah_accuracy(model, tests, d, an.max_new_tokens, progress, f"NIAH random-{k} #{j}", an.batch_size,
                          **gk) for j, d in enumerate(draws)]
    rand_acc = [r[0] for r in rand]
    mean = sum(rand_acc) / len(rand_acc) if rand_acc else float("nan")
    sd = (math.sqrt(sum((x - mean) ** 2 for x in rand_acc) / (len(rand_acc) - 1)) if len(rand_acc) > 1 else 0.0)
    return {"k": k, "n_tests": len(tests), "baseline": base, "top_k": topk, "random": rand_acc,
            "random_mean": mean, "random_std": sd, "top_heads": top, "random_heads": draws,
            "excluded_from_random": n_ex, "baseline_recall": base_r, "top_k_recall": top_r,
            "random_recall": [r[1] for r in rand], "outputs": {"baseline": base_o, "top_k": top_o},
            "baseline_run": (base, base_r, base_o),
            "masked_during": "decoding only (prefill of prompt[:-1] unedited)"}


# ------------------------------------------------------------------------------------ CLI
def _main(argv=None):
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m headscope.heads.retrieval",
                                description="Retrieval-head scores (Wu et al. 2024) and the masking experiment")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="haystack+needle tokens (default: quick)")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths in percent")
    p.add_argument("--needles", type=int, default=None, help="number of shipped needles (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--paper", action="store_true", help="the reference grid (20 lengths x 10 depths, all needles)")
    p.add_argument("--mask-k", type=int, nargs="*", default=[], help="run the masking experiment with these k")
    p.add_argument("--n-random", type=int, default=3)
    p.add_argument("--mask-lengths", type=int, nargs="+", default=None, help="masking grid (default: the scoring grid)")
    p.add_argument("--mask-depths", type=float, nargs="+", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", default=None, help="write the HeadScores here (PATH.json + PATH.safetensors)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    import headscope as hs

    m = hs.load(a.model)
    kw = {}
    if a.lengths:
        kw["lengths"] = tuple(a.lengths)
    if a.depths:
        kw["depths"] = tuple(a.depths)
    if a.needles:
        kw["needles"] = a.needles
    if a.max_new_tokens:
        kw["max_new_tokens"] = a.max_new_tokens
    an = Retrieval.paper_config(**kw) if a.paper else Retrieval(**kw)
    res = an.score(m)
    if a.save:
        res.save(a.save)
    n = res.scores.numel()
    thr = res.threshold
    print(f"model {m.cfg.name}: {len(res.extra['test_recall'])} tests, {int(res.extra['test_counted'].sum())} "
          f"passed the ROUGE gate; mean recall {float(res.extra['test_recall'].mean()):.3f}; {res.seconds:.1f} s")
    print(f"retrieval heads (> {thr}): {int(res.classify().sum())}/{n} = {res.fraction():.1%}; "
          f"exactly 0: {int((res.scores == 0).sum())}/{n} = {float((res.scores == 0).float().mean()):.1%}")
    print("top 10:", ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in res.top(10)))
    win = m.cfg.windows
    if any(w is not None for w in win):
        for kind, ls in (("sliding", [i for i, w in enumerate(win) if w is not None]),
                         ("full", [i for i, w in enumerate(win) if w is None])):
            sub = res.scores[ls]
            print(f"  {kind} layers {ls}: mean {float(sub.mean()):.4f} max {float(sub.max()):.4f} "
                  f"(> 0.1: {int((sub > 0.1).sum())}/{sub.numel()})")
    print("per layer max:", " ".join(f"{float(x):.2f}" for x in res.scores.max(1).values))
    print("grid recall [length x depth]:", res.extra["grid_lengths"].tolist(), res.extra["grid_depths"].tolist())
    print(res.extra["grid_recall"])
    print("prompt tokens:", res.extra["test_prompt_tokens"].tolist())
    print("outputs:", res.params["outputs"])
    man = an
    if a.mask_lengths or a.mask_depths:
        from dataclasses import replace
        man = replace(an, lengths=tuple(a.mask_lengths) if a.mask_lengths else an.lengths,
                      depths=tuple(a.mask_depths) if a.mask_depths else an.depths)
    base = None
    for k in a.mask_k:
        r = masking_experiment(m, res, k=k, n_random=a.n_random, seed=a.seed, analyzer=man, baseline=base)
        base = r["baseline_run"]
        print(f"masking k={k}: no mask {r['baseline']:.3f} | top-{k} retrieval heads {r['top_k']:.3f} | "
              f"random {k} heads {r['random_mean']:.3f} ± {r['random_std']:.3f} ({', '.join(f'{x:.3f}' for x in r['random'])})")
        print("  top heads:", r["top_heads"])
        print(f"  {r['n_tests']} tests; recall per test: no mask {[round(x, 2) for x in r['baseline_recall']]}, "
              f"top-k {[round(x, 2) for x in r['top_k_recall']]}")
        print("  top-k outputs:", r["outputs"]["top_k"])


if __name__ == "__main__":
    _main()
