"""Batched ACT and VAR (interventions/act.py, var.py, redistribute.py): the batched paths give what
the probe's ScaleKeys edits give one example at a time, on tiny-llama; the redistribution equals its
formula on a hand-built row; the shipped tasks have disjoint splits."""
import pytest
import torch

import headscope as hs
from headscope.interventions import act, tasks, var
from headscope.interventions.redistribute import redistribute_rows


@pytest.fixture(scope="module")
def tiny():
    return hs.load("tiny-llama")


def _examples(n=10):
    """Token-only examples of several lengths (left padding differs inside a batch)."""
    t = tasks.token_task(n, length=12, seed=3)
    return [act.Example(e.tokens[: 7 + i % 5], e.choices, e.label) for i, e in enumerate(t.examples)]


def test_redistribute_rows_hand_built():
    """One row [0.5, 0.2, 0.2, 0.1], sinks {0}, factor 0.4: the sink keeps 0.2, the freed 0.3 goes to
    the others in proportion (x 1 + 0.3 / 0.5); a second example with sinks {3} differs; VAR's row
    rule leaves a row alone when the sink share of the target is above max_ratio."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1]).view(1, 1, 1, 4).repeat(2, 1, 1, 1)
    src = torch.tensor([[[True, False, False, False]], [[False, False, False, True]]])
    out = redistribute_rows(p, src, None, 0.4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.2, 0.32, 0.32, 0.16]))
    g = 1 + 0.06 / 0.9                           # sink 0.1 keeps 0.04; 0.06 freed over the other 0.9
    torch.testing.assert_close(out[1, 0, 0], torch.tensor([0.5 * g, 0.2 * g, 0.2 * g, 0.04]))
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 1, 1))
    tgt = torch.tensor([[[True, True, False, False]]]).repeat(2, 1, 1)        # group = keys 0, 1
    kept = redistribute_rows(p, src, tgt, 0.6, max_ratio=0.5, min_target=0.2)
    torch.testing.assert_close(kept[0], p[0])        # sink share 0.5 / 0.7 > 0.5: unchanged
    moved = redistribute_rows(p, src, tgt, 0.6, max_ratio=0.8, min_target=0.2)
    torch.testing.assert_close(moved[0, 0, 0], torch.tensor([0.3, 0.4, 0.2, 0.1]))


def test_act_sweep_and_hooks_equal_scalekeys(tiny):
    """task_pass: the sinks equal act.hidden_sinks per example; the one-head sweep's margins equal
    the ScaleKeys edit run alone on each example; the batched hook path equals it for a head set."""
    exs = _examples()
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    layers = list(range(1, L - 1))
    p = act.task_pass(tiny, exs, layers, batch_size=4, progress=False)
    assert p.sweep.shape == (L, H, len(exs))
    for ex, s in zip(exs, p.sinks):
        lib = {k: v for k, v in act.hidden_sinks(tiny, ex.tokens).items() if k[0] in layers}
        assert lib == s
    moved = 0.0
    for l in layers:
        for h in range(H):
            _, m = act.evaluate_heads(tiny, exs, p.sinks, [(l, h)], via="edits")
            torch.testing.assert_close(p.sweep_margin[l, h], m, atol=2e-5, rtol=1e-4)
            moved = max(moved, float((m - p.margin).abs().max()))
    assert moved > 1e-3, "calibration should change some margin, or the comparison proves nothing"
    heads = [(l, h) for l in layers for h in range(0, H, 2)]
    c1, m1 = act.evaluate_heads(tiny, exs, p.sinks, heads, via="edits")
    c2, m2 = act.evaluate_heads(tiny, exs, p.sinks, heads, batch_size=3)
    torch.testing.assert_close(m2, m1, atol=2e-5, rtol=1e-4)
    assert torch.equal(c1, c2)


def test_act_online_sinks_come_from_the_calibrated_forward(tiny):
    """ACT's reference (``atten_process_eval``, GATECH-EIC/ACT) finds a calibrated head's hidden sinks
    in the attention of the forward being calibrated: with heads on every layer, the sinks used at
    layer l are ``hidden_sinks`` of the model with the layers below l calibrated, which here differ
    from the unedited model's on some example; the batched online hooks equal the online edits."""
    exs = _examples()
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    heads = [(l, h) for l in range(L) for h in range(H)]
    differs = False
    for ex in exs:
        on = act.online_act_edits(tiny, ex.tokens, heads, beta=0.4, threshold=0.1)
        used = {(e.layer, e.head): [a for a, _ in e.keys] for e in on}
        for l in range(L):
            with tiny.edit([e for e in on if e.layer < l]):
                expect = {k: v for k, v in act.hidden_sinks(tiny, ex.tokens, 0.1).items() if k[0] == l and v}
            assert {k: v for k, v in used.items() if k[0] == l} == expect
        unedited = {k: v for k, v in act.hidden_sinks(tiny, ex.tokens, 0.1).items() if v}
        differs |= used != unedited
    assert differs, "online and unedited sinks agree everywhere: the comparison proves nothing"
    _, m1 = act.evaluate_heads(tiny, exs, None, heads, via="edits")
    _, m2 = act.evaluate_heads(tiny, exs, None, heads, batch_size=3)
    torch.testing.assert_close(m2, m1, atol=2e-5, rtol=1e-4)


