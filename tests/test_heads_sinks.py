"""Attention sinks (Gu et al. 2024) and hidden sinks (ACT) — heads/sinks.py.

Planted heads: a hook on ``hook_attn_scores`` restricts one head to a set of keys (uniform over
them), so its alpha_j is known in closed form; the analyzers must find exactly that.
"""
import contextlib

import pytest
import torch

import headscope as hs
from headscope.heads import ANALYZERS
from headscope.heads.sinks import (HiddenSinks, Sinks, find_hidden_sinks, natural_text_passages, sink_metric,
                                   text_samples)


@contextlib.contextmanager
def plant(m, layer, head, allowed_fn):
    """allowed_fn(N) -> [N, N] bool: which keys each query of head (layer, head) may attend to."""
    def fn(s, hook):
        N = s.shape[-1]
        allowed = allowed_fn(N).to(s.device) & torch.ones(N, N, dtype=torch.bool, device=s.device).tril()
        s = s.clone()
        s[:, head] = torch.where(allowed, torch.zeros((), device=s.device), torch.tensor(float("-inf"), device=s.device))
        return s

    with m.hooks([(f"blocks.{layer}.attn.hook_attn_scores", fn)]):
        yield


def only_first(N):
    a = torch.zeros(N, N, dtype=torch.bool)
    a[:, 0] = True
    return a


def first_and(P, first=True):
    def f(N):
        a = torch.zeros(N, N, dtype=torch.bool)
        a[:, 0] = first
        for p in P:
            a[p:, p] = True
        a[:, 0] |= ~a.any(-1)            # queries before the planted keys see key 0 only
        return a
    return f


@pytest.fixture(scope="module")
def tiny():
    return hs.load("tiny-llama")                 # 3 layers, 4 heads


@pytest.fixture(scope="module")
def toks():
    return torch.randint(3, 128, (5, 40), generator=torch.Generator().manual_seed(0))


def test_registered_and_passages():
    assert "sinks" in ANALYZERS and "hidden_sinks" in ANALYZERS
    ps = natural_text_passages()
    assert len(ps) > 100 and all(len(p) >= 600 for p in ps[:-1])
    assert "\n" not in ps[0]


def test_planted_sink_head(tiny, toks):
    with plant(tiny, 1, 2, only_first):
        r = Sinks(n_tokens=32, n_samples=5).score(tiny, toks, progress=False)
        _, cache = tiny.run_with_cache(toks[:, :32], names_filter=lambda n: n.endswith("hook_pattern"))
    assert r.top(1)[0][:2] == (1, 2)
    assert abs(float(r.scores[1, 2]) - 1.0) < 1e-5
    # alpha_1 = mean over the T queries of A[t, 0]; Sink metric = % of (layer, head) with alpha_1 > eps, per sample
    alpha = torch.stack([cache["pattern", l][..., 0].mean(-1) for l in range(3)], 1)   # [S, L, H]
    assert torch.allclose(r.scores, alpha.mean(0), atol=1e-5)
    assert abs(sink_metric(r) - 100 * float((alpha > 0.3).float().mean())) < 1e-4
    assert torch.allclose(r.extra["sink_rate"], (alpha > 0.3).float().mean(0))
    # alpha_k for k = 2: key 1, seen by T - 1 queries
    a2 = torch.stack([cache["pattern", l][..., 1:, 1].mean(-1) for l in range(3)], 1).mean(0)
    assert torch.allclose(r.extra["alpha_by_position"][..., 1], a2, atol=1e-5)
    r2 = Sinks(n_tokens=32, n_samples=5, k=2).score(tiny, toks, progress=False)
    assert not torch.allclose(r2.scores, r.scores)


def test_sink_metric_threshold(tiny, toks):
    with plant(tiny, 0, 0, only_first), plant(tiny, 2, 3, only_first):
        r = Sinks(n_tokens=32, eps=0.99).score(tiny, toks, progress=False)
    assert abs(sink_metric(r) - 100 * 2 / 12) < 1e-4           # exactly the two planted heads
    assert r.classify().sum() == 2 and r.threshold == 0.99


def test_planted_hidden_sink(tiny, toks):
    with plant(tiny, 2, 0, first_and([10])):
        res = find_hidden_sinks(tiny, toks, n_tokens=40, progress=False)
    mine = res.for_head(2, 0)
    assert [(s.sample, s.position) for s in mine] == [(i, 10) for i in range(5)]
    assert all(abs(s.score - 0.5) < 1e-5 and s.token_id == int(toks[s.sample, 10]) for s in mine)
    assert (res.first[:, 2, 0] == 0).all()                     # the first-found sink (key 0) is excluded
    assert (res.count[:, 2, 0] == 1).all()
    assert torch.allclose(res.mass[:, 2, 0], torch.full((5,), 0.5), atol=1e-5)
    df = res.to_frame()
    assert len(df) == len(res.sinks)


