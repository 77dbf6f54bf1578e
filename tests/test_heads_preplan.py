"""Preplan / anchor tokens (heads/preplan.py): planted attention patterns on a tiny model (a local
head with a known sawtooth, a global head attending to known anchors), and a small SmolLM2 run."""
import math

import pytest
import torch

import headscope as hs
from headscope.heads import HeadScores
from headscope.heads.preplan import Preplan, PreplanResult, _top_frac, middle_layers

P, T, CH = 6, 40, 5                     # prompt length, response length, chunk length
N = P + T
FAR = 12                                # chunk starts look this far back (> W = 10)
STARTS = [P + c for c in range(0, T, CH) if P + c >= FAR]     # absolute positions that look back FAR
ANCHORS = [P + 3, P + 17]               # absolute positions of the planted anchors


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted_pattern(p, hook):
    """Layer 1 of tiny-llama (the only middle-third layer of 3): head 0 local (previous token, but
    chunk starts look FAR back), head 1 global (0.9 on position 0, 0.1 shared by visible anchors),
    heads 2 and 3 uniform."""
    out = torch.zeros_like(p)                                                   # [1, H, N, N]
    for i in range(N):
        out[0, 0, i, i - FAR if i in STARTS else max(i - 1, 0)] = 1.0
        vis = [a for a in ANCHORS if a <= i]
        out[0, 1, i, 0] = 0.9 if vis else 1.0
        for a in vis:
            out[0, 1, i, a] = 0.1 / len(vis)
        out[0, 2:, i, :i + 1] = 1.0 / (i + 1)
    return out


@pytest.fixture(scope="module")
def planted():
    m = hs.load("tiny-llama")
    ids = torch.randint(1, 128, (N,), generator=torch.Generator().manual_seed(0))
    return m, ids


def run(planted, **kw):
    m, ids = planted
    with m.hooks([("blocks.1.attn.hook_pattern", planted_pattern)]):
        return Preplan(**kw).analyze(m, ids[:P], ids[P:])


def test_middle_layers():
    assert middle_layers(30) == [10, 12, 15, 17, 19]
    assert middle_layers(18) == [6, 7, 9, 10, 11]
    assert middle_layers(3) == [1]
    assert all(10 <= l < 20 for l in middle_layers(30, 8))


def test_local_and_global_heads_and_span(planted):
    r = run(planted)
    assert r.layers == [1]
    assert r.local_heads == [(1, 0)] and r.global_heads == [(1, 1)]     # 30% of 4 heads -> 1 each
    t = torch.arange(P, N).float()
    expect0 = torch.tensor([FAR if i in STARTS else 1.0 for i in range(P, N)]).mean()
    expect1 = torch.tensor([0.9 * i + sum(0.1 / max(1, len([a for a in ANCHORS if a <= i])) * (i - a)
                                          for a in ANCHORS if a <= i) + (0.1 * i if not any(a <= i for a in ANCHORS) else 0)
                            for i in range(P, N)]).mean()
    assert float(r.span[1, 0]) == pytest.approx(float(expect0), rel=1e-4)
    assert float(r.span[1, 1]) == pytest.approx(float(expect1), rel=1e-4)
    assert float(r.span[1, 2]) == pytest.approx(float((t / 2).mean()), rel=1e-4)


def test_waad_and_preplan_tokens(planted):
    r = run(planted)
    big = [s - P for s in STARTS]
    expect = torch.tensor([10.0 if t in big else 1.0 for t in range(T)])      # min(FAR, W) = 10
    torch.testing.assert_close(r.waad, expect)
    jumps = sorted({b - 1 for b in big} | set(big))                          # |WAAD_t - WAAD_t+1| = 9 there
    assert math.isnan(float(r.delta[-1]))
    assert sorted(torch.nonzero(r.delta > 1).flatten().tolist()) == jumps
    # default 40% of 39 deltas = 16 tokens: all the jumps plus ties
    assert int(r.preplan.sum()) == round(0.4 * (T - 1)) and r.preplan[jumps].all()
    # with the fraction that matches the planted jumps exactly, exactly them
    r2 = run(planted, token_frac=len(jumps) / (T - 1))
    assert torch.nonzero(r2.preplan).flatten().tolist() == jumps


def test_fai_and_anchor_tokens(planted):
    r = run(planted)
    a = [x - P for x in ANCHORS]
    assert torch.isnan(r.fai[-10:]).all() and torch.isfinite(r.fai[:-10]).all()   # t - s >= 10 needs a query
    others = [t for t in range(T - 10) if t not in a]
    assert (r.fai[others] == 0).all() and (r.fai[a] > 0.04).all()
    assert r.anchor[a].all() and not r.anchor[-10:].any()
    assert int(r.anchor.sum()) == round(0.4 * (T - 10))
    r2 = run(planted, token_frac=2 / (T - 10))
    assert torch.nonzero(r2.anchor).flatten().tolist() == a
    # anchor 3: queries t in [13, 40) (response positions) see both anchors from t >= 17, so
    # FAI = mean over t of (0.1 if t < 17 else 0.05)
    ts = range(a[0] + 10, T)
    assert float(r.fai[a[0]]) == pytest.approx(sum(0.1 if t < a[1] else 0.05 for t in ts) / len(ts), rel=1e-4)