def test_select_from_sweep_keeps_gains(tiny):
    exs = _examples()
    L = tiny.cfg.n_layers
    p = act.task_pass(tiny, exs, range(1, L - 1), batch_size=5, progress=False)
    heads, gain = act.select_from_sweep(p, range(1, L - 1))
    assert all(gain[l, h] > 0 for l, h in heads)
    assert len(heads) == int((gain > 0).sum())
    top, _ = act.select_from_sweep(p, range(1, L - 1), top_k=1)
    assert len(top) == min(1, len(heads))


@pytest.fixture(scope="module")
def deep():
    """A seeded random 5-layer Llama (tiny-llama has 3 layers; VAR edits layers 2..L-2), queries and
    keys scaled x8 so attention is peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, prm in hf.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                prm.mul_(8.0)
    return hs.load(hf)


def test_var_hooks_equal_scalekeys(deep):
    """evaluate_var's batched hooks equal var_edits' ScaleKeys run one example at a time, for given
    sink tokens and each example's own target span (all heads, and a head subset); VAR moves the
    margins, so the comparison is not between two unedited runs."""
    exs = [tasks.ContextExample(e.tokens, e.choices, e.label, target=(1, len(e.tokens) - 1))
           for e in _examples(6)]
    L = deep.cfg.n_layers
    sinks = [{l: [1, 2 + (i % 3)] for l in range(2, L)} for i in range(len(exs))]
    base = act.task_pass(deep, exs, [1], sweep=False, progress=False).margin
    for heads in (None, [(2, 0), (3, 1), (3, 3)]):
        _, m1 = var.evaluate_var(deep, exs, sinks, heads, rho=1.0, min_target=0.0, via="edits", queries="all")
        _, m2 = var.evaluate_var(deep, exs, sinks, heads, rho=1.0, min_target=0.0, batch_size=4, queries="all")
        torch.testing.assert_close(m2, m1, atol=2e-5, rtol=1e-4)
        assert float((m1 - base).abs().max()) > 1e-3
    for queries in ("all", "after_target"):                                           # the paper's row rule
        _, m1 = var.evaluate_var(deep, exs, sinks, None, via="edits", queries=queries)
        _, m2 = var.evaluate_var(deep, exs, sinks, None, batch_size=3, queries=queries)
        torch.testing.assert_close(m2, m1, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="queries='before'"):
        var.evaluate_var(deep, exs, sinks, None, via="edits", queries="before")


def test_var_sinks_found_in_the_edited_pass(deep):
    """sinks="edited" (the reference: each layer's sink tokens from its input in the pass being
    edited) equals a step-by-step reference built from ScaleKeys: layer 2's sinks from the unedited
    input, then layer 3's from the input of a forward with layer 2 edited, then both edits. Edited
    sinks differ from the unedited forward's (sinks_from="unedited") on this model."""
    exs = [tasks.ContextExample(e.tokens, e.choices, e.label, target=(1, len(e.tokens) - 1))
           for e in _examples(6)]
    dims = list(range(deep.cfg.d_model))
    # tau: the median of each token's largest normalised |value| at layer 3's input, so about half
    # the tokens are sinks and an edit below can move some across it
    x = torch.cat([var._normalised(var._resid(deep, e.tokens)[3]).abs().amax(-1)[1:] for e in exs])
    tau = float(x.median())
    kw = dict(rho=1.0, min_target=0.0, queries="all")
    ref_sinks, unedited = [], []
    for e in exs:
        s2 = var.sink_tokens(deep, e.tokens, dims, tau)[2]
        with torch.no_grad(), deep.edit(var.var_edits(deep, {2: s2}, [e.target], **kw)):
            _, cache = deep.run_with_cache(e.tokens[None], names_filter="blocks.3.hook_resid_pre")
        s3 = torch.nonzero(var._normalised(cache["blocks.3.hook_resid_pre"][0])[:, dims].abs().amax(-1) > tau)
        ref_sinks.append({2: s2, 3: s3.flatten().tolist()})
        unedited.append({l: v for l, v in var.sink_tokens(deep, e.tokens, dims, tau).items() if l in (2, 3)})
    assert ref_sinks != unedited                          # the layer-2 edit moved some layer-3 sinks
    _, m_ref = var.evaluate_var(deep, exs, ref_sinks, None, via="edits", **kw)
    _, m_live = var.evaluate_var(deep, exs, "edited", None, batch_size=4, dims=dims, tau=tau, **kw)
    _, m_old = var.evaluate_var(deep, exs, unedited, None, batch_size=4, **kw)
    torch.testing.assert_close(m_live, m_ref, atol=2e-5, rtol=1e-4)
    assert float((m_live - m_old).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="via='edits' needs the sink positions"):
        var.evaluate_var(deep, exs, "edited", None, via="edits", dims=dims, tau=tau)
    with pytest.raises(ValueError, match="needs the massive dimensions"):
        var.evaluate_var(deep, exs, "edited", None)


