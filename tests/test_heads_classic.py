"""Induction / echo / previous-token / duplicate-token analyzers (heads/classic.py).

Planted heads: a hook on ``hook_attn_scores`` makes one head attend (uniformly) only to the keys a
rule allows, computed from the actual input ids (captured by a pre-hook on the embedding), so the
planted head *is* an induction / echo / previous-token head; the analyzers must rank it first.
"""
import contextlib

import pytest
import torch

import headscope as hs
from headscope.heads import ANALYZERS, HeadScores
from headscope.heads.classic import (DuplicateToken, Echo, Induction, PreviousToken, diagonal_mass,
                                     razor_retrieval_set, razor_scores, repeated_random_tokens)


def _rule_induction(toks):                      # allowed[b, t, s]: s = j + 1 for j < t with tok_j == tok_t
    N = toks.shape[1]
    same = (toks[:, :, None] == toks[:, None, :]) & torch.ones(N, N, dtype=torch.bool).tril(-1)
    allowed = torch.zeros_like(same)
    allowed[:, :, 1:] = same[:, :, :-1]
    return allowed


def _rule_echo(toks):
    N = toks.shape[1]
    return (toks[:, :, None] == toks[:, None, :]) & torch.ones(N, N, dtype=torch.bool).tril(-1)


def _rule_prev(toks):
    N = toks.shape[1]
    return torch.ones(N, N, dtype=torch.bool).tril(-1).triu(-1).expand(toks.shape[0], N, N)


@contextlib.contextmanager
def plant(m, layer, head, rule):
    """Head (layer, head) attends uniformly to the keys ``rule(tokens)`` allows (key 0 if none)."""
    seen = {}
    emb = m.model.get_input_embeddings()
    h = emb.register_forward_pre_hook(lambda mod, args: seen.__setitem__("ids", args[0]))

    def fn(s, hook):
        allowed = rule(seen["ids"].cpu()).to(s.device).clone()              # [B, Q, K]
        allowed[:, :, 0] |= ~allowed.any(-1)
        s = s.clone()
        s[:, head] = torch.where(allowed, torch.zeros((), device=s.device), torch.tensor(float("-inf"), device=s.device))
        return s

    try:
        with m.hooks([(f"blocks.{layer}.attn.hook_attn_scores", fn)]):
            yield
    finally:
        h.remove()


@pytest.fixture(scope="module")
def tiny():
    return hs.load("tiny-llama")                 # 3 layers, 4 heads, 2 KV heads, vocab 128


def test_registered():
    for n in ("induction", "echo", "previous_token", "duplicate_token"):
        assert n in ANALYZERS


def test_probe_shape_and_distinct_block(tiny):
    t = repeated_random_tokens(tiny, 30, 4, n_samples=2, seed=1)
    assert t.shape == (2, 121)
    assert (t[:, 0] == 0).all()
    b = t[:, 1:].view(2, 4, 30)
    assert (b == b[:, :1]).all()
    assert all(len(set(x[0].tolist())) == 30 for x in b)
    assert not torch.equal(b[0, 0], b[1, 0])
    assert torch.equal(t, repeated_random_tokens(tiny, 30, 4, n_samples=2, seed=1))


def test_planted_induction_head_ranks_first(tiny):
    with plant(tiny, 1, 3, _rule_induction):
        r = Induction(block_len=16, n_samples=2, method="pattern").score(tiny, progress=False)
        r2 = Induction(block_len=16, n_samples=2, method="stats").score(tiny, progress=False)
    assert r.top(1)[0][:2] == (1, 3)
    assert r.scores[1, 3] > 0.999
    assert r.scores.flatten().sort().values[-2] < 0.5
    assert torch.allclose(r.scores, r2.scores, atol=1e-5)          # O(N) diagonals == patterns
    assert r.extra["kv_max"].shape == (3, 2)
    assert r.extra["kv_max"][1, 1] == r.scores[1, 2:].max()


def test_planted_echo_head(tiny):
    with plant(tiny, 2, 1, _rule_echo):
        e = Echo(block_len=16, n_samples=2, method="stats").score(tiny, progress=False)
        ind = Induction(block_len=16, n_samples=2).score(tiny, progress=False)
    assert e.top(1)[0][:2] == (2, 1)
    assert e.scores[2, 1] > 0.999
    assert ind.scores[2, 1] < 0.05                  # an echo head is not an induction head


def test_methods_agree_unplanted(tiny):
    t = repeated_random_tokens(tiny, 12, 4, n_samples=2, seed=3)
    a = razor_scores(tiny, t, 12, "pattern", progress=False)
    b = razor_scores(tiny, t, 12, "stats", progress=False)
    for k in ("induction", "echo"):
        assert torch.allclose(a[k], b[k], atol=1e-6)
        assert (a[k] >= 0).all() and (a[k] <= 1).all()