def test_fai_on_a_sliding_window_counts_queries_that_do_not_see_the_key():
    """FAI_s is the mean over every t in [s + a, s + b]; on a layer whose window (8 on tiny-mistral)
    is narrower than b, the queries that cannot see s count with attention 0 (the old code divided
    by the number of queries that see s)."""
    m = hs.load("tiny-mistral")
    ids = torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(1))
    pats = {}
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda p, hook: pats.__setitem__(hook.layer(), p[0].detach()))
             for l in range(m.cfg.n_layers)]
    a, b, P = 2, 20, 6
    with m.hooks(hooks):
        r = Preplan(fai_window=(a, b)).analyze(m, ids[:P], ids[P:])
    N = len(ids)
    ref = torch.full((N - P,), float("nan"))
    for s in range(P, N):
        ts = [t for t in range(s + a, min(s + b, N - 1) + 1)]
        if ts:
            ref[s - P] = sum(float(pats[l][h, ts, s].mean()) for l, h in r.global_heads) / len(r.global_heads)
    assert float(pats[r.global_heads[0][0]][0, 20, 5]) == 0.0       # the window hides s = 5 from t = 20
    torch.testing.assert_close(r.fai, ref, equal_nan=True, rtol=1e-4, atol=1e-6)


def test_rendering(planted):
    r = run(planted)
    html = r.html(full=True)
    assert html.startswith("<!doctype html>") and html.count("<span title=") == T
    assert html.count("background:#ffc58f") + html.count("background:#c9a0f0") >= int(r.preplan.sum())
    fig = r.plot()
    names = [t.name for t in fig.data]
    assert names == ["WAAD", "preplan", "FAI", "anchor"] and len(fig.data[1].x) == int(r.preplan.sum())
    df = r.to_frame()
    assert list(df.columns) == ["pos", "token", "waad", "delta", "fai", "preplan", "anchor"] and len(df) == T
    assert 0.0 <= r.coupling(1) <= 1.0 and 0.0 <= r.coupling(1, preplan=False) <= 1.0


def test_score_and_errors(planted, tmp_path):
    m, ids = planted
    with m.hooks([("blocks.1.attn.hook_pattern", planted_pattern)]):
        res = Preplan().score(m, [(ids[:P], ids[P:])], progress=False)
    assert res.shape == (3, 4) and res.method == "preplan"
    assert bool(res.extra["local_heads"][1, 0]) and bool(res.extra["global_heads"][1, 1])
    assert int(res.extra["local_heads"].sum()) == 1 and res.extra["waad"].shape == (T,)
    assert isinstance(res.details[0], PreplanResult)
    back = HeadScores.load(res.save(tmp_path / "preplan"))
    torch.testing.assert_close(back.extra["fai"], res.extra["fai"], equal_nan=True)
    assert back.extra["preplan"].dtype == torch.bool
    with pytest.raises(ValueError, match="FAI needs"):
        Preplan().analyze(m, ids[:P], ids[P:P + 8])
    with pytest.raises(ValueError, match="no prompts"):
        Preplan().score(m, [], progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        Preplan().analyze(m, "a prompt", ids[P:])
    with pytest.raises(ValueError, match="allows"):
        Preplan().analyze(m, ids[:P], torch.ones(600, dtype=torch.long))


def test_top_frac():
    x = torch.tensor([0.1, float("nan"), 0.5, 0.3, 0.2, float("nan")])
    assert _top_frac(x, 0.5).tolist() == [False, False, True, True, False, False]
    assert not _top_frac(x, 0.0).any()


@pytest.mark.slow
def test_smollm2_preplan(smollm2):
    m = smollm2
    prompt = "A shop sells 3 pens for 2 dollars. How much do 12 pens cost? Think step by step."
    response = ("First, find how many groups of 3 pens are in 12 pens: 12 / 3 = 4 groups. Each group costs "
                "2 dollars, so 4 groups cost 4 x 2 = 8 dollars. The answer is 8 dollars.")
    r = Preplan().analyze(m, prompt, response)
    T_ = len(r.tokens)
    assert T_ > 30 and "".join(r.tokens) == response
    assert r.layers == [10, 12, 15, 17, 19] and len(r.local_heads) == len(r.global_heads) == 14
    assert max(float(r.span[x]) for x in r.local_heads) < min(float(r.span[x]) for x in r.global_heads)
    assert (r.waad >= 0).all() and (r.waad <= 10 + 1e-4).all()
    ok = torch.isfinite(r.fai)
    assert int(ok.sum()) == T_ - 10 and (r.fai[ok] >= 0).all() and (r.fai[ok] <= 1).all()
    assert int(r.preplan.sum()) == round(0.4 * (T_ - 1)) and int(r.anchor.sum()) == round(0.4 * (T_ - 10))


def test_response_is_cut_at_an_end_of_turn_token(gemma3):
    """Gemma-3 ends a chat turn with <end_of_turn>, which is not its EOS: a generated response stops
    there (it used to keep it and what followed); a newline is no stop for a reasoning response."""
    from types import SimpleNamespace
    from headscope.heads.common import end_of_turn_ids
    tok = gemma3.tokenizer
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot != tok.eos_token_id and eot in end_of_turn_ids(gemma3)
    assert tok.encode("\n", add_special_tokens=False)[0] not in end_of_turn_ids(gemma3)
    tail = torch.tensor([[11, 12, eot, 13, tok.eos_token_id]])
    stub = SimpleNamespace(tokenizer=tok, model=gemma3.model,
                           generate=lambda ids, max_new_tokens: torch.cat([ids, tail], 1))
    prompt = torch.tensor([2, 100, 200])
    ids, resp = Preplan().generate(stub, prompt)
    assert ids.tolist() == prompt.tolist() and resp.tolist() == [11, 12]
