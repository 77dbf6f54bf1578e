"""AttentionInfluence (Hua et al. 2025): per-text relative loss increase with retrieval heads masked,
checked against the same losses computed by hand with plain HF eager attention."""
import copy

import pytest
import torch

import headscope as hs
from headscope.interventions import corpus, influence


def _hand_loss(hf, toks):
    with torch.no_grad():
        logits = hf(input_ids=toks[None]).logits[0].float()              # [N, V]
    return torch.nn.functional.cross_entropy(logits[:-1], toks[1:]).item()


def test_scores_equal_hand_computed_loss_ratio():
    m = hs.load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 128, (n,), generator=g) for n in (12, 7, 20, 9, 15)]   # padding in batches
    heads = [(1, 0), (2, 3), (2, 1)]
    res = influence.attention_influence(m, texts, heads, batch_size=2, progress=False)
    # by hand: the query of each masked head x 1e-4 (q_proj rows scaled; RoPE is linear), eager attention
    ref_model = copy.deepcopy(m.model)
    ref_model.set_attn_implementation("eager")
    masked_model = copy.deepcopy(ref_model)
    d = m.cfg.d_head
    with torch.no_grad():
        for l, h in heads:
            masked_model.model.layers[l].self_attn.q_proj.weight[h * d:(h + 1) * d] *= 1e-4
    for i, t in enumerate(texts):
        l_ref, l_mask = _hand_loss(ref_model, t), _hand_loss(masked_model, t)
        assert abs(res.loss_ref[i].item() - l_ref) < 1e-4
        assert abs(res.loss_masked[i].item() - l_mask) < 1e-4
        assert abs(res.scores[i].item() - (l_mask - l_ref) / l_ref) < 1e-4
    assert res.scores.abs().max() > 1e-3                                  # masking changed something
    top = res.select(0.4)
    assert len(top) == 2 and res.scores[top[0]] == res.scores.max()


def test_zero_masking_and_errors():
    m = hs.load("tiny-llama")
    texts = [torch.arange(3, 13)]
    r = influence.attention_influence(m, texts, [(0, 1)], how="zero", progress=False)
    assert torch.isfinite(r.scores).all()
    with pytest.raises(ValueError, match="no heads"):
        influence.attention_influence(m, texts, [], progress=False)
    with pytest.raises(ValueError, match="how="):
        influence.attention_influence(m, texts, [(0, 1)], how="sideways", progress=False)


def test_mixed_corpus_and_composition():
    texts = corpus.mixed_corpus(6, seed=1)
    kinds = [t.kind for t in texts]
    assert sorted(set(kinds)) == sorted(corpus.KINDS) and all(kinds.count(k) == 6 for k in corpus.KINDS)
    assert texts == corpus.mixed_corpus(6, seed=1)                        # fixed by seed
    ranking = sorted(range(len(kinds)), key=lambda i: (kinds[i] != "code", i))   # all code first
    comp = corpus.composition(kinds, ranking, 0.25)
    assert comp["top"]["code"] == 1.0 and comp["bottom"].get("code", 0) == 0.0
    assert abs(sum(comp["all"].values()) - 1) < 1e-9
