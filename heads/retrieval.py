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

The prompt and the stop rule follow the reference (``retrieval_head_detection.py``,
``LLMNeedleHaystackTester.evaluate_and_log`` and ``decode``). With a chat template: one user turn
``<book>{context}</book>\nBased on the content of the book, Question: {q}\nAnswer:``. Without one:
the text ``context + "Based on the content of the book, Question: {q}\nAnswer:"`` (no separator),
tokenized with the tokenizer's own special tokens (a BOS only where the tokenizer adds one).
Decoding stops only at the newline token (the step that emits it is scored) and otherwise runs all
``max_new_tokens`` steps, through EOS; ``stop_at_eos=True`` also stops at EOS and end-of-turn tokens.

``masking_experiment`` repeats the test with the top-k heads made uniform (``hs.Ablate(how="uniform")``,
query × 1e-4) during decoding only (the prefill runs unedited, like the reference which zeroes the
heads' queries in its decode loop), against k random heads (seeded draws outside the top heads).

Run ``python experiments/retrieval.py --model smollm2`` (see ``--help``).
"""
from __future__ import annotations

import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .base import Analyzer, register
# decode and random_heads stay importable from here
from .common import batches, decode, has_chat_template, output_text, random_heads, stop_ids  # noqa: F401
from .data import load_haystack, load_needles  # noqa: F401  (load_haystack: public here too)
from .scores import HeadScores

SENTENCE_END = (".", '."', ".'", "!", "?", '!"', '?"')

# Wu et al. 2024's question (reference ``evaluate_and_log``); the plain prompt is context + QUESTION.
QUESTION = "Based on the content of the book, Question: {q}\nAnswer:"


# ------------------------------------------------------------------------------------ ROUGE-1
_ROUGE = None


def rouge1_recall(reference, prediction, stem: bool = True) -> float:
    """ROUGE-1 recall of ``reference`` in ``prediction``: clipped unigram overlap / reference unigrams.
    Strings are scored with ``rouge_score.rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)``
    (Porter stemmer), as the retrieval-head reference does; sequences of ints are compared as token
    ids. An empty reference gives 0."""
    if isinstance(reference, str):
        global _ROUGE
        from rouge_score import rouge_scorer
        if stem:
            _ROUGE = _ROUGE or rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
            scorer = _ROUGE
        else:
            scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
        if not isinstance(prediction, str):           # token ids never match words
            return 0.0
        return float(scorer.score(reference, prediction)["rouge1"].recall)
    ref, pred = Counter(int(t) for t in reference), Counter(int(t) for t in prediction)
    n = sum(ref.values())
    return sum(min(c, pred[u]) for u, c in ref.items()) / n if n else 0.0


# ------------------------------------------------------------------------------------ tests
@dataclass
class NeedleTest:
    """One needle-in-a-haystack prompt, as token ids. ``span`` = [start, end) token positions of
    the needle answer in ``prompt``; ``answer`` the reference for the ROUGE gate (text or ids).

    ``length``: haystack + needle tokens asked for; ``depth``: needle depth in percent; ``needle``:
    index into the needle list; ``prompt`` [N] int64 token ids."""

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

    def __init__(self, model, haystack: str, chat: bool | None, span_overlap: float = 0.9):
        self.span_overlap = span_overlap
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
        """The prompt ids [N] as the reference builds them (``evaluate_and_log``): with the chat
        template one user turn "<book>{context}</book>\\n" + QUESTION; without it the text
        context + QUESTION, tokenized with the tokenizer's default special tokens."""
        q = QUESTION.replace("{q}", question)
        if self.chat:
            return self.model.to_tokens(f"<book>{context}</book>\n{q}", chat=True)[0]
        return torch.tensor(self.tok(context + q)["input_ids"], dtype=torch.long)

    def build(self, needles: list[dict], lengths, depths) -> list[NeedleTest]:
        tests = []
        for ni, nd in enumerate(needles):
            for n in lengths:
                for d in depths:
                    ids = self.prompt(self.context(nd["needle"], int(n), float(d)), nd["question"])
                    span = (-1, -1)
                    for a in (nd["answer"], " " + nd["answer"]):   # the answer alone or mid-sentence
                        span = find_needle_span(ids, self.tok.encode(a, add_special_tokens=False), self.span_overlap)
                        if span[0] >= 0:
                            break
                    if span[0] < 0:
                        raise ValueError(f"needle {ni}: answer {nd['answer']!r} not found in the prompt "
                                         f"(length {n}, depth {d}); is the answer part of the needle?")
                    tests.append(NeedleTest(ids, span, nd["answer"], int(n), float(d), ni))
        return tests


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


