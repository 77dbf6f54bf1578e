"""AttentionInfluence — data selection by masking retrieval heads (Hua et al. 2025,
"AttentionInfluence: Adopting Attention Head Influence for Weak-to-Strong Pretraining Data
Selection", arXiv 2505.07293, §2).

A small model scores every text of a corpus without any training or labels:

1. find its retrieval heads (the paper: a synthetic key-value retrieval task scored as in Wu et
   al. 2024; here any ``HeadScores`` — by default the ``retrieval`` analyzer's needle-in-a-haystack
   scores — or an explicit head list);
2. compute the mean next-token loss of each text with the model as it is (L_ref) and with those
   heads masked (L_masked; ``Ablate(how="uniform")``: query × 1e-4 so the head attends uniformly,
   or ``how="zero"``: the head's output is zero);
3. score = (L_masked − L_ref) / L_ref, the relative loss increase. Texts whose loss rises most lean
   on retrieval / in-context reasoning; the paper keeps the top 20% of the corpus.

Both losses are token means over the text's own tokens (padding excluded), computed in batches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..probe.edits import Ablate

PAPER = "Hua et al. 2025, AttentionInfluence (arXiv 2505.07293), §2"


def mask_edits(heads, how: str = "uniform") -> list[Ablate]:
    """One ``Ablate`` per layer over the listed (layer, head) pairs."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(int(l), []).append(int(h))
    return [Ablate(l, sorted(hs), how=how) for l, hs in sorted(by_layer.items())]


def heads_from_scores(scores, k: int | None = None, frac: float = 0.05) -> list[tuple[int, int]]:
    """The top ``k`` heads of a ``HeadScores`` (default: ``frac`` of all heads, at least 1)."""
    s = scores.scores
    k = k if k is not None else max(1, round(frac * s.numel()))
    idx = s.flatten().argsort(descending=True)[:k]
    return [(int(i) // s.shape[1], int(i) % s.shape[1]) for i in idx]


def text_losses(model, tokens: list[torch.Tensor], edits=(), batch_size: int = 8,
                progress: bool = False, desc: str = "loss") -> torch.Tensor:
    """Mean next-token cross-entropy of each token sequence (1-D tensors, >= 2 tokens) -> [n]."""
    from tqdm.auto import tqdm

    from .tasks import pad_id
    pid = pad_id(model)
    out = []
    n_batches = (len(tokens) + batch_size - 1) // batch_size
    with torch.no_grad(), model.edit(list(edits)):
        for i in tqdm(range(0, len(tokens), batch_size), total=n_batches, desc=desc, disable=not progress,
                      leave=False):
            chunk = tokens[i:i + batch_size]
            n = max(len(t) for t in chunk)
            toks = torch.full((len(chunk), n), pid, dtype=torch.long)
            mask = torch.zeros(len(chunk), n, dtype=torch.long)
            for j, t in enumerate(chunk):
                if len(t) < 2:
                    raise ValueError("a text of fewer than 2 tokens has no next-token loss")
                toks[j, n - len(t):] = t                                  # left padding
                mask[j, n - len(t):] = 1
            logits = model(toks, attention_mask=mask).float()            # [B, N, V]
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:].to(logits.device),
                                                   reduction="none").cpu()  # [B, N-1]
            m = (mask[:, :-1] * mask[:, 1:]).float()                     # both positions real
            out.append((ce * m).sum(1) / m.sum(1))
    return torch.cat(out)


def tokenize(model, texts, max_tokens: int = 256) -> list[torch.Tensor]:
    """Strings -> 1-D token tensors cut to ``max_tokens`` (tensors pass through)."""
    out = []
    for t in texts:
        if isinstance(t, str):
            if model.tokenizer is None:
                raise ValueError(f"{model.cfg.name} has no tokenizer: pass token tensors")
            t = model.tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"][0]
        out.append(torch.as_tensor(t).long())
    return out


@dataclass
class InfluenceResult:
    """AttentionInfluence scores (Hua et al. 2025, §2) of n texts. Fields: scores [n] relative loss
    increase (L_masked - L_ref) / L_ref (unitless); loss_ref, loss_masked [n] mean next-token
    cross-entropy per text (nats); heads the masked (layer, head) pairs; how "uniform" or "zero";
    seconds wall time; params max_tokens, batch_size."""
    scores: torch.Tensor              # [n] (L_masked - L_ref) / L_ref
    loss_ref: torch.Tensor            # [n]
    loss_masked: torch.Tensor         # [n]
    heads: list[tuple[int, int]]
    how: str
    seconds: float = 0.0
    params: dict = field(default_factory=dict)

    def ranking(self) -> list[int]:
        """Text indices, highest influence first."""
        return self.scores.argsort(descending=True).tolist()

    def select(self, frac: float = 0.2) -> list[int]:
        """Indices of the top ``frac`` of texts (the paper keeps 20%)."""
        if not 0 < frac <= 1:
            raise ValueError(f"frac must be in (0, 1], got {frac}")
        return self.ranking()[:max(1, round(frac * len(self.scores)))]


def attention_influence(model, texts, heads, how: str = "uniform", max_tokens: int = 256,
                        batch_size: int = 8, progress: bool = True) -> InfluenceResult:
    """Score ``texts`` (strings, or 1-D token tensors) by the relative loss increase when ``heads``
    [(layer, head)] are masked. Strings are cut to ``max_tokens`` tokens."""
    if not heads:
        raise ValueError("no heads to mask: pass (layer, head) pairs, e.g. heads_from_scores(retrieval scores)")
    if how not in ("uniform", "zero"):
        raise ValueError(f"how={how!r}: use 'uniform' (attention made uniform) or 'zero' (output zeroed)")
    t0 = time.time()
    toks = tokenize(model, texts, max_tokens)
    ref = text_losses(model, toks, (), batch_size, progress, "AttentionInfluence: reference loss")
    masked = text_losses(model, toks, mask_edits(heads, how), batch_size, progress,
                         "AttentionInfluence: heads masked")
    return InfluenceResult((masked - ref) / ref, ref, masked, [(int(l), int(h)) for l, h in heads], how,
                           time.time() - t0, dict(max_tokens=max_tokens, batch_size=batch_size))
