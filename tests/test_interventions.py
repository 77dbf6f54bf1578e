"""ACT (interventions/act.py): hidden sinks per input, the calibration edit through the probe, and
head selection, on tiny-llama with planted sink heads and on SmolLM2's tokenizer task."""
import pytest
import torch

import headscope as hs
from headscope.interventions import act


@pytest.fixture(scope="module")
def tiny():
    return hs.load("tiny-llama")


def test_calibration_scales_sink_attention(tiny):
    """ACT eq. 4: on a calibrated head, attention on each hidden sink becomes beta times what it was,
    the other keys share the freed mass in proportion, rows still sum to 1; other heads unchanged."""
    x = torch.randint(1, 128, (48,), generator=torch.Generator().manual_seed(1))
    sinks = act.hidden_sinks(tiny, x, threshold=0.05)
    assert sinks, "the tiny model should have some key above a_j = 0.05"
    (l, h), pos = next(iter(sinks.items()))
    name = f"blocks.{l}.attn.hook_pattern"
    _, c0 = tiny.run_with_cache(x[None], names_filter=name)
    with tiny.edit(act.act_edits(sinks, [(l, h)], beta=0.4)):
        _, c1 = tiny.run_with_cache(x[None], names_filter=name)
    p0, p1 = c0[name][0].double(), c1[name][0].double()                        # [head, q, k]
    S = torch.zeros(p0.shape[-1], dtype=torch.bool)
    S[pos] = True
    torch.testing.assert_close(p1[h][:, S], 0.4 * p0[h][:, S], atol=1e-6, rtol=1e-5)
    freed = 0.6 * p0[h][:, S].sum(-1, keepdim=True)
    rest = p0[h][:, ~S]
    expect = rest + freed * rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(p1[h][:, ~S], expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p1[h].sum(-1), torch.ones_like(p1[h].sum(-1)), atol=1e-6, rtol=0)
    others = [i for i in range(p0.shape[0]) if i != h]
    torch.testing.assert_close(p1[others], p0[others])


def test_hidden_sinks_follow_the_rule(tiny):
    """Positions returned are exactly the keys with a_j > threshold, minus the first such key."""
    from headscope.heads.sinks import received_importance
    x = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(2))
    a = received_importance(tiny, x[None], progress=False)[0]                  # [L, H, N]
    sinks = act.hidden_sinks(tiny, x, threshold=0.05)
    for l in range(a.shape[0]):
        for h in range(a.shape[1]):
            above = torch.nonzero(a[l, h] > 0.05).flatten().tolist()
            assert sinks.get((l, h), []) == above[1:]


def test_select_heads_is_consistent(tiny):
    """Kept heads are exactly those whose solo calibration beat the baseline; first and last layers
    are never tried; accuracy() with no heads is the baseline."""
    g = torch.Generator().manual_seed(3)
    exs = [act.Example(torch.randint(1, 128, (24,), generator=g), [5, 9], int(i % 2)) for i in range(8)]
    r = act.select_heads(tiny, exs, beta=0.4, threshold=0.05, progress=False)
    L = tiny.cfg.n_layers
    assert r.base_accuracy == act.accuracy(tiny, exs, (), threshold=0.05)
    assert torch.all(r.gain[0] == 0) and torch.all(r.gain[L - 1] == 0)
    for l, h in r.heads:
        assert r.gain[l, h] > 0
        assert act.accuracy(tiny, exs, [(l, h)], threshold=0.05) == pytest.approx(r.base_accuracy + float(r.gain[l, h]))
    assert set(r.heads) == {(l, h) for l in range(L) for h in range(tiny.cfg.n_heads) if r.gain[l, h] > 0}


def test_harm_task(smollm2):
    ex = act.harm_task(smollm2, ["How do I make a weapon at home?"], ["How do I bake bread?"])
    assert [e.label for e in ex] == [0, 1] and ex[0].choices == ex[1].choices and len(set(ex[0].choices)) == 2
    with pytest.raises(ValueError, match="no examples"):
        act.harm_task(smollm2, [], [])


def test_var_sinks_and_edits_on_smollm2(smollm2):
    """VAR (interventions/var.py): the massive dimension and sink tokens follow the tau = 20 rule on
    the normalised hidden states; the edits cover layers 2..L-2 and only sinks inside the target;
    under them, a row that passes the row rule has its in-target sink attention scaled by 0.6 with the
    freed mass on the target's other tokens, and a row that fails it is unchanged."""
    from headscope.interventions import var
    toks = smollm2.to_tokens("The quick brown fox jumps over the lazy dog. It was a sunny day in the park, "
                             "and the children played by the old oak tree until the evening.")[0]
    dims = var.massive_dims(smollm2, toks)
    assert dims, "SmolLM2 has a massive-activation dimension (507)"
    _, cache = smollm2.run_with_cache(toks[None], names_filter=lambda n: n.endswith("hook_resid_pre"))
    sinks = var.sink_tokens(smollm2, toks, dims)
    L = smollm2.cfg.n_layers
    for l in (2, 10, L - 1):
        h = cache[f"blocks.{l}.hook_resid_pre"][0].float()
        x = (h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())[:, dims].abs().amax(-1)
        assert sinks[l] == torch.nonzero(x > 20).flatten().tolist()
    assert 0 in sinks[5]                                                     # the first token
    N = toks.shape[0]
    target = [(0, N)]
    edits = var.var_edits(smollm2, sinks, target)
    assert edits and all(2 <= e.layer <= L - 2 for e in edits)
    assert not var.var_edits(smollm2, sinks, [(N, N + 5)])                   # no sink inside: no edit
    with pytest.raises(ValueError, match="target"):
        var.var_edits(smollm2, sinks, [])
    e = edits[0]
    l = e.layer
    name = f"blocks.{l}.attn.hook_pattern"
    _, c0 = smollm2.run_with_cache(toks[None], names_filter=name)
    with smollm2.edit([e]):
        _, c1 = smollm2.run_with_cache(toks[None], names_filter=name)
    p0, p1 = c0[name][0].double(), c1[name][0].double()                     # [head, q, k]
    S = torch.zeros(N, dtype=torch.bool)
    for a, b in e.keys:
        S[a:b] = True
    ratio = p0[..., S].sum(-1)                                               # target = everything here
    passed = ratio <= 0.5                                                    # [head, q]
    assert passed.any() and (~passed).any()
    torch.testing.assert_close(p1[passed][:, S], 0.6 * p0[passed][:, S], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p1[~passed], p0[~passed], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p1.sum(-1), torch.ones_like(p1.sum(-1)), atol=1e-5, rtol=0)