# ------------------------------------------------------------------------------------ analyzer
@register
@dataclass
class Retrieval(Analyzer):
    """Retrieval heads by the needle-in-a-haystack copy-paste score (Wu et al. 2024, §2 eq. 1).

    ``lengths`` are haystack + needle tokens (the question and chat template come on top); None =
    the paper's 20 context lengths from 1000 to the model's context, each minus ``buffer``. ``depths`` in percent.
    ``needles``: how many of the shipped needles to use (or None = all). The quick default (3 lengths
    × 3 depths × 1 needle, 24 new tokens) needs about 45 s of one CPU core on SmolLM2;
    ``Retrieval.paper_config()`` is the reference grid (20 lengths × 10 depths, all needles, 50 tokens).

    Other parameters: ``max_new_tokens`` (greedy decode length; paper 50), ``rouge_gate`` (a test
    counts when the answer's ROUGE-1 recall exceeds it; 0.5), ``span_overlap`` (0.9, the needle-span
    overlap of the reference's ``find_needle_idx``, passed to ``find_needle_span``), ``n_lengths``
    (points of the paper grid), ``chat`` (wrap in the chat template; None: when the tokenizer has
    one; without it the prompt is context + question as plain text with the tokenizer's own special
    tokens, as the reference), ``stop_at_eos`` (False, the reference's rule: a decode stops only at the
    newline token and otherwise runs all ``max_new_tokens`` steps, through EOS; True: headscope's
    earlier rule, which also stops at EOS, end-of-turn and blank-line tokens), ``batch_size`` (prompts
    decoded together, left-padded; 1 = the reference's loop; a row that has stopped waits for the
    others), ``generate_kwargs`` (passed on to ``model.generate``).
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
    buffer: int = 200                    # paper grid: context length - buffer (room for question + answer)
    n_lengths: int = 20                  # paper grid when lengths is None
    chat: bool | None = None             # None: use the chat template when the tokenizer has one
    stop_at_eos: bool = False            # False: stop at the newline token only (reference); True: also EOS
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
        """The haystack lengths (tokens) to test: ``lengths`` as ints, or with ``lengths=None`` the paper's
        grid (Wu et al. 2024 §2) as the reference builds it (nightdessert/Retrieval_Head
        ``context_lengths`` and ``insert_needle``): ``n_lengths`` context lengths evenly spaced from
        min(1000, max_ctx) to max_ctx, rounded, each minus ``buffer`` (the reference's
        ``final_context_length_buffer``), deduplicated."""
        if self.lengths is not None:
            return [int(n) for n in self.lengths]
        hi = model.cfg.max_ctx
        ctx = torch.linspace(min(1000, hi), hi, self.n_lengths, dtype=torch.float64).round()   # [n_lengths]
        return sorted({int(c) - self.buffer for c in ctx.tolist()})

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
        b = _Builder(model, data.get("haystack") or load_haystack(), self.chat, self.span_overlap)
        tests = b.build(needles, lengths, [float(d) for d in self.depths])
        return tests

    def template_used(self, model, data=None) -> str:
        """"chat" (the tokenizer's chat template), "plain" (context + question as text with the
        tokenizer's default special tokens: models without a chat template) or "given tests"
        (``data`` = NeedleTests)."""
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], NeedleTest):
            return "given tests"
        return "chat" if (has_chat_template(model) if self.chat is None else self.chat) else "plain"

    def check_tests(self, model, tests):
        """Refuse an empty test list or prompts too long for the model's context."""
        if not tests:
            raise ValueError("no needle tests")
        longest = max(t.prompt.numel() for t in tests)
        if longest + self.max_new_tokens > model.cfg.max_ctx:
            raise ValueError(f"the longest needle prompt is {longest} tokens; with {self.max_new_tokens} new "
                             f"tokens it exceeds {model.cfg.name}'s context of {model.cfg.max_ctx}: use "
                             "shorter lengths")

    def score(self, model, data=None, progress: bool = True) -> HeadScores:
        """``data``: None (shipped haystack + needles), a dict with "haystack" / "needles", or a list of NeedleTest."""
        t0 = time.time()
        tests = self.tests(model, data)
        self.check_tests(model, tests)
        results = [None] * len(tests)
        stop = stop_ids(model, self.stop_at_eos)
        bar = tqdm(total=len(tests), desc="retrieval NIAH", disable=not progress)
        for idx in self.test_batches(tests):
            for i, r in zip(idx, self.run_batch(model, [tests[i] for i in idx], stop)):
                results[i] = r
            bar.update(len(idx))
        bar.close()
        return self.merge(model, data, tests, results, t0)

    def test_batches(self, tests) -> list[list[int]]:
        """The batches ``score`` decodes together (indices into ``tests``, similar lengths together): the
        units of work, also of the Ray version (``headscope.app.distributed``)."""
        return batches(tests, self.batch_size, key=lambda t: t.prompt.numel())

    def run_batch(self, model, tests: list[NeedleTest], stop=None) -> list[tuple]:
        """Decode ``tests`` together (left-padded) and score them: per test (scores [L, H] by eq. 1,
        the output (text or ids), its ROUGE-1 recall). ``stop``: the stop token ids (None:
        ``stop_ids(model, self.stop_at_eos)``)."""
        stop = stop_ids(model, self.stop_at_eos) if stop is None else stop
        got = decode(model, [t.prompt for t in tests], self.max_new_tokens, stop_ids=stop, record=True,
                     **(self.generate_kwargs or {}))
        out = []
        for t, (new, am) in zip(tests, got):
            text = output_text(model, new, t.answer)
            out.append((retrieval_step_scores(am, torch.cat([t.prompt.cpu(), new]), new, t.span), text,
                        rouge1_recall(t.answer, text)))
        return out

    def merge(self, model, data, tests: list[NeedleTest], results: list[tuple], t0: float) -> HeadScores:
        """The HeadScores from every test's ``run_batch`` result (in test order)."""
        L, H = model.cfg.n_layers, model.cfg.n_heads
        per_test = torch.stack([r[0] for r in results]) if results else torch.zeros(0, L, H)   # [T, L, H]
        outputs = [r[1] for r in results]
        recall = torch.tensor([float(r[2]) for r in results])
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
            grid_scores=grid, grid_counted=grid_n, grid_recall=grid_recall,
            params=dict(template_used=self.template_used(model, data),
                        stop_token_ids=stop_ids(model, self.stop_at_eos)),
            info=dict(outputs=[o if isinstance(o, str) else list(o) for o in outputs]))
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


