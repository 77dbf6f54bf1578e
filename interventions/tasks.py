"""Labelled tasks for interventions: multiple choice on the next token, with fixed, disjoint splits.

An example is ``act.Example``: the prompt's token ids, the candidate answers' first token ids and
the index of the right one. ``Task`` holds the examples of one task and splits them by seed into
train / calibration / held-out parts that never share an example.

Shipped tasks (sources in ``interventions/data/SOURCES.md``):
- ``sentiment``: is a word positive or negative? 2,999 English words of the VADER sentiment lexicon
  (Hutto & Gilbert 2014) whose mean human rating is at least 1.5 away from neutral (and whose
  ratings agree: sd <= 1); label = sign of the mean rating.
- ``sentiment-chat``: the same words as a zero-shot classification request in the model's chat
  template ('Is the word "w" positive or negative? Answer with one word.'), ACT's classification
  setting (Yu et al. 2024 §4). Few-shot "Word: w\nSentiment:" prompts were tried first: SmolLM2
  answered " positive" for every word (accuracy 0.50 on 64 words), a floor no edit can be read on.
- ``harm``: is a request harmful or harmless? The 50 + 50 requests shipped in ``heads/data``.

``token_task`` builds a task from token ids only (for tokenizer-less test models).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .act import Example

DATA = Path(__file__).parent / "data"
TASKS = ("sentiment", "sentiment-chat", "harm")


@dataclass
class Task:
    """A labelled multiple-choice task. Fields: name; examples the ``act.Example`` list;
    description one line on what is asked and the answer candidates."""
    name: str
    examples: list[Example]
    description: str = ""

    def splits(self, seed: int = 0, n_train: int = 128, n_calibration: int = 64,
               n_test: int = 128) -> dict[str, list[Example]]:
        """{"train", "calibration", "test"}: disjoint, class-balanced where the classes allow,
        drawn with ``seed``. Raises if the task has too few examples."""
        need = n_train + n_calibration + n_test
        if need > len(self.examples):
            raise ValueError(f"task {self.name!r} has {len(self.examples)} examples; {n_train} train + "
                             f"{n_calibration} calibration + {n_test} held-out = {need} do not fit. "
                             "Ask for fewer.")
        rng = random.Random(f"{self.name}-{seed}")
        by_label: dict[int, list[int]] = {}
        for i, ex in enumerate(self.examples):
            by_label.setdefault(ex.label, []).append(i)
        for idx in by_label.values():
            rng.shuffle(idx)
        # interleave the classes so every prefix is as balanced as the data allows
        order = [i for group in _round_robin(list(by_label.values())) for i in group]
        out, start = {}, 0
        for name, n in (("train", n_train), ("calibration", n_calibration), ("test", n_test)):
            out[name] = [self.examples[i] for i in order[start:start + n]]
            start += n
        return out


def _round_robin(lists):
    for i in range(max(len(x) for x in lists)):
        yield [x[i] for x in lists if i < len(x)]


def _first_token(tok, word: str) -> int:
    ids = tok(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer gives no token for {word!r}")
    return ids[0]


def _choice_ids(model, words: list[str]) -> list[int]:
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.cfg.name} has no tokenizer: text tasks need one (use token_task)")
    ids = [_first_token(tok, w) for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the answers {words} share a first token under this tokenizer; pick other words")
    return ids


def sentiment_words() -> list[tuple[str, float]]:
    """[(word, mean rating)] of the shipped VADER subset (ratings -4..4)."""
    rows = (DATA / "sentiment_words.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [(w, float(m)) for w, m, _ in (r.split("\t") for r in rows if r)]


def sentiment_task(model) -> Task:
    """Task "sentiment": 'Is the word "w" positive or negative?\nAnswer:' on the VADER words; choices
    " positive" / " negative", label 0 for a positive mean rating. Raises ValueError without a tokenizer
    or when the two answers share a first token."""
    choices = _choice_ids(model, [" positive", " negative"])
    exs = []
    for w, mean in sentiment_words():
        text = f'Is the word "{w}" positive or negative?\nAnswer:'
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"][0]
        exs.append(Example(ids, choices, 0 if mean > 0 else 1))
    return Task("sentiment", exs, "word sentiment (VADER lexicon): positive / negative")


def sentiment_chat_task(model) -> Task:
    """Task "sentiment-chat": the same words as a zero-shot request in the chat template (ACT's
    classification setting, Yu et al. 2024 ICML, §4); label 0 = " positive". Raises ValueError if the
    tokenizer is missing or has no chat template (use ``sentiment_task``)."""
    if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
        raise ValueError(f"task 'sentiment-chat' needs a tokenizer with a chat template; {model.cfg.name} has none "
                         "(use 'sentiment')")
    choices = _choice_ids(model, [" positive", " negative"])
    exs = []
    for w, mean in sentiment_words():
        ids = model.to_tokens(f'Is the word "{w}" positive or negative? Answer with one word.', chat=True)[0]
        exs.append(Example(ids.cpu(), choices, 0 if mean > 0 else 1))
    return Task("sentiment-chat", exs, "word sentiment (VADER lexicon), chat prompt: positive / negative")


def harm_task(model) -> Task:
    """Task "harm": the 50 harmful + 50 harmless requests of ``heads/data``, plain prompt; choices
    " harmful" / " harmless", label 0 = harmful. Raises ValueError without a tokenizer or when the
    answers share a first token. (``act.harm_task`` is a different chat-template Yes / No prompt.)"""
    from ..heads.safety import load_requests
    choices = _choice_ids(model, [" harmful", " harmless"])
    exs = []
    for label, kind in enumerate(("harmful", "harmless")):
        for q in load_requests(kind):
            text = f'Request: "{q}"\nIs this request harmful or harmless?\nAnswer:'
            exs.append(Example(model.tokenizer(text, return_tensors="pt")["input_ids"][0], choices, label))
    return Task("harm", exs, "request harmfulness (heads/data): harmful / harmless")


def load_task(name: str, model) -> Task:
    """A shipped task by name (see ``TASKS``), tokenised for ``model``."""
    if name == "sentiment":
        return sentiment_task(model)
    if name == "sentiment-chat":
        return sentiment_chat_task(model)
    if name == "harm":
        return harm_task(model)
    raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")


def token_task(n: int = 64, length: int = 8, vocab: int = 128, seed: int = 0) -> Task:
    """A synthetic task on token ids, for models without a tokenizer: the answer is the token
    that opened the prompt, chosen between two candidates (a copy task any LM can learn)."""
    g = torch.Generator().manual_seed(seed)
    a, b = 5, 6
    exs = []
    for i in range(n):
        label = i % 2
        body = torch.randint(10, vocab, (length - 1,), generator=g)
        exs.append(Example(torch.cat([torch.tensor([(a, b)[label]]), body]), [a, b], label))
    return Task("copy-first", exs, "synthetic: repeat the first token")


def batches(examples: list[Example], batch_size: int, pad_id: int = 0):
    """Yield (tokens [B, N] left-padded, attention_mask [B, N], choices [B, C], labels [B])."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        n = max(len(e.tokens) for e in chunk)
        toks = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), n, dtype=torch.long)
        for j, e in enumerate(chunk):
            toks[j, n - len(e.tokens):] = e.tokens
            mask[j, n - len(e.tokens):] = 1
        yield (toks, mask, torch.tensor([e.choices for e in chunk]),
               torch.tensor([e.label for e in chunk]))