def test_pair_mean_reading_is_two_over_r_times_the_score(tiny):
    """methods' "mean attention on j + 1 for earlier positions j" read as the mean over (query, copy)
    pairs, computed here from the full patterns with no diagonal shortcut, is exactly 2 / R times
    the score (the per-query sum over copies, then the mean over queries): the same ranking, so
    the same retrieval set, under either reading."""
    L_, R = 10, 4
    t = repeated_random_tokens(tiny, L_, R, n_samples=2, seed=5)
    s = razor_scores(tiny, t, L_, "stats", progress=False)
    _, cache = tiny.run_with_cache(t, names_filter=lambda n: n.endswith("hook_pattern"))
    N = t.shape[1]
    for which, shift in (("induction", 1), ("echo", 0)):
        pairs = [(b, q, j) for b in range(t.shape[0]) for q in range(1 + L_, N) for j in range(1, q)
                 if t[b, j] == t[b, q]]
        assert len(pairs) == t.shape[0] * L_ * R * (R - 1) // 2
        for l in range(3):
            p = cache["pattern", l]                                                  # [B, H, N, N]
            mean = sum(p[b, :, q, j + shift] for b, q, j in pairs) / len(pairs)       # [H]
            torch.testing.assert_close(mean, 2 / R * s[which][l], atol=1e-6, rtol=1e-5)


def test_diagonal_mass_matches_patterns(tiny):
    t = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    _, cache = tiny.run_with_cache(t, names_filter=lambda n: n.endswith("hook_pattern"))
    got = diagonal_mass(tiny, t, {3: (2, 20)}, method="stats", progress=False)[3]
    for l in range(3):
        p = cache["pattern", l]                                        # [B, H, N, N]
        want = sum(p[:, :, s + 3, s] for s in range(2, 20)).sum(0)
        assert torch.allclose(got[l], want, atol=1e-5)


def test_planted_previous_token_head(tiny):
    t = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    with plant(tiny, 0, 2, _rule_prev):
        r = PreviousToken(method="stats").score(tiny, t, progress=False)
        r2 = PreviousToken(method="pattern").score(tiny, t, progress=False)
    assert r.top(1)[0][:2] == (0, 2)
    assert abs(float(r.scores[0, 2]) - 1.0) < 1e-5
    assert torch.allclose(r.scores, r2.scores, atol=1e-5)


def test_planted_duplicate_token_head(tiny):
    t = torch.randint(3, 15, (2, 48), generator=torch.Generator().manual_seed(0))   # many repeats
    with plant(tiny, 1, 0, _rule_echo):
        r = DuplicateToken().score(tiny, t, progress=False)
    assert r.top(1)[0][:2] == (1, 0)
    assert r.scores[1, 0] > 0.999
    assert r.scores.flatten().sort().values[-2] < 0.6


def test_retrieval_set():
    def hsc(s, kv):
        return HeadScores(scores=s, method="x", extra={"kv_max": kv})
    ind = torch.arange(40).float().view(10, 4) / 100            # distinct values, no ties
    ind[3, 1], ind[7, 2] = 0.9, 0.8
    echo = torch.arange(40).float().view(10, 4) / 1000
    echo[5, 0] = 0.7
    kv_i = ind.view(10, 2, 2).max(-1).values
    kv_e = echo.view(10, 2, 2).max(-1).values
    # 20 KV heads: ceil(0.14 * 20) = 3 by induction, ceil(0.01 * 20) = 1 by echo
    s = razor_retrieval_set(hsc(ind, kv_i), hsc(echo, kv_e))
    assert s == [(3, 0), (5, 0), (7, 1), (9, 1)]
    q = razor_retrieval_set(hsc(ind, kv_i), hsc(echo, kv_e), induction_frac=0.05, level="query")
    assert q == [(3, 1), (5, 0), (7, 2)]


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="allows"):
        repeated_random_tokens(tiny, 100, 6)                    # 601 > 512 context
    with pytest.raises(ValueError, match="block_len"):
        repeated_random_tokens(tiny, 500, 1)
    with pytest.raises(ValueError, match="repeated"):
        razor_scores(tiny, torch.randint(3, 128, (1, 41)), 10, progress=False)
    with pytest.raises(ValueError, match="method"):
        Induction(block_len=10, method="nope").score(tiny, progress=False)
    with pytest.raises(ValueError, match="repeats"):
        DuplicateToken().score(tiny, torch.arange(3, 40)[None], progress=False)


@pytest.mark.slow
def test_smollm2_induction(smollm2):
    t = repeated_random_tokens(smollm2, 40, 3, seed=0)
    a = razor_scores(smollm2, t, 40, "pattern", which=("induction",), progress=False)["induction"]
    b = razor_scores(smollm2, t, 40, "stats", which=("induction",), progress=False)["induction"]
    assert torch.allclose(a, b, atol=1e-4)                      # GQA model, O(N) path == patterns
    top = HeadScores(scores=a, method="induction").top(3)
    assert top[0][2] > 0.5                                      # SmolLM2 has strong induction heads
    assert all(l >= 10 for l, _, _ in top)                      # ... in its middle/late layers
