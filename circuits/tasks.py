"""Circuit tasks: clean / corrupted prompt pairs of equal token length and a metric at the last
position, built for any tokenizer.

- IOI (Wang et al. 2022, "Interpretability in the Wild", §2): "When Mary and John went to the store,
  John gave a drink to" -> " Mary". ABBA and BABA orders; corrupted prompts replace all three names by
  other names ("ABC" distribution, §3.1); metric = logit(IO) - logit(S) at the last position.
- Greater-than (Hanna et al. 2023, "How does GPT-2 compute greater-than?", §2): "The war lasted from
  the year 17YY to the year 17"; corrupted YY = 01; metric = probability mass on years > YY minus
  mass on years <= YY. Tokenizers that have every two-digit number as one token get the paper's
  metric over "00".."99"; tokenizers that split digits (SmolLM2, Gemma-3) predict the tens digit
  first, so there the metric is P(tens digit > Y_tens) - P(tens digit < Y_tens) (equal tens digits,
  which need the next token to decide, are left out) and YY is drawn with Y_tens in 2..8.
- Colored Objects (Merullo et al. 2023, "Circuit Component Reuse Across Tasks", §2.2; their data
  generator ``cobjs_data.py``, from BIG-bench's reasoning_about_colored_objects): one solved example,
  then the question, answers capitalised as in their data:
  "Q: On the desk, I see an orange cup, a red pen, and a purple mug. What color is the cup?\\nA: Orange\\n
  Q: On the table, there is a blue ball, a black bowl, and a yellow plate. What color is the bowl?\\nA:"
  -> " Black". Their 8 simple colors, 3 objects; the example uses colors and objects the question does
  not. Corrupted prompt (their "mindiff" set): the same prompt asking about another listed object;
  wrong answer = that object's color. Accuracy: the answer beats the other two listed colors.

Names, places, objects and colors are kept only if they are ONE token (with their leading space) for
the given tokenizer, so every answer / wrong answer is one token and a clean prompt and its corrupted
partner have the same length; all prompts of a task have one length (templates are grouped by
length), so positions line up across the batch (mean ablation "at the same position"). Seeded.

Tokens follow TransformerLens' ``to_tokens`` (and headscope's ``model.to_tokens``): with
``prepend_bos=True`` (the default, TransformerLens' argument name) every prompt starts with exactly one
BOS, whether or not the tokenizer adds one by itself (``probe.tl_idioms.tokens_with_bos``: SmolLM2's
and Qwen2's tokenizers add none, Llama's and Gemma's do); ``prepend_bos=False`` gives no BOS. So
``task.clean[i]`` is ``model.to_tokens(task.texts[i])[0]``, and a TransformerLens user who re-runs a
shipped task scores the same sequences. Before 2026-12-03 the tasks used the tokenizer's own special
tokens: those sequences are ``prepend_bos=False`` on tokenizers that add no BOS (SmolLM2, Qwen2) and
the default on tokenizers that add one (Llama, Gemma). With the BOS every position moves one to the
right (the answers are read at the last position, which stays the last); prompts given as token ids
to ``Task.from_prompts`` are used as given.

``Task.evaluate(model)`` reports the clean accuracy and metric first; ``Task.check(model)`` raises
``TaskNotSolved`` when the model cannot do the task, and the circuit methods call it before analysing.
Accuracy and chance: with ``choices`` (the candidate answers of each prompt, e.g. the three listed
colors) a prompt counts as right when its answer has the highest logit among them, and chance is
1/len(choices); without, when the metric is > 0 (answer vs wrong answer), and chance is 1/2.
"Solved" means: accuracy >= chance + 0.1, accuracy above chance with a one-sided binomial p < 0.01
(at n = 40 and chance 1/2 that is >= 28 right; at chance 1/3, >= 21), and the clean metric above the
corrupted one.
"""
from __future__ import annotations

import math

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..probe.tl_idioms import tokens_with_bos