def test_var_edits_hold_back_the_rows_before_the_target_end(deep):
    """var_edits(queries="after_target") is ScaleKeys with min_query = the group's end, inside the
    kernels: the logits at positions before it are the unedited model's, and every logit equals the
    pattern-hook path's (``var_hooks``, rows from ``query_rows``), which is not the every-row edit."""
    tokens = torch.arange(3, 19)
    N, L, H = len(tokens), deep.cfg.n_layers, deep.cfg.n_heads
    sinks = {l: [0, 3] for l in range(2, L)}
    after = var.var_edits(deep, sinks, [(2, 9)], rho=1.0, min_target=0.0)
    every = var.var_edits(deep, sinks, [(2, 9)], rho=1.0, min_target=0.0, queries="all")
    assert after and all(e.min_query == 9 for e in after) and all(e.min_query is None for e in every)
    ex = tasks.ContextExample(tokens, [5, 6], 0, target=(2, 9))
    hooks = var.var_hooks([ex], [sinks], None, [0], N, L, H, rho=1.0, min_target=0.0)
    with torch.no_grad():
        plain = deep(tokens[None])
        with deep.edit(after):
            la = deep(tokens[None])
        with deep.edit(every):
            le = deep(tokens[None])
        lh = deep.run_with_hooks(tokens[None], fwd_hooks=hooks)
    torch.testing.assert_close(la[:, :9], plain[:, :9])
    torch.testing.assert_close(la, lh, atol=2e-5, rtol=1e-4)
    assert float((la[:, 9:] - plain[:, 9:]).abs().max()) > 1e-3
    assert float((la - le).abs().max()) > 1e-3


def test_var_hooks_change_only_rows_after_the_target():
    """The reference's query rule (VisAttnSink ``attn_redist``: prompt rows ``im + pa <= q`` only): with
    queries="after_target" the hook leaves every row before the target's end unchanged and gives the
    rows after it exactly what queries="all" gives; the sink outside the group (key 0) is scaled too."""
    exs = [tasks.ContextExample(torch.arange(10, 10 + n), [5, 6], 0, target=(2, n - 3)) for n in (9, 12)]
    N = 12
    pad = [N - len(e.tokens) for e in exs]
    sinks = [{2: [0, 3]}, {2: [0, 4]}]                                 # key 0 outside the group, one inside
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 2, N, N, generator=g), -1)       # [B, H, Q, K]
    run = lambda q: var.var_hooks(exs, sinks, None, pad, N, 5, 2, rho=1.0, min_target=0.0, queries=q)[0][1](p, None)
    after, every = run("after_target"), run("all")
    for b, ex in enumerate(exs):
        end = pad[b] + ex.target[1]
        torch.testing.assert_close(after[b, :, :end], p[b, :, :end])
        torch.testing.assert_close(after[b, :, end:], every[b, :, end:])
        torch.testing.assert_close(after[b, :, end:, pad[b]], 0.6 * p[b, :, end:, pad[b]])     # key 0
    assert not torch.allclose(every[:, :, :pad[1] + exs[1].target[1]], p[:, :, :pad[1] + exs[1].target[1]])


def test_splits_are_disjoint():
    t = tasks.token_task(60, seed=1)
    sp = t.splits(0, n_train=10, n_calibration=20, n_test=30)
    ids = {k: {id(e) for e in v} for k, v in sp.items()}
    assert not (ids["train"] & ids["calibration"]) and not (ids["calibration"] & ids["test"])
    assert sp == t.splits(0, n_train=10, n_calibration=20, n_test=30)
    with pytest.raises(ValueError, match="do not fit"):
        t.splits(0, n_train=10, n_calibration=20, n_test=31)


@pytest.mark.slow
def test_context_qa_and_sentiment_chat_tasks(smollm2):
    """Context QA: the target span covers the notes, the right animal's token is among the choices and
    stated in the context; sentiment-chat: 2,999 examples, labels from the lexicon's sign."""
    t = tasks.context_qa_task(smollm2, 6, n_facts=4, n_passages=1, seed=0)
    for ex in t.examples:
        a, b = ex.target
        ctx = smollm2.tokenizer.decode(ex.tokens[a:b])
        assert ctx.count("Note: ") == 4 and len(set(ex.choices)) == 4
        assert int(ex.choices[ex.label]) in ex.tokens[a:b].tolist()
        assert "Question" not in ctx
    s = tasks.load_task("sentiment-chat", smollm2)
    assert len(s.examples) == 2999
    assert sum(e.label == 0 for e in s.examples) == 1363
