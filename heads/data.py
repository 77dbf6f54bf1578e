"""The data shipped in ``heads/data`` and every loader of it (sources: heads/data/SOURCES.md).

* natural text (``natural_text_passages``, ``text_samples``): equal-length token samples for the
  statistics analyzers (sinks, classic detectors);
* the haystack and needles (``load_haystack``, ``load_needles``, ``repeated_tokens``,
  ``haystack_batch``): needle-in-a-haystack and long-context inputs (retrieval, streaming);
* harmful / harmless requests (``load_requests``, ``split_requests``): safety heads, ACT;
* reasoning prompts (``load_reasoning_prompts``): preplan / anchor tokens.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
NATURAL_TEXT = DATA_DIR / "natural_text.txt"


def _lines(name: str) -> list[str]:
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return [l.strip() for l in lines if l.strip()]


# ------------------------------------------------------------------------------------------------
# natural text

def natural_text_passages(path: str | Path | None = None, min_chars: int = 600) -> list[str]:
    """The shipped natural text cut into passages: paragraphs (blank-line separated, line breaks
    unwrapped) joined in file order until a passage has at least ``min_chars`` characters.
    Uses ``heads/data/haystack.txt`` if ``natural_text.txt`` is missing."""
    if path is None:
        path = NATURAL_TEXT if NATURAL_TEXT.exists() else DATA_DIR / "haystack.txt"
    text = Path(path).read_text(encoding="utf-8")
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if p]
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c) + 1 for c in cur) >= min_chars:
            out.append(" ".join(cur))
            cur = []
    if not out:
        raise ValueError(f"{path} holds no text passages")
    return out


def text_samples(model, data=None, n_samples: int = 20, n_tokens: int = 64,
                 prepend_bos: bool = True) -> tuple[torch.Tensor, str]:
    """Equal-length, unpadded token samples [n, n_tokens] and a dataset name.

    ``data``: None (the shipped natural text), a list of strings, or token ids [batch, pos]
    (then cut to at most ``n_samples`` x ``n_tokens``; shorter token data is used as it is). Texts
    are tokenized one by one with the tokenizer's special-token default (``prepend_bos``), texts
    shorter than ``n_tokens`` are skipped, and ``n_samples`` of the rest are taken evenly spread
    over the list (all of them if fewer).
    """
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be >= 2, got {n_tokens}")
    if n_tokens > model.cfg.max_ctx:
        raise ValueError(f"n_tokens={n_tokens} exceeds {model.cfg.name}'s context of {model.cfg.max_ctx}")
    if isinstance(data, torch.Tensor):
        toks = data if data.dim() == 2 else data[None]
        if toks.shape[0] == 0 or toks.shape[1] < 2:
            raise ValueError(f"token data has shape {tuple(toks.shape)}; need at least 1 sample of >= 2 tokens")
        return toks[:n_samples, :n_tokens].long(), "tokens"
    if model.tokenizer is None:
        raise ValueError(f"{model.cfg.name} has no tokenizer: pass token ids [batch, pos] as data")
    name = "natural_text" if data is None else "texts"
    texts = natural_text_passages() if data is None else ([data] if isinstance(data, str) else list(data))
    if not texts:
        raise ValueError("empty data: give at least one text")
    rows = []
    for t in texts:
        ids = model.tokenizer(t, add_special_tokens=prepend_bos)["input_ids"]
        if len(ids) >= n_tokens:
            rows.append(ids[:n_tokens])
    if not rows:
        raise ValueError(f"no text in the data has {n_tokens} tokens; give longer texts or lower n_tokens")
    if len(rows) > n_samples:
        idx = torch.linspace(0, len(rows) - 1, n_samples).round().long().tolist()
        rows = [rows[i] for i in idx]
    return torch.tensor(rows, dtype=torch.long), name


# ------------------------------------------------------------------------------------------------
# haystack and needles

def load_haystack() -> str:
    """The shipped haystack: the opening chapters of Pride and Prejudice (public domain; SOURCES.md)."""
    return (DATA_DIR / "haystack.txt").read_text(encoding="utf-8")


def load_needles() -> list[dict]:
    """The shipped (needle, question, answer) triples (needles.json; SOURCES.md)."""
    return json.loads((DATA_DIR / "needles.json").read_text(encoding="utf-8"))


def prefix_ids(tok) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Gemma, nothing for SmolLM2)."""
    return list(tok("", add_special_tokens=True)["input_ids"])


def repeated_tokens(tok, text: str, n: int) -> list[int]:
    """The text's tokens, repeated (joined by a blank line) until there are at least n: the reference
    NIAH code repeats its haystack the same way when a context is longer than the essays."""
    base = tok.encode(text, add_special_tokens=False)
    if not base:
        raise ValueError("the haystack text is empty")
    ids = list(base)
    sep = tok.encode("\n\n", add_special_tokens=False)
    while len(ids) < n:
        ids += sep + base
    return ids


def haystack_batch(model, n_texts: int, length: int, text: str | None = None) -> torch.Tensor:
    """``n_texts`` consecutive equal-length [length] token windows of the haystack (no padding; the
    text is repeated when too short), each starting with the tokenizer's BOS if it has one."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer: pass token ids [batch, pos] as data")
    text = load_haystack() if text is None else text
    if not text.strip():
        raise ValueError("the haystack text is empty")
    pre = prefix_ids(tok)
    n = length - len(pre)
    if n <= 0 or n_texts <= 0:
        raise ValueError(f"need at least one text of more than {len(pre)} tokens")
    ids = repeated_tokens(tok, text, n_texts * n)
    return torch.tensor([pre + ids[i * n:(i + 1) * n] for i in range(n_texts)])


# ------------------------------------------------------------------------------------------------
# requests and prompts

def load_requests(kind: str = "harmful") -> list[str]:
    """The shipped requests: ``kind`` "harmful" (50 AdvBench-style requests written for headscope)
    or "harmless" (50 Alpaca-style instructions). See heads/data/SOURCES.md."""
    if kind not in ("harmful", "harmless"):
        raise ValueError(f"kind must be 'harmful' or 'harmless', got {kind!r}")
    return _lines(f"{kind}.txt")


def split_requests(seed: int = 0, n_train: int = 25) -> dict[str, list[str]]:
    """{"harmful_train", "harmful_test", "harmless_train", "harmless_test"}: the shipped requests,
    shuffled with ``seed``, the first ``n_train`` of each kind for training."""
    out = {}
    for kind in ("harmful", "harmless"):
        qs = load_requests(kind)
        if not 0 < n_train < len(qs):
            raise ValueError(f"n_train must be in 1..{len(qs) - 1} (there are {len(qs)} {kind} requests)")
        rng = random.Random(f"{seed}-{kind}")
        qs = qs[:]
        rng.shuffle(qs)
        out[f"{kind}_train"], out[f"{kind}_test"] = qs[:n_train], qs[n_train:]
    return out


def load_reasoning_prompts() -> list[str]:
    """The shipped math word problems (written for headscope; heads/data/SOURCES.md)."""
    return _lines("reasoning_prompts.txt")
