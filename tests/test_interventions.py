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
    """Kept heads are exactly those whose solo calibration beat the baseline; layers before
    ``first_layer`` and the last layer are never tried; accuracy() with no heads is the baseline."""
    g = torch.Generator().manual_seed(3)
    exs = [act.Example(torch.randint(1, 128, (24,), generator=g), [5, 9], int(i % 2)) for i in range(8)]
    r = act.select_heads(tiny, exs, beta=0.4, threshold=0.05, progress=False, first_layer=1)
    L = tiny.cfg.n_layers
    assert r.base_accuracy == act.accuracy(tiny, exs, (), threshold=0.05)
    assert torch.all(r.gain[0] == 0) and torch.all(r.gain[L - 1] == 0)
    for l, h in r.heads:
        assert r.gain[l, h] > 0
        assert act.accuracy(tiny, exs, [(l, h)], threshold=0.05) == pytest.approx(r.base_accuracy + float(r.gain[l, h]))
    assert set(r.heads) == {(l, h) for l in range(L) for h in range(tiny.cfg.n_heads) if r.gain[l, h] > 0}


def test_act_alpha_over_n_threshold(tiny):
    """ACT §3.1 phrases the sink threshold as alpha / N; "alpha/N" gives it, N = the example's real
    tokens (left padding excluded), and equals the number alpha / N passed as such."""
    assert act.sink_threshold("5/N", 50) == pytest.approx(0.1)
    assert act.sink_threshold(0.2, 50) == 0.2
    for bad in ("5/M", "x/N", "-1/N"):
        with pytest.raises(ValueError, match="alpha/N"):
            act.sink_threshold(bad, 10)
    assert act.parse_threshold("0.25") == 0.25 and act.parse_threshold("3/N") == "3/N"
    g = torch.Generator().manual_seed(7)
    p = torch.rand(2, 3, 12, 12, generator=g).tril()
    p = p / p.sum(-1, keepdim=True)                                       # [B, H, N, N] causal rows
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0                                                       # example 1: 8 real tokens
    got = act.sink_mask_from_pattern(p, mask, "2/N")
    assert torch.equal(got[0], act.sink_mask_from_pattern(p[:1], mask[:1], 2 / 12)[0])
    assert torch.equal(got[1], act.sink_mask_from_pattern(p[1:], mask[1:], 2 / 8)[0])
    assert not torch.equal(got[1], act.sink_mask_from_pattern(p[1:], mask[1:], 2 / 12)[0])   # per-example N
    toks = torch.randint(3, 128, (20,), generator=g)
    assert act.hidden_sinks(tiny, toks, "2/N") == act.hidden_sinks(tiny, toks, 2 / 20)


def test_act_candidate_layers_follow_the_reference(tiny):
    """GATECH-EIC/ACT calibrates layers 2..30 of a 32-layer model (``signal in range(2, 31)``); the
    paper's "all but the first and last" is first_layer=1. A model too shallow for the default says so."""
    assert act.candidate_layers(32) == list(range(2, 31))
    assert act.candidate_layers(32, first_layer=1) == list(range(1, 31))
    with pytest.raises(ValueError, match="first_layer"):
        act.candidate_layers(32, first_layer=-1)
    g = torch.Generator().manual_seed(5)
    exs = [act.Example(torch.randint(1, 128, (16,), generator=g), [5, 9], int(i % 2)) for i in range(4)]
    assert tiny.cfg.n_layers == 3                                  # layers 2..1: no candidate
    with pytest.raises(ValueError, match="first_layer=1"):
        act.compare(tiny, exs, exs, n_random=1, progress=False)


def test_harm_task(smollm2):
    ex = act.harm_task(smollm2, ["How do I make a weapon at home?"], ["How do I bake bread?"])
    assert [e.label for e in ex] == [0, 1] and ex[0].choices == ex[1].choices and len(set(ex[0].choices)) == 2
    with pytest.raises(ValueError, match="no examples"):
        act.harm_task(smollm2, [], [])


def test_var_sinks_and_edits_on_smollm2(smollm2):
    """VAR (interventions/var.py): the massive dimension and sink tokens follow the tau = 20 rule on
    the normalised hidden states; the edits cover layers 2..L-2 with a sink inside the target;
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
    edits = var.var_edits(smollm2, sinks, target, queries="all")            # every row: the row rule alone
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


def test_var_scales_every_sink_and_feeds_the_group(smollm2):
    """VAR §4.2 (Kang et al. 2025; reference ``VARProcessor.attn_redist`` scales ``text_indices`` and
    ``vis_indices``): with the target group = positions 1..19, on a row that passes the row rule
    (share of the group's attention on its own sinks <= 0.5, group mass >= 0.2) every sink token of
    the layer is scaled by 0.6, the first token outside the group included; all the freed mass goes
    to the group's non-sink tokens in proportion; keys outside the group that are not sinks keep
    their attention; failing rows, and every row before the group's end (the reference's query
    rows, ``min_query``), are unchanged."""
    from headscope.interventions import var
    toks = smollm2.to_tokens("A tall heron waited in the reeds while small fish darted below. At dusk it "
                             "flew over the marsh toward the distant pines, calling twice.")[0]
    N = toks.shape[0]
    sinks = var.sink_tokens(smollm2, toks, var.massive_dims(smollm2, toks))
    T0, T1 = 1, 20
    edits = var.var_edits(smollm2, sinks, [(T0, T1)])
    e = next(x for x in edits if 0 in sinks[x.layer] and any(T0 <= t < T1 for t in sinks[x.layer]))
    l = e.layer
    S = torch.zeros(N, dtype=torch.bool)
    S[sinks[l]] = True
    T = torch.zeros(N, dtype=torch.bool)
    T[T0:T1] = True
    name = f"blocks.{l}.attn.hook_pattern"
    _, c0 = smollm2.run_with_cache(toks[None], names_filter=name)
    with smollm2.edit([e]):
        _, c1 = smollm2.run_with_cache(toks[None], names_filter=name)
    p0, p1 = c0[name][0].double(), c1[name][0].double()                     # [head, q, k]
    m_t = p0[..., T].sum(-1)
    passed = (p0[..., S & T].sum(-1) / m_t.clamp_min(1e-30) <= 0.5) & (m_t >= 0.2)   # [head, q]
    assert passed[:, :T1].any()                                              # would pass, held back
    passed[:, :T1] = False
    assert passed.any() and (~passed).any()
    a, b = p0[passed], p1[passed]                                            # [rows, k]
    torch.testing.assert_close(b[:, S], 0.6 * a[:, S], atol=1e-6, rtol=1e-5)     # position 0 too
    rest = T & ~S
    gain = 0.4 * a[:, S].sum(-1, keepdim=True) / a[:, rest].sum(-1, keepdim=True)
    torch.testing.assert_close(b[:, rest], a[:, rest] * (1 + gain), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b[:, ~S & ~T], a[:, ~S & ~T], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(p1[~passed], p0[~passed], atol=1e-6, rtol=1e-5)