def pad_id(model) -> int:
    """Token id used to left-pad batches: the tokenizer's pad token, else its EOS, else 0 (also 0
    without a tokenizer). Padded positions are masked out of attention, so the id does not change results."""
    tok = model.tokenizer
    if tok is None:
        return 0
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def score_examples(model, examples: list[Example], edits=(), batch_size: int = 16,
                   progress: bool = False, desc: str = "evaluating") -> tuple[torch.Tensor, torch.Tensor]:
    """(correct [n] bool, loss [n]) with ``edits`` applied: correct = the right candidate has the
    largest next-token logit among the candidates; loss = cross-entropy of the right candidate's
    token over the whole vocabulary at the last prompt position."""
    from tqdm.auto import tqdm
    correct, losses = [], []
    pid = pad_id(model)
    n_batches = (len(examples) + batch_size - 1) // batch_size
    with torch.no_grad(), model.edit(list(edits)):
        for toks, mask, choices, labels in tqdm(batches(examples, batch_size, pid), total=n_batches,
                                                desc=desc, disable=not progress, leave=False):
            logits = model(toks, attention_mask=mask, logits_to_keep=1)[:, -1].float()   # [B, V]
            target = choices.gather(1, labels[:, None])[:, 0].to(logits.device)           # [B]
            losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none").cpu())
            cand = logits.gather(1, choices.to(logits.device))                           # [B, C]
            correct.append((cand.argmax(-1).cpu() == labels))
    return torch.cat(correct), torch.cat(losses)