def niah_accuracy(model, tests: list[NeedleTest], heads=(), max_new_tokens: int = 24, progress: bool = False,
                  desc: str = "NIAH", batch_size: int = 3, stop_at_eos: bool = False,
                  **generate_kw) -> tuple[float, list[float], list]:
    """Mean ROUGE-1 recall over ``tests`` with ``heads`` made uniform while decoding; decoding stops as
    ``stop_ids(model, stop_at_eos)`` says (default: the newline token only, as the reference's
    ``needle_in_haystack_with_mask.py``)."""
    edits = _ablations(heads) if heads else ()
    stop = stop_ids(model, stop_at_eos)
    rec, outs = [0.0] * len(tests), [None] * len(tests)
    bar = tqdm(total=len(tests), desc=desc, disable=not progress)
    for idx in batches(tests, batch_size, key=lambda t: t.prompt.numel()):
        got = decode(model, [tests[i].prompt for i in idx], max_new_tokens, stop_ids=stop, edits=edits,
                     **generate_kw)
        for i, (new, _) in zip(idx, got):
            outs[i] = output_text(model, new, tests[i].answer)
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
    an.check_tests(model, tests)
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
    gk = dict(an.generate_kwargs or {})

    def accuracy(heads, desc):
        return niah_accuracy(model, tests, heads, an.max_new_tokens, progress, desc, an.batch_size,
                             stop_at_eos=an.stop_at_eos, **gk)

    base, base_r, base_o = baseline if baseline is not None else accuracy((), "NIAH no mask")
    topk, top_r, top_o = accuracy(top, f"NIAH top-{k} masked")
    rand = [accuracy(d, f"NIAH random-{k} #{j}") for j, d in enumerate(draws)]
    rand_acc = [r[0] for r in rand]
    mean = statistics.fmean(rand_acc) if rand_acc else float("nan")
    sd = statistics.stdev(rand_acc) if len(rand_acc) > 1 else 0.0                  # sample std (n - 1)
    return {"k": k, "n_tests": len(tests), "baseline": base, "top_k": topk, "random": rand_acc,
            "random_mean": mean, "random_std": sd, "top_heads": top, "random_heads": draws,
            "excluded_from_random": n_ex, "baseline_recall": base_r, "top_k_recall": top_r,
            "random_recall": [r[1] for r in rand], "outputs": {"baseline": base_o, "top_k": top_o},
            "baseline_run": (base, base_r, base_o),
            "masked_during": "decoding only (prefill of prompt[:-1] unedited)"}