def test_hidden_sink_first_found_excluded(tiny, toks):
    # key 0 only for t < 2 (a_0 = 2/40 < 0.1): first found is key 2 (excluded), key 20 is hidden
    with plant(tiny, 1, 1, first_and([2, 20], first=False)):
        res = find_hidden_sinks(tiny, toks, n_tokens=40, progress=False)
    assert (res.first[:, 1, 1] == 2).all()
    assert [s.position for s in res.for_head(1, 1)] == [20] * 5
    # the paper's alpha/N rule with alpha = 0.1 N is the same threshold
    with plant(tiny, 1, 1, first_and([2, 20], first=False)):
        res2 = find_hidden_sinks(tiny, toks, n_tokens=40, rule="alpha_over_n", alpha=4.0, progress=False)
    assert torch.equal(res.count, res2.count)


def test_min_queries(tiny, toks):
    res = find_hidden_sinks(tiny, toks, n_tokens=40, min_queries=1, progress=False)
    res8 = find_hidden_sinks(tiny, toks, n_tokens=40, min_queries=8, progress=False)
    assert all(s.position <= 40 - 8 for s in res8.sinks)
    assert len(res8.sinks) <= len(res.sinks)
    sc = HiddenSinks(n_tokens=40).score(tiny, toks, progress=False)
    assert torch.allclose(sc.scores, res.count.mean(0))


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="tokenizer"):
        Sinks().score(tiny, ["some text"], progress=False)
    with pytest.raises(ValueError, match="k must"):
        Sinks(k=100, n_tokens=64)
    with pytest.raises(ValueError, match="k=40"):
        Sinks(k=40, n_tokens=64).score(tiny, torch.randint(3, 128, (2, 20)), progress=False)
    with pytest.raises(ValueError, match="context"):
        Sinks(n_tokens=10_000).score(tiny, torch.randint(3, 128, (2, 20)), progress=False)
    with pytest.raises(ValueError, match="rule"):
        find_hidden_sinks(tiny, torch.randint(3, 128, (2, 20)), rule="x", progress=False)


def test_save_load(tiny, toks, tmp_path):
    from headscope.heads import HeadScores
    r = Sinks(n_tokens=16).score(tiny, toks, progress=False)
    back = HeadScores.load(r.save(tmp_path / "s"))
    assert abs(sink_metric(back) - sink_metric(r)) < 1e-6


@pytest.mark.slow
def test_smollm2_sinks(smollm2):
    toks, _ = text_samples(smollm2, None, 2, 64)
    assert toks.shape == (2, 64)
    r = Sinks(n_samples=2).score(smollm2, progress=False)
    _, cache = smollm2.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    alpha = torch.stack([cache["pattern", l][..., 0].mean(-1) for l in range(30)], 1).mean(0)
    assert torch.allclose(r.scores, alpha, atol=1e-4)
    assert sink_metric(r) > 50                                  # SmolLM2 dumps attention on its first token
    res = find_hidden_sinks(smollm2, toks, n_tokens=64, min_queries=8, progress=False)
    assert all(isinstance(s.token, str) and s.position <= 56 for s in res.sinks)


def test_sliding_window_layers_divide_by_T_minus_k():
    """Gu et al. 2024 eq. 1 (reference ``compute_attention_sink``) and ACT (column sum / (N - j)) divide
    key k's column sum by the T - k + 1 queries at or after it, also on sliding-window layers where
    fewer of them see k. tiny-gemma3's layers 0 and 2 slide over 6 keys; T = 24."""
    from headscope.heads.common import received_importance
    m = hs.load("tiny-gemma3")
    T = 24
    toks = torch.randint(3, 128, (3, T), generator=torch.Generator().manual_seed(4))
    _, cache = m.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    div = torch.arange(T, 0, -1).float()                                               # T - s
    alpha = torch.stack([(cache["pattern", l].float() / div).sum(-2) for l in range(3)], 1)   # [S, L, H, T]
    r = Sinks(n_tokens=T, n_samples=3).score(m, toks, progress=False)
    assert torch.allclose(r.scores, alpha[..., 0].mean(0), atol=1e-5)
    assert torch.allclose(r.extra["alpha_by_position"], alpha.mean(0), atol=1e-5)
    res = find_hidden_sinks(m, toks, n_tokens=T, progress=False)
    above = alpha > 0.1
    assert torch.equal(res.count, (above.sum(-1) - 1).clamp_min(0).float())
    # the "visible queries" reading differs exactly on the sliding layers (the check is not vacuous)
    vis = received_importance(m, toks, progress=False, divide_by="visible")
    assert not torch.allclose(vis[:, 0], alpha[:, 0], atol=1e-3)
    assert torch.allclose(vis[:, 1], alpha[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="divide_by"):
        received_importance(m, toks, progress=False, divide_by="all")