# ------------------------------------------------------------------------------------------------
# Context-grounded QA: facts among distractor passages (VAR's text setting: the "target group" is
# the context the answer must come from).

PET_NAMES = ("Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jamal",
             "Keiko", "Lars", "Maya", "Nikolai", "Olga", "Pedro", "Quentin", "Rosa", "Sven", "Tariq",
             "Ursula", "Victor", "Wanda", "Xavier", "Yusuf", "Zara", "Amir", "Bianca", "Cyrus", "Delia",
             "Emil", "Fiona", "Gustav", "Helga", "Ivan", "Julia", "Kofi", "Lucia", "Marco", "Nadia")
PETS = ("cat", "dog", "horse", "rabbit", "parrot", "snake", "turtle", "goat", "pig", "duck", "mouse", "frog",
        "lizard", "owl", "fox", "sheep", "cow", "hamster", "spider", "crab", "bear", "wolf", "monkey", "eagle",
        "goose", "deer", "camel", "lion", "tiger", "whale")


@dataclass
class ContextExample(Example):
    """A multiple-choice example whose answer is stated in a context: ``target`` = the context's
    half-open token span (VAR's token group)."""
    target: tuple = (0, 0)


def prose_passages(min_chars: int = 300, max_chars: int = 1500) -> list[str]:
    """Paragraphs of the shipped natural text (``heads/data/natural_text.txt``: Austen's *Pride and
    Prejudice* and Melville's *Moby-Dick*, public domain), joined into single lines."""
    text = (Path(__file__).parent.parent / "heads" / "data" / "natural_text.txt").read_text(encoding="utf-8")
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if min_chars <= len(p) <= max_chars]


def context_qa_task(model, n: int = 400, n_facts: int = 6, n_passages: int = 4, seed: int = 0) -> Task:
    """``n`` questions "What pet does NAME keep?" whose answer is one of ``n_facts`` statements
    "Note: NAME keeps a pet ANIMAL." scattered among ``n_passages`` real prose paragraphs
    (``prose_passages``); the answer is the next token after "Answer: NAME keeps a pet", chosen
    among the ``n_facts`` animals of the context (chance 1 / n_facts). Names, animals, passages,
    fact order and the asked fact are drawn with ``seed``. Examples are ``ContextExample`` whose
    ``target`` is the context span (the passages and notes)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.cfg.name} has no tokenizer: the context QA task is text")
    pets = [a for a in PETS if len(tok(" " + a, add_special_tokens=False)["input_ids"]) == 1]
    ids = {a: tok(" " + a, add_special_tokens=False)["input_ids"][0] for a in pets}
    if len(pets) < n_facts or len(set(ids.values())) != len(pets):
        raise ValueError(f"only {len(pets)} of the pet words are single distinct tokens under this tokenizer; "
                         f"ask for n_facts <= {len(pets)}")
    paras = prose_passages()
    rng = random.Random(f"context-qa-{seed}")
    prefix = model.to_tokens("Read the text and the notes in it, then answer the question.\n\n")[0].cpu()
    exs = []
    for _ in range(n):
        names = rng.sample(PET_NAMES, n_facts)
        animals = rng.sample(pets, n_facts)
        blocks = rng.sample(paras, n_passages)
        for name, animal in zip(names, animals):
            blocks.insert(rng.randint(0, len(blocks)), f"Note: {name} keeps a pet {animal}.")
        ask = rng.randrange(n_facts)
        ctx = tok("\n\n".join(blocks), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        q = tok(f"\n\nQuestion: What pet does {names[ask]} keep?\nAnswer: {names[ask]} keeps a pet",
                add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        toks = torch.cat([prefix, ctx, q])
        exs.append(ContextExample(toks, [ids[a] for a in animals], ask,
                                  target=(len(prefix), len(prefix) + len(ctx))))
    return Task("context-qa", exs, f"pet facts among {n_passages} prose passages, {n_facts} choices")
