"""A small mixed corpus (prose, reasoning, code, lists) for data-selection experiments such as
AttentionInfluence (Hua et al. 2025, §4 analyses what kinds of text the selection prefers).

Every text comes from data on this machine with a known source (``interventions/data/SOURCES.md``):
- prose: paragraphs of *Pride and Prejudice* and *Moby-Dick* (``heads/data/natural_text.txt``);
- code: function sources from CPython's standard library of the running interpreter (PSF licence),
  read with ``inspect.getsource``;
- reasoning: worked arithmetic word problems, step by step, generated from templates written for
  headscope (numbers drawn with the seed), plus ``heads/data/reasoning_prompts.txt``;
- lists: bulleted, alphabetical lists of words from the shipped VADER lexicon subset.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from pathlib import Path

KINDS = ("prose", "reasoning", "code", "lists")
_HEADS_DATA = Path(__file__).parent.parent / "heads" / "data"
_CODE_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "shlex", "difflib", "calendar",
                 "string", "colorsys", "base64", "fnmatch", "posixpath", "json.encoder", "json.decoder",
                 "html", "ipaddress", "random", "functools", "copy", "csv", "glob", "gettext")


@dataclass(frozen=True)
class Text:
    """One corpus text. Fields: kind "prose", "code", "reasoning" or "lists"; source where the text
    comes from (file, module or generator); text the text itself."""
    kind: str
    source: str
    text: str


def _prose(n, rng):
    paras = [p.strip().replace("\n", " ") for p in (_HEADS_DATA / "natural_text.txt").read_text(
        encoding="utf-8").split("\n\n")]
    paras = [p for p in paras if 300 <= len(p) <= 1500]
    rng.shuffle(paras)
    return [Text("prose", "heads/data/natural_text.txt (Austen, Melville)", p) for p in paras[:n]]


def _code(n, rng):
    import importlib
    import sys
    out = []
    for name in _CODE_MODULES:
        mod = importlib.import_module(name)
        for fname, obj in sorted(vars(mod).items()):
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                try:
                    src = inspect.getsource(obj)
                except (OSError, TypeError):
                    continue
                if 300 <= len(src) <= 1500:
                    out.append(Text("code", f"CPython {sys.version.split()[0]} stdlib {name}.{fname}", src))
    rng.shuffle(out)
    return out[:n]


_PROBLEMS = [
    ("A shop sells {item}s at {a} dollars each. {name} buys {b} {item}s and pays with a {c} dollar note. "
     "How much change does {name} get?",
     lambda a, b, c: [f"First, {b} {{item}}s cost {b} x {a} = {a * b} dollars.",
                      f"Then the change is {c} - {a * b} = {c - a * b} dollars."], lambda a, b, c: c - a * b),
    ("{name} reads {a} pages a day for {b} days, then {c} more pages on the last day. How many pages "
     "does {name} read in total?",
     lambda a, b, c: [f"In {b} days {{name}} reads {a} x {b} = {a * b} pages.",
                      f"Adding the last day gives {a * b} + {c} = {a * b + c} pages."], lambda a, b, c: a * b + c),
    ("A tank holds {c} litres. It loses {a} litres every hour for {b} hours. How much water is left?",
     lambda a, b, c: [f"In {b} hours the tank loses {a} x {b} = {a * b} litres.",
                      f"So {c} - {a * b} = {c - a * b} litres are left."], lambda a, b, c: c - a * b),
    ("{name} has {c} marbles and shares them equally among {b} friends, keeping the {a} left over. "
     "How many marbles does each friend get?",
     lambda a, b, c: [f"Take away the {a} marbles {{name}} keeps: {c} - {a} = {c - a}.",
                      f"Dividing by {b} friends gives {c - a} / {b} = {(c - a) // b} each."],
     lambda a, b, c: (c - a) // b),
]
_NAMES = ("Tom", "Ana", "Ravi", "Mei", "Lena", "Omar", "Sara", "Jon")
_ITEMS = ("pencil", "notebook", "apple", "ticket", "candle")


def _reasoning(n, rng):
    out = []
    for line in (_HEADS_DATA / "reasoning_prompts.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(Text("reasoning", "heads/data/reasoning_prompts.txt", line.strip()))
    while len(out) < n:
        q, steps, ans = rng.choice(_PROBLEMS)
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b + rng.randint(a, 60) if "marbles" not in q else b * rng.randint(3, 12) + a
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        body = [q.format(a=a, b=b, c=c, name=name, item=item), "Let's think step by step."]
        body += [s.format(name=name, item=item) for s in steps(a, b, c)]
        body.append(f"The answer is {ans(a, b, c)}.")
        out.append(Text("reasoning", "templated worked arithmetic (interventions/corpus.py)", "\n".join(body)))
    rng.shuffle(out)
    return out[:n]


def _lists(n, rng):
    from .tasks import sentiment_words
    words = sorted(w for w, _ in sentiment_words())
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(words) - 40)
        chunk = words[start:start + rng.randint(20, 40)]
        out.append(Text("lists", "interventions/data/sentiment_words.tsv (VADER)",
                        "\n".join(f"- {w}" for w in chunk)))
    return out


def mixed_corpus(n_per_kind: int = 40, seed: int = 0) -> list[Text]:
    """``n_per_kind`` texts of each kind in ``KINDS``, shuffled with ``seed``."""
    rng = random.Random(f"corpus-{seed}")
    texts = _prose(n_per_kind, rng) + _reasoning(n_per_kind, rng) + _code(n_per_kind, rng) + _lists(n_per_kind, rng)
    counts = {k: sum(t.kind == k for t in texts) for k in KINDS}
    if min(counts.values()) < n_per_kind:
        raise ValueError(f"not enough texts of every kind for n_per_kind={n_per_kind}: {counts}")
    rng.shuffle(texts)
    return texts


def composition(kinds: list[str], ranking: list[int], frac: float = 0.2) -> dict:
    """Share of each kind in the top and bottom ``frac`` of ``ranking`` (indices into ``kinds``),
    and in the whole corpus."""
    n = max(1, round(frac * len(ranking)))
    top, bottom = ranking[:n], ranking[-n:]
    share = lambda idx: {k: sum(kinds[i] == k for i in idx) / len(idx) for k in sorted(set(kinds))}
    return {"top": share(top), "bottom": share(bottom), "all": share(range(len(kinds))), "n": n}