NAMES = ["Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Kate", "Anna", "Lisa", "Paul", "Mark",
         "Sarah", "David", "Michael", "Emma", "Jack", "Alice", "Bob", "Peter", "Laura", "Rachel", "Steve", "Chris",
         "Jane", "Paula", "George", "Frank", "Helen", "Adam", "Ben", "Luke", "Sam", "Max", "Kevin", "Joe", "Tim",
         "Lucy", "Grace", "Henry", "Jessica", "Daniel", "Robert", "Richard", "Thomas", "Charles", "Andrew"]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "beach",
          "market", "library", "church", "bank", "cafe"]
OBJECTS = ["drink", "ring", "kiss", "bone", "basketball", "computer", "necklace", "apple", "book", "ball",
           "letter", "gift", "flower", "key", "snack"]
IOI_TEMPLATES = [
    "Then, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "After {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "Friends {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to",
    "When {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument, and afterwards {B} said to",
    "After the lunch, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to",
]
NOUNS = ["war", "expedition", "drought", "campaign", "conflict", "reign", "famine", "voyage", "siege", "revolt"]


class TaskNotSolved(RuntimeError):
    """The model does not do the task; its circuit is not analysed."""


@dataclass
class Task:
    """Clean / corrupted token pairs and the metric.

    clean, corrupt: [batch, pos] token ids (same shape, no padding);
    answer, wrong: [batch, n] token ids (n >= 1; -1 pads a row);
    kind: "logit_diff" (mean answer logit - mean wrong logit) or "prob_diff" (answer mass - wrong mass).
    The metric is read at the last position and averaged over the batch.
    """

    name: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    kind: str = "logit_diff"
    texts: list = field(default_factory=list)
    corrupt_texts: list = field(default_factory=list)
    paper: str = ""
    report: dict | None = None          # filled by evaluate()
    choices: torch.Tensor | None = None  # [batch, k] candidate answer ids incl. the answer (-1 pads), or None
    prepend_bos: bool | None = None      # how text prompts were tokenized (module docstring); None: ids given

    def __post_init__(self):
        if self.clean.shape != self.corrupt.shape or self.clean.dim() != 2:
            raise ValueError(f"clean {tuple(self.clean.shape)} and corrupt {tuple(self.corrupt.shape)} must be "
                             "[batch, pos] of one shape (pairs of equal token length)")
        for nm in ("answer", "wrong"):
            t = getattr(self, nm)
            t = t[:, None] if t.dim() == 1 else t
            setattr(self, nm, t.long())
            if t.shape[0] != self.clean.shape[0]:
                raise ValueError(f"{nm} has {t.shape[0]} rows for {self.clean.shape[0]} prompts")
        if self.choices is not None:
            self.choices = self.choices.long()
            if self.choices.dim() != 2 or self.choices.shape[0] != self.clean.shape[0]:
                raise ValueError(f"choices must be [batch, k] for {self.clean.shape[0]} prompts, not "
                                 f"{tuple(self.choices.shape)}")
            if not bool((self.choices == self.answer[:, :1]).any(1).all()):
                raise ValueError("every row of choices must contain that prompt's answer")
        if self.kind not in ("logit_diff", "prob_diff"):
            raise ValueError(f"kind must be 'logit_diff' or 'prob_diff', not {self.kind!r}")

    def __len__(self):
        return self.clean.shape[0]

    def subset(self, idx) -> "Task":
        """The task restricted to the examples at indices ``idx`` (a list or 1-D tensor of ints)."""
        idx = torch.as_tensor(idx)
        return Task(self.name, self.clean[idx], self.corrupt[idx], self.answer[idx], self.wrong[idx], self.kind,
                    [self.texts[i] for i in idx.tolist()] if self.texts else [],
                    [self.corrupt_texts[i] for i in idx.tolist()] if self.corrupt_texts else [], self.paper,
                    choices=None if self.choices is None else self.choices[idx], prepend_bos=self.prepend_bos)

    # ------------------------------------------------------------------ metric
    def per_example(self, logits: torch.Tensor, rows=None) -> torch.Tensor:
        """logits [batch, pos, vocab] or [batch, vocab] (last position) -> metric per example [batch].
        ``rows``: which of the task's examples these logits belong to (default: all)."""
        last = logits[:, -1] if logits.dim() == 3 else logits                    # [B, V]
        ans, wr = (self.answer, self.wrong) if rows is None else (self.answer[rows], self.wrong[rows])
        ans, wr = ans.to(last.device), wr.to(last.device)
        if self.kind == "prob_diff":
            last = last.float().softmax(-1)

        def pick(ids):
            m = (ids >= 0).to(last.dtype)                                        # [B, n]
            v = last.gather(1, ids.clamp_min(0)) * m
            return v.sum(1) if self.kind == "prob_diff" else v.sum(1) / m.sum(1)
        return pick(ans) - pick(wr)

    def metric(self, logits: torch.Tensor, rows=None) -> torch.Tensor:
        """The task metric averaged over the examples (scalar): mean of ``per_example``."""
        return self.per_example(logits, rows).mean()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 32) -> dict:
        """Clean accuracy, chance, the binomial p-value of the accuracy against chance, and the mean
        metric on clean and corrupted prompts (see the module docstring for the "solved" rule); stored
        in ``self.report``."""
        logits = torch.cat([_last_logits(model, self.clean[i:i + batch_size]) for i in range(0, len(self), batch_size)])
        clean = self.per_example(logits)
        corr = torch.cat([self.per_example(_last_logits(model, self.corrupt[i:i + batch_size]), slice(i, i + batch_size))
                          for i in range(0, len(self), batch_size)])
        right, chance = self.correct(logits)
        acc = float(right.float().mean())
        k = int(right.sum())
        p = binomial_tail(k, len(self), chance)
        solved = acc >= chance + SOLVED_MARGIN and p < SOLVED_P and float(clean.mean()) > float(corr.mean())
        self.report = {"task": self.name, "model": model.cfg.name, "n": len(self), "metric": self.kind,
                       "prepend_bos": self.prepend_bos,
                       "clean_metric": float(clean.mean()), "corrupt_metric": float(corr.mean()),
                       "clean_accuracy": acc, "chance": chance, "p_value": p, "solved": solved,
                       "solved_rule": f"accuracy >= chance + {SOLVED_MARGIN}, binomial p < {SOLVED_P}, "
                                      "clean metric > corrupted metric"}
        return self.report

    def correct(self, logits: torch.Tensor):
        """(right [batch] bool, chance): with ``choices``, the answer's logit is the highest among them
        (chance = mean 1/k); otherwise the metric is > 0 (chance 1/2)."""
        last = logits[:, -1] if logits.dim() == 3 else logits                    # [B, V]
        if self.choices is None:
            return self.per_example(last) > 0, 0.5
        ch = self.choices.to(last.device)
        valid = ch >= 0
        vals = last.gather(1, ch.clamp_min(0)).masked_fill(~valid, float("-inf"))   # [B, k]
        ans = last.gather(1, self.answer[:, :1].to(last.device))[:, 0]              # [B]
        right = ans >= vals.max(1).values
        return right, float((1.0 / valid.sum(1).float()).mean())

    def check(self, model) -> dict:
        """``evaluate`` (once) and raise ``TaskNotSolved`` if the model cannot do the task."""
        r = self.report if self.report and self.report.get("model") == model.cfg.name else self.evaluate(model)
        if not r["solved"]:
            raise TaskNotSolved(
                f"{model.cfg.name} does not do {self.name}: clean accuracy {r['clean_accuracy']:.2f}, clean "
                f"{self.kind} {r['clean_metric']:.3f} vs corrupted {r['corrupt_metric']:.3f}; its circuit is "
                "not analysed (pass check=False to analyse anyway)")
        return r

    @classmethod
    def from_prompts(cls, model, clean, corrupt, answer, wrong, name: str = "custom",
                     kind: str = "logit_diff", prepend_bos: bool = True) -> "Task":
        """A user's own task: lists of clean and corrupted prompts (strings or token-id lists), the
        answer and wrong answer per prompt (strings of ONE token each, with their leading space, or
        ids). Every pair must tokenize to the same length, and all prompts to one length.
        String prompts are tokenized as ``model.to_tokens(text, prepend_bos=prepend_bos)``
        (TransformerLens' rule: exactly one BOS by default); token-id prompts are used as given."""
        tok = model.tokenizer
        clean_ids = [_ids(tok, c, prepend_bos) for c in clean]
        corr_ids = [_ids(tok, c, prepend_bos) for c in corrupt]
        if len(clean_ids) != len(corr_ids) or not clean_ids:
            raise ValueError(f"{len(clean_ids)} clean and {len(corr_ids)} corrupted prompts: give equally many (>0)")
        lens = {len(c) for c in clean_ids} | {len(c) for c in corr_ids}
        if len(lens) != 1:
            bad = [i for i, (a, b) in enumerate(zip(clean_ids, corr_ids)) if len(a) != len(b)]
            raise ValueError(f"prompts tokenize to lengths {sorted(lens)}; every clean/corrupted prompt must have "
                             f"the same token length (unequal pairs: {bad[:5]})")

        def one(a):
            if isinstance(a, int):
                return [a]
            if isinstance(a, (list, tuple)) and all(isinstance(x, int) for x in a):
                return list(a)
            ids = tok.encode(a, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"answer {a!r} is {len(ids)} tokens for {model.cfg.name}'s tokenizer; answers "
                                 "must be one token (mind the leading space)")
            return ids
        ans = _pad([one(a) for a in answer])
        wr = _pad([one(w) for w in wrong])
        texts = any(isinstance(c, str) for c in list(clean) + list(corrupt))
        return cls(name, torch.tensor(clean_ids), torch.tensor(corr_ids), ans, wr, kind,
                   [c if isinstance(c, str) else "" for c in clean], [c if isinstance(c, str) else "" for c in corrupt],
                   prepend_bos=prepend_bos if texts else None)


# ---------------------------------------------------------------------- helpers
SOLVED_MARGIN = 0.1      # accuracy must exceed chance by this much ...
SOLVED_P = 0.01          # ... and be above chance with a one-sided binomial p-value below this


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k right out of n against chance p."""
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def _last_logits(model, toks):
    try:
        return model(toks, logits_to_keep=1)[:, -1]
    except TypeError:
        return model(toks)[:, -1]


def _ids(tok, text, prepend_bos: bool) -> list[int]:
    """One prompt's token ids as ``model.to_tokens(text, prepend_bos)`` gives them (TransformerLens'
    rule: one BOS first, also on tokenizers that add none, never two); token ids are used as given."""
    if not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True or False, not {prepend_bos!r}")
    if not isinstance(text, str):
        return list(text)
    if tok is None:
        raise ValueError("this model has no tokenizer: give the prompts as token ids")
    return tokens_with_bos(tok, text, prepend_bos=prepend_bos)["input_ids"][0].tolist()


def _pad(rows):
    n = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (n - len(r)) for r in rows])


def single_tokens(tok, words, space: bool = True) -> list[str]:
    """The words that are one token for ``tok`` (with a leading space when ``space``)."""
    return [w for w in words if len(tok.encode((" " if space else "") + w, add_special_tokens=False)) == 1]


def _need(words, n, what, tok):
    if len(words) < n:
        raise ValueError(f"only {len(words)} {what} are single tokens for this tokenizer ({type(tok).__name__}); "
                         f"the task needs {n}")
    return words


def _build(model, name, rows, kind, paper, n, prepend_bos):
    """rows: (clean text, corrupt text, answer ids, wrong ids[, choice ids]); keep the most common token
    length."""
    tok = model.tokenizer
    pairs = [((_ids(tok, r[0], prepend_bos), _ids(tok, r[1], prepend_bos)) + tuple(r[2:]), r) for r in rows]
    pairs = [(e, r) for e, r in pairs if len(e[0]) == len(e[1])]             # equal-length clean/corrupt pairs
    length = Counter(len(e[0]) for e, _ in pairs).most_common(1)[0][0]
    keep = [(e, r) for e, r in pairs if len(e[0]) == length][:n]
    if len(keep) < n:
        raise ValueError(f"{name}: only {len(keep)} prompts of one token length for this tokenizer (asked {n})")
    choices = _pad([e[4] for e, _ in keep]) if len(keep[0][0]) > 4 else None
    return Task(name, torch.tensor([e[0] for e, _ in keep]), torch.tensor([e[1] for e, _ in keep]),
                _pad([e[2] for e, _ in keep]), _pad([e[3] for e, _ in keep]), kind,
                [r[0] for _, r in keep], [r[1] for _, r in keep], paper, choices=choices, prepend_bos=prepend_bos)


def _tid(tok, word):
    return tok.encode(" " + word, add_special_tokens=False)[0]


# ---------------------------------------------------------------------- the tasks
def ioi(model, n: int = 40, seed: int = 0, templates=None, prepend_bos: bool = True) -> Task:
    """Indirect object identification (Wang et al. 2022, §2): half ABBA, half BABA; ABC corruption
    (§3.1); metric logit(IO) - logit(S). ``prepend_bos``: one BOS first, as ``model.to_tokens``
    (module docstring)."""
    tok = model.tokenizer
    rng = random.Random(seed)
    names = _need(single_tokens(tok, NAMES), 5, "names", tok)
    places = _need(single_tokens(tok, PLACES), 1, "places", tok)
    objects = _need(single_tokens(tok, OBJECTS), 1, "objects", tok)
    templates = templates or IOI_TEMPLATES
    # group templates by token length (names/places/objects are single tokens, so the template fixes it)
    probe = {t: len(_ids(tok, t.format(A=names[0], B=names[1], PLACE=places[0], OBJECT=objects[0]), prepend_bos))
             for t in templates}
    length = Counter(probe.values()).most_common(1)[0][0]
    templates = [t for t in templates if probe[t] == length]
    rows = []
    for i in range(n * 2):
        t = rng.choice(templates)
        a, b, c, d, e = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        first, second = (a, b) if i % 2 == 0 else (b, a)              # ABBA / BABA
        clean = _fill_ioi(t, first, second, b, place, obj)
        corrupt = _fill_ioi(t, c, d, e, place, obj)
        rows.append((clean, corrupt, [_tid(tok, a)], [_tid(tok, b)]))
    return _build(model, "ioi", rows, "logit_diff", "Wang et al. 2022, Interpretability in the Wild (IOI)", n,
                  prepend_bos)


def _fill_ioi(t, first, second, subject, place, obj):
    """Template with names in order (first, second) and the repeated subject S."""
    s = t.replace("{A}", first, 1).replace("{B}", second, 1).replace("{B}", subject)
    return s.replace("{PLACE}", place).replace("{OBJECT}", obj)


def greater_than(model, n: int = 40, seed: int = 0, prepend_bos: bool = True) -> Task:
    """Greater-than (Hanna et al. 2023, §2): "The war lasted from the year 17YY to the year 17";
    corrupted YY = 01; metric = P(year > YY) - P(year <= YY) (see the module docstring for
    tokenizers that split digits, and for ``prepend_bos``)."""
    tok = model.tokenizer
    rng = random.Random(seed)
    nouns = _need(single_tokens(tok, NOUNS), 1, "nouns", tok)
    two = [f"{y:02d}" for y in range(100)]
    two_digit = all(len(tok.encode(y, add_special_tokens=False)) == 1 for y in two)
    digits = [tok.encode(str(d), add_special_tokens=False) for d in range(10)]
    if not two_digit and not all(len(d) == 1 for d in digits):
        raise ValueError("greater-than needs either every two-digit number or every digit to be one token")
    rows = []
    for _ in range(n * 2):
        noun = rng.choice(nouns)
        if two_digit:
            yy = rng.randint(2, 98)
            ids = [tok.encode(y, add_special_tokens=False)[0] for y in two]
            ans, wr = ids[yy + 1:], ids[:yy + 1]
        else:
            yy = rng.randint(20, 89)
            t = yy // 10
            ids = [d[0] for d in digits]
            ans, wr = ids[t + 1:], ids[:t]
        clean = f"The {noun} lasted from the year 17{yy:02d} to the year 17"
        corrupt = f"The {noun} lasted from the year 1701 to the year 17"
        rows.append((clean, corrupt, ans, wr))
    return _build(model, "greater-than", rows, "prob_diff", "Hanna et al. 2023, How does GPT-2 compute greater-than?",
                  n, prepend_bos)


CO_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "brown", "black"]
CO_OBJECTS = ["pencil", "notebook", "pen", "cup", "plate", "jug", "mug", "puzzle", "textbook", "leash", "necklace",
              "bracelet", "bottle", "ball", "envelope", "lighter", "bowl"]
CO_SURFACES = ["table", "desk", "floor"]
CO_STARTS = ["there is", "you see", "I see"]


def _co_question(surface, start, colors, objects, q):
    items = [f"a{'n' if c[0] in 'aeiou' else ''} {c} {o}" for c, o in zip(colors, objects)]
    return (f"Q: On the {surface}, {start} {', '.join(items[:-1])}, and {items[-1]}. "
            f"What color is the {objects[q]}?\nA:")


def colored_objects(model, n: int = 40, seed: int = 0, shots: int = 1, prepend_bos: bool = True) -> Task:
    """Colored Objects in the format of Merullo et al. 2023, §2.2 (see the module docstring): ``shots``
    solved examples (default 1, as in their data) before the question; answers " Red", " Blue", ...
    (capitalised, one token each); corrupted = the same prompt asking about another listed object,
    wrong = that object's color; ``choices`` = the three listed colors (chance 1/3); ``prepend_bos``
    as ``model.to_tokens``."""
    tok = model.tokenizer
    rng = random.Random(seed)
    caps = [c for c in CO_COLORS if len(tok.encode(" " + c.title(), add_special_tokens=False)) == 1]
    if shots < 0:
        raise ValueError(f"shots={shots}: must be >= 0")
    colors = _need(caps, 6 if shots else 3, "capitalised colors", tok)
    objects = _need(single_tokens(tok, CO_OBJECTS), 6 if shots else 3, "objects", tok)
    rows = []
    for _ in range(n * 2):
        c, o = rng.sample(colors, 3), rng.sample(objects, 3)               # the question
        rest_c, rest_o = [x for x in colors if x not in c], [x for x in objects if x not in o]
        prefix = ""
        for _s in range(shots):                 # solved examples: colors and objects the question does not use
            ec, eo, eq = rng.sample(rest_c, 3), rng.sample(rest_o, 3), rng.randrange(3)
            prefix += _co_question(rng.choice(CO_SURFACES), rng.choice(CO_STARTS), ec, eo, eq) + " " + ec[eq].title() + "\n"
        q = rng.randrange(3)
        other = rng.choice([i for i in range(3) if i != q])
        surface, start = rng.choice(CO_SURFACES), rng.choice(CO_STARTS)
        clean = prefix + _co_question(surface, start, c, o, q)
        corrupt = prefix + _co_question(surface, start, c, o, other)
        ids = [_tid(tok, x.title()) for x in c]
        rows.append((clean, corrupt, [ids[q]], [ids[other]], ids))
    return _build(model, "colored-objects", rows, "logit_diff",
                  "Merullo et al. 2023, Circuit Component Reuse Across Tasks (Colored Objects)", n, prepend_bos)


TASKS = {"ioi": ioi, "greater-than": greater_than, "colored-objects": colored_objects}


def make_task(name: str, model, n: int = 40, seed: int = 0, prepend_bos: bool = True) -> Task:
    """The shipped task ``name`` (one of ``TASKS``: "ioi", "greater-than", "colored-objects") built for
    ``model``'s tokenizer with ``n`` examples, tokenized as ``model.to_tokens(text, prepend_bos)``
    (module docstring); ValueError for an unknown name or a model without a tokenizer."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)} or build one with Task.from_prompts")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"{model.cfg.name} has no tokenizer, and the shipped tasks are text: load a model with "
                         "one (a GGUF or a local HF folder), or build the task with Task.from_prompts from token ids")
    return TASKS[name](model, n=n, seed=seed, prepend_bos=prepend_bos)
