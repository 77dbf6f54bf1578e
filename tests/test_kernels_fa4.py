"""The optional FlashAttention-4 backend (kernels/fa4.py).

On the CPU: the masses it derives from a row LSE (sink, spans, recent, window distance) equal the
eager reference over dtypes, GQA ratios, windows, odd lengths and decode with key_pos0; its
``attention`` and the probe's dispatch run through a pure-PyTorch stand-in for
``flash_attn.cute.flash_attn_func`` (same signature, results from ``reference.attention``);
``supports`` declines what it must; without FlashAttention-4 nothing changes and nothing is said.
On a Hopper/Blackwell GPU with FlashAttention-4 installed: the real backend against the reference.
"""
import logging
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import headscope as hs
from headscope.kernels import LayerEdits, StatRequest, fa4, reference
from headscope.kernels.spec import expected_keys

MASSES = StatRequest(sink_k=3, spans=((2, 6), (9, 30)), recent=4, window_distance=6)


def standin(calls=None, fail=False):
    """A stand-in for flash_attn.cute.flash_attn_func: q, k, v [B, N, H|G, d] -> (out [B, N, H, d],
    lse [B, H, N] fp32 or None), computed by reference.attention (bottom-right aligned masks)."""
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                        softcap=0.0, return_lse=False, **kw):
        if fail:
            raise RuntimeError("stand-in told to fail")
        assert learnable_sink is None and not softcap and not kw, kw
        left, right = window_size
        assert right in (None, 0) and (left is None or causal), window_size
        if calls is not None:
            calls.append((tuple(q.shape), tuple(k.shape), causal, window_size, return_lse))
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        out, st, _ = reference.attention(qh, kh, vh, scaling=scale, causal=causal,
                                         sliding_window=None if left is None else left + 1, stats=StatRequest())
        return out.transpose(1, 2), (st["lse"] if return_lse else None)
    return flash_attn_func


@pytest.fixture
def fake_fa4(monkeypatch):
    """The stand-in as FlashAttention-4 on any device (restored afterwards); yields its call log."""
    calls = []
    monkeypatch.delenv("HEADSCOPE_NO_FA4", raising=False)
    for mod in modules():
        mod.set_impl(standin(calls), any_device=True)
    yield calls
    for mod in modules():
        mod.set_impl(None)


@pytest.fixture
def fake_fa4_fp32(fake_fa4, monkeypatch):
    """``fake_fa4`` taking fp32 and head dim 16 as well (the tiny test models)."""
    for mod in modules():
        monkeypatch.setattr(mod, "DTYPES", (torch.bfloat16, torch.float16, torch.float32))
        monkeypatch.setattr(mod, "HEAD_DIMS", frozenset({16, 64, 128, 256}))
    return fake_fa4


def modules():
    """kernels.fa4 as this file imports it and as the live probe imports it (pytest may import the
    package under two names)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    live = sys.modules[ALL_ATTENTION_FUNCTIONS["headscope"].__module__]
    return list({id(m): m for m in (fa4, live.fa4)}.values())


def live_attention_module():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return sys.modules[ALL_ATTENTION_FUNCTIONS["headscope"].__module__]


def make(B, H, G, Q, K, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Q, d, generator=g) * 2).to(dtype)
    k = (torch.randn(B, G, K, d, generator=g) * 2).to(dtype)
    v = torch.randn(B, G, K, d, generator=g).to(dtype)
    return q, k, v


def close(a, b, tol, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, (what, err)


# --------------------------------------------------------------------------- masses from the LSE
@settings(deadline=None, max_examples=30)
@given(B=st.integers(1, 2), G=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 4]), K=st.integers(1, 45),
       decode=st.booleans(), window=st.sampled_from([None, 1, 3, 9]), pos0=st.integers(-3, 12),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), block=st.sampled_from([1, 4, 7, 32]),
       chunk=st.sampled_from([None, 600]), req=st.sampled_from([
           MASSES, StatRequest(sink_k=1), StatRequest(recent=1), StatRequest(window_distance=50),
           StatRequest(spans=((0, 1), (5, 200)), recent=9), StatRequest(sink_k=7, window_distance=2)]),
       seed=st.integers(0, 1000), exact_mm=st.booleans())
def test_masses_from_lse_equal_reference(B, G, ratio, K, decode, window, pos0, dtype, block, chunk, req, seed,
                                         exact_mm):
    """Given the reference's LSE, ``masses_from_lse`` gives the reference's statistics (fp32 math on
    the same inputs, summed in another order: within 3e-5 of masses in [0, 1], 3e-5 * W for the
    windowed distance).
    ``pos0`` shifts the token positions of the cache (key_pos0: a sliding cache, or a decode step);
    ``exact_mm`` False takes the band sums without a matmul (what runs when TF32 is switched on)."""
    H = G * ratio
    Q = 1 if decode else K
    q, k, v = make(B, H, G, Q, K, 8, dtype, seed)
    kpos = torch.full((B,), pos0, dtype=torch.long)
    kpos[0] = max(pos0 - 2, -3)                        # two sequences, two offsets
    _, ref, _ = reference.attention(q, k, v, scaling=8 ** -0.5, sliding_window=window, key_pos0=kpos, stats=req)
    saved = fa4._exact_fp32_matmul
    fa4._exact_fp32_matmul = (lambda: exact_mm)
    try:
        got = fa4.masses_from_lse(q, k, ref["lse"], scaling=8 ** -0.5, sliding_window=window, key_pos0=kpos,
                                  stats=req, block=block, chunk_bytes=chunk)
    finally:
        fa4._exact_fp32_matmul = saved
    assert set(got) == set(ref) == set(expected_keys(req))
    for name in ref:
        tol = 3e-5 * (req.window_distance if name == "window_distance" else 1)
        close(got[name], ref[name], tol, name)
        assert got[name].dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_rows_stay_nan(bad):
    """A NaN or inf in a query makes that row NaN in every statistic, as in the reference (spec)."""
    q, k, _ = make(1, 2, 1, 9, 9, 8, torch.float32, 4)
    q[0, 1, 4, 0] = bad
    req = StatRequest(sink_k=2, spans=((1, 3),), recent=3, window_distance=4)
    _, ref, _ = reference.attention(q, k, k, scaling=0.3, stats=req)
    got = fa4.masses_from_lse(q, k, ref["lse"], scaling=0.3, stats=req, block=4)
    for name in ref:
        assert torch.isnan(ref[name][0, 1, 4]).all(), name
        torch.testing.assert_close(got[name], ref[name], equal_nan=True, atol=1e-5, rtol=0, msg=name)


def test_masses_from_lse_refuses_what_needs_full_rows():
    q, k, _ = make(1, 2, 1, 5, 5, 8, torch.float32, 0)
    lse = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="entropy"):
        fa4.masses_from_lse(q, k, lse, scaling=1.0, stats=StatRequest(entropy=True, sink_k=1))
    with pytest.raises(ValueError, match="causal"):
        fa4.masses_from_lse(q, k, lse, scaling=1.0, causal=False, stats=StatRequest(recent=2))


# --------------------------------------------------------------------------- the backend, stand-in
@pytest.mark.parametrize("case", [
    dict(B=2, H=4, G=2, Q=37, K=37, window=None, pos0=0),           # prefill
    dict(B=1, H=4, G=1, Q=29, K=29, window=5, pos0=0),              # sliding window, MQA
    dict(B=2, H=4, G=4, Q=1, K=23, window=None, pos0=7),            # decode, sinks beyond the cache start
    dict(B=1, H=6, G=2, Q=1, K=40, window=8, pos0=0),               # decode in a window: keys sliced
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_attention_with_standin_equals_reference(fake_fa4, case, dtype):
    """``fa4.attention`` (stand-in FA4) returns the reference's output and masses, with the FA4
    arguments of the contract: [B, N, H, d] layout, bottom-right window (W - 1, 0), LSE only when
    statistics are wanted, and a decode step sent without a mask over the last W keys."""
    B, H, G, Q, K, w = case["B"], case["H"], case["G"], case["Q"], case["K"], case["window"]
    q, k, v = make(B, H, G, Q, K, 64, dtype, 3)
    kpos = torch.full((B,), case["pos0"], dtype=torch.long)
    out_ref, ref, _ = reference.attention(q, k, v, scaling=0.125, sliding_window=w, key_pos0=kpos, stats=MASSES)
    out, st = fa4.attention(q, k, v, scaling=0.125, sliding_window=w, key_pos0=kpos, stats=MASSES)
    assert out.shape == (B, H, Q, 64) and out.dtype == dtype
    close(out, out_ref, 2e-3, "out")              # the stand-in is the reference: one rounding apart
    assert set(st) == set(ref)
    for name in ref:
        close(st[name], ref[name], 1e-5 * (6 if name == "window_distance" else 1), name)
    shape_q, shape_k, causal, win, ret = fake_fa4[-1]
    assert shape_q == (B, Q, H, 64) and ret is True
    if Q == 1:
        assert not causal and win == (None, None) and shape_k == (B, min(K, w or K), G, 64)
    else:
        assert causal and win == ((w - 1, 0) if w else (None, None)) and shape_k == (B, K, G, 64)
    out2, st2 = fa4.attention(q, k, v, scaling=0.125, sliding_window=w)
    assert st2 == {} and fake_fa4[-1][-1] is False
    close(out2, out_ref, 2e-3, "plain out")


def test_non_causal_plain_call(fake_fa4):
    q, k, v = make(1, 2, 1, 9, 9, 64, torch.bfloat16, 1)
    out_ref, _, _ = reference.attention(q, k, v, scaling=0.1, causal=False)
    out, st = fa4.attention(q, k, v, scaling=0.1, causal=False)
    close(out, out_ref, 1e-6, "out")
    assert fake_fa4[-1][2] is False


def test_lse_layouts_are_checked():
    lse = torch.randn(2, 3, 5)
    assert torch.equal(fa4._lse_bhq(lse, 2, 3, 5), lse)
    assert torch.equal(fa4._lse_bhq(lse.transpose(1, 2), 2, 3, 5), lse)
    with pytest.raises(fa4.Unsupported, match="shape"):
        fa4._lse_bhq(torch.randn(2, 3, 4), 2, 3, 5)
    with pytest.raises(fa4.Unsupported, match="no LSE"):
        fa4._lse_bhq(None, 2, 3, 5)


# --------------------------------------------------------------------------- what it declines
def test_supports_declines_what_it_must(fake_fa4):
    q, k, v = make(1, 4, 2, 12, 12, 64, torch.bfloat16, 0)
    ok = dict(causal=True, sliding_window=None, key_padding=None, softcap=None, sinks=False, grad=False)
    assert fa4.supports(q, k, v, None, None, **ok) is None
    assert fa4.supports(q, k, v, MASSES, None, **ok) is None
    assert fa4.supports(q, k, v, None, None, **{**ok, "sliding_window": 4}) is None
    cases = [
        (dict(stats=StatRequest(sink_k=2, entropy=True)), "entropy"),
        (dict(stats=StatRequest(distance=True)), "distance"),
        (dict(stats=StatRequest(argmax=True)), "argmax"),
        (dict(stats=StatRequest(received=True)), "received"),
        (dict(edits=LayerEdits(q_scale=torch.ones(4))), "q_scale"),
        (dict(sinks=True), "sinks"),
        (dict(softcap=30.0), "softcap"),
        (dict(key_padding=torch.ones(1, 12, dtype=torch.bool)), "padding"),
        (dict(grad=True), "grad"),
        (dict(stats=MASSES, causal=False), "causal"),
        (dict(causal=False, sliding_window=3), "sliding window"),
        (dict(stats=StatRequest(recent=fa4.MAX_BAND + 1)), "band"),
        (dict(stats=StatRequest(spans=((0, fa4.MAX_SUBSET_KEYS + 1),))), "span"),
        (dict(q=q[:, :, :5]), "1 < Q < K"),
        (dict(q=q.float(), k=k.float(), v=v.float()), "bf16 or fp16"),
        (dict(q=q[..., :48], k=k[..., :48], v=v[..., :48]), "head dims"),
        (dict(k=k[:, :1].expand(1, 3, 12, 64), v=v[:, :1].expand(1, 3, 12, 64)), "multiple"),
    ]
    for change, word in cases:
        kw = {**ok, **change}
        qq, kk, vv = kw.pop("q", q), kw.pop("k", k), kw.pop("v", v)
        stats, edits = kw.pop("stats", None), kw.pop("edits", None)
        reason = fa4.supports(qq, kk, vv, stats, edits, **kw)
        assert reason is not None and word in reason, (change, reason)
        if not kw["grad"]:
            sinks = torch.zeros(4) if kw["sinks"] else None
            with pytest.raises(fa4.Unsupported, match=word.split()[0]):
                fa4.attention(qq, kk, vv, scaling=0.1, causal=kw["causal"], sliding_window=kw["sliding_window"],
                              key_padding=kw["key_padding"], softcap=kw["softcap"], sinks=sinks, stats=stats,
                              edits=edits)


def test_grad_is_declined_by_attention(fake_fa4):
    q, k, v = make(1, 2, 1, 4, 4, 64, torch.bfloat16, 0)
    q.requires_grad_(True)
    with pytest.raises(fa4.Unsupported, match="grad"):
        fa4.attention(q, k, v, scaling=0.1)


def test_failure_of_fa4_is_unsupported():
    fa4.set_impl(standin(fail=True), any_device=True)
    try:
        q, k, v = make(1, 2, 1, 4, 4, 64, torch.bfloat16, 0)
        with pytest.raises(fa4.Unsupported, match="stand-in told to fail"):
            fa4.attention(q, k, v, scaling=0.1)
    finally:
        fa4.set_impl(None)


def test_unavailable_without_fa4_or_when_switched_off(monkeypatch):
    q = torch.zeros(1, 1, 1, 64)
    assert not fa4.available(q)                     # CPU tensor, no stand-in
    assert not fa4.available("cpu")
    fa4.set_impl(standin(), any_device=True)
    try:
        assert fa4.available(q)
        monkeypatch.setenv("HEADSCOPE_NO_FA4", "1")
        assert not fa4.available(q)
    finally:
        fa4.set_impl(None)


# --------------------------------------------------------------------------- the probe's dispatch
def _tokens(n=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=g)


@torch.no_grad()
def test_probe_sends_plain_and_mass_requests_to_fa4(tiny_llama, fake_fa4_fp32, monkeypatch, caplog):
    fake_fa4 = fake_fa4_fp32
    """With FA4 present, a plain forward and a masses-only record run through it and give the same
    logits and statistics as without it (HEADSCOPE_NO_FA4=1); a request with entropy goes to
    headscope's kernels with one message however many layers and calls."""
    m = tiny_llama
    toks = _tokens()
    req = StatRequest(sink_k=2, recent=3, window_distance=4, spans=((1, 5),))
    monkeypatch.setenv("HEADSCOPE_NO_FA4", "1")
    base = m(toks)
    with m.record(req) as rec_ref:
        m(toks)
    with m.record(StatRequest(entropy=True, sink_k=2)) as ent_ref:
        m(toks)
    assert not fake_fa4
    monkeypatch.delenv("HEADSCOPE_NO_FA4")
    got = m(toks)
    n_plain = len(fake_fa4)
    assert n_plain == m.cfg.n_layers and all(c[-1] is False for c in fake_fa4)
    assert torch.allclose(got, base, atol=1e-5)
    with m.record(req) as rec:
        m(toks)
    assert len(fake_fa4) == 2 * n_plain and all(c[-1] is True for c in fake_fa4[n_plain:])
    assert set(rec.names) == set(expected_keys(req))
    for name in rec.names:
        assert torch.allclose(rec.stack(name), rec_ref.stack(name), atol=2e-5), name
    live_attention_module()._declined.clear()
    with caplog.at_level(logging.WARNING, logger="headscope"):
        with m.record(StatRequest(entropy=True, sink_k=2)) as ent:
            m(toks)
            m(toks)
    msgs = [r.getMessage() for r in caplog.records if "FlashAttention-4" in r.getMessage()]
    assert len(msgs) == 1 and "entropy" in msgs[0], msgs
    assert len(fake_fa4) == 2 * n_plain                                  # no FA4 call for those
    n = ent_ref.stack("entropy").shape[-1]                               # two calls recorded: the first
    assert torch.allclose(ent.stack("entropy")[..., :n], ent_ref.stack("entropy"), atol=1e-5)


@torch.no_grad()
def test_failing_fa4_falls_back_once(tiny_llama, monkeypatch, caplog):
    """An FA4 that raises on every call: one message, SDPA's logits."""
    m = tiny_llama
    toks = _tokens(seed=1)
    monkeypatch.setenv("HEADSCOPE_NO_FA4", "1")
    base = m(toks)
    monkeypatch.delenv("HEADSCOPE_NO_FA4")
    for mod in modules():
        mod.set_impl(standin(fail=True), any_device=True)
        monkeypatch.setattr(mod, "DTYPES", (torch.float32,))
        monkeypatch.setattr(mod, "HEAD_DIMS", frozenset({16}))
    try:
        live_attention_module()._declined.clear()
        with caplog.at_level(logging.WARNING, logger="headscope"):
            got = m(toks)
            m(toks)
    finally:
        for mod in modules():
            mod.set_impl(None)
    msgs = [r.getMessage() for r in caplog.records if "FlashAttention-4" in r.getMessage()]
    assert len(msgs) == 1 and "stand-in told to fail" in msgs[0], msgs
    assert torch.allclose(got, base, atol=1e-6)


@torch.no_grad()
def test_without_fa4_nothing_changes_and_nothing_is_said(tiny_llama, caplog):
    """FlashAttention-4 absent (the CPU): plain calls and records run as before, no FA4 message."""
    m = tiny_llama
    assert not any(mod.available(torch.zeros(1)) for mod in modules())
    live_attention_module()._declined.clear()
    with caplog.at_level(logging.DEBUG, logger="headscope"):
        m(_tokens(seed=2))
        with m.record(MASSES) as rec:
            m(_tokens(seed=2))
    assert set(rec.names) == set(expected_keys(MASSES))
    assert not [r for r in caplog.records if "FlashAttention" in r.getMessage()]


def test_decode_stays_off_fa4_unless_enabled(fake_fa4_fp32, monkeypatch):
    """One query (decoding): SDPA / triton_decode split the keys, FA4's default does not, so the
    probe keeps Q = 1 off FA4 unless ``fa4.DECODE``; prefill goes to FA4."""
    from headscope.probe.attention import plain_attention
    q, k, v = make(1, 4, 2, 12, 12, 16, torch.float32, 6)
    ref = plain_attention(q[:, :, -1:], k, v, scaling=0.25)
    assert not fake_fa4_fp32
    plain_attention(q, k, v, scaling=0.25)
    assert len(fake_fa4_fp32) == 1
    for mod in modules():
        monkeypatch.setattr(mod, "DECODE", True)
    out = plain_attention(q[:, :, -1:], k, v, scaling=0.25)
    assert len(fake_fa4_fp32) == 2 and fake_fa4_fp32[-1][0][1] == 1
    close(out, ref, 1e-6, "decode via FA4")


def test_plain_attention_entry_matches_sdpa():
    q, k, v = make(1, 4, 2, 10, 10, 16, torch.float32, 5)
    from headscope.probe.attention import plain_attention
    out = plain_attention(q, k, v, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------- the real FA4 (GPU)
def _real_fa4():
    fa4.set_impl(None)
    return torch.cuda.is_available() and fa4.available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention-4 runs on Hopper/Blackwell)")
@pytest.mark.parametrize("shape", [(1, 8, 2, 64, 700), (2, 4, 4, 128, 333), (1, 4, 1, 256, 520)])
@pytest.mark.parametrize("mode", ["prefill", "window", "decode", "decode-window"])
@torch.no_grad()
def test_real_fa4_equals_reference(shape, mode):
    """The installed FlashAttention-4 through ``fa4.attention`` against the fp32 reference: output
    to bf16 accuracy, LSE and masses to 2e-4 (FA4's LSE is fp32 from bf16 tensor-core scores)."""
    if not _real_fa4():
        pytest.skip(f"FlashAttention-4 not importable or not this GPU ({fa4.import_error() or 'not installed'})")
    B, H, G, d, K = shape
    Q = 1 if mode.startswith("decode") else K
    w = 97 if "window" in mode else None
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, Q, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, G, K, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kpos = torch.full((B,), 3 if Q == 1 else 0, dtype=torch.long, device="cuda")
    req = StatRequest(sink_k=4, spans=((10, 40),), recent=64, window_distance=128)
    out_ref, ref, _ = reference.attention(q, k, v, scaling=d ** -0.5, sliding_window=w, key_pos0=kpos, stats=req)
    assert fa4.supports(q, k, v, req, None, sliding_window=w) is None
    out, st = fa4.attention(q, k, v, scaling=d ** -0.5, sliding_window=w, key_pos0=kpos, stats=req)
    close(out, out_ref, 2e-2, "out")
    close(st["lse"], ref["lse"], 2e-4, "lse")
    for name in ("sink_mass", "span_mass", "recent_mass"):
        close(st[name], ref[name], 2e-4, name)
    close(st["window_distance"], ref["window_distance"], 2e-4 * 128, "window_distance")
    out_plain, st_plain = fa4.attention(q, k, v, scaling=d ** -0.5, sliding_window=w)
    assert st_plain == {}
    close(out_plain, out_ref, 2e-2, "plain out")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention-4 runs on Hopper/Blackwell)")
@torch.no_grad()
def test_real_fa4_in_the_probe():
    """A bf16 Llama-shaped random model (d=64) on the GPU: the forward and a masses record through
    FlashAttention-4 equal those with HEADSCOPE_NO_FA4=1 (SDPA / Triton)."""
    if not _real_fa4():
        pytest.skip(f"FlashAttention-4 not importable or not this GPU ({fa4.import_error() or 'not installed'})")
    import os

    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    torch.manual_seed(0)
    m = hs.load(LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval())
    toks = torch.randint(0, 300, (1, 257), device="cuda")
    req = StatRequest(sink_k=4, recent=16, window_distance=32)
    old = os.environ.get("HEADSCOPE_NO_FA4")
    try:
        os.environ["HEADSCOPE_NO_FA4"] = "1"
        base = m(toks).float()
        with m.record(req) as ref:
            m(toks)
        os.environ["HEADSCOPE_NO_FA4"] = "0"
        got = m(toks).float()
        with m.record(req) as rec:
            m(toks)
    finally:
        if old is None:
            os.environ.pop("HEADSCOPE_NO_FA4", None)
        else:
            os.environ["HEADSCOPE_NO_FA4"] = old
    assert (got - base).abs().max().item() < 0.1
    assert set(rec.names) == set(expected_keys(req))
    for name in rec.names:           # layer 0 sees the same q, k on both paths; layer 1 bf16-close ones
        close(rec[name, 0], ref[name, 0], 2e-4 * (32 if name == "window_distance" else 1), name)
        close(rec[name, 1], ref[name, 1], 3e-2 * (32 if name == "window_distance" else 1), name)


# --------------------------------------------------------------------------- statistics inside FA4 (fa4_stats)
def test_in_kernel_statistics_decline_with_reasons(monkeypatch):
    """fa4_stats says why it cannot take a call; fa4.supports passes that reason on for the row
    statistics only it computes, and a stand-in FA4 never claims them."""
    from headscope.kernels import fa4_stats
    full = StatRequest(sink_k=4, spans=((1, 3),), entropy=True, distance=True, argmax=True, recent=8, window_distance=16)
    q, k, _ = make(1, 4, 2, 32, 32, 128, torch.bfloat16, 0)
    assert "Hopper" in fa4_stats.supports(q, k, full)                          # CPU tensors
    # d96: no measured tile, so declined; given one in HEADSCOPE_FA4S_TILES (ROWS_TILES), taken
    q96, k96, _ = make(1, 4, 2, 32, 32, 96, torch.bfloat16, 0)
    assert "head dims" in fa4_stats.supports(q96, k96, full)
    monkeypatch.setattr(fa4_stats, "ROWS_TILES", {96: (128, 96)})
    assert "Hopper" in fa4_stats.supports(q96, k96, full)
    monkeypatch.setattr(fa4_stats, "ROWS_TILES", {})
    assert "sliding window" in fa4_stats.supports(q, k, full, sliding_window=8)
    assert "causal" in fa4_stats.supports(q, k, full, causal=False)
    assert "as many queries" in fa4_stats.supports(q[:, :, :1], k, full)
    assert "received_window" in fa4_stats.supports(q, k, StatRequest(received=True, received_window=(0, 4)))
    assert "spans" in fa4_stats.supports(q, k, StatRequest(spans=tuple((i, i + 1) for i in range(9))))
    fa4.set_impl(standin(), any_device=True)
    try:
        reason = fa4.supports(q, k, k, StatRequest(entropy=True), None)
        assert "entropy" in reason and "stand-in" in reason
        assert fa4.supports(q, k, k, StatRequest(sink_k=4), None) is None          # masses from the LSE
    finally:
        fa4.set_impl(None)
    assert fa4_stats.Flags(sink=True, n_spans=2).n_slots == fa4_stats.SLOT_SPAN0 + 3
    assert fa4_stats.flags_for(full) == fa4_stats.Flags(True, True, True, True, True, True, 1)


def _transposed_pass(key, make_class, create_softmax, q, k, v, *, softmax_scale, return_lse, aux_tensors,
                     causal=False, window_size_left=None, window_size_right=None, tile_mn=None):
    """What FA4 with ``ColSumSoftmax`` computes (its documented contract), in fp32 PyTorch: rows are
    q's positions, columns k's; out[0, b, h, i] = sum over visible j of exp2(x log2e scale - lse2[PAD + j])."""
    from headscope.kernels import fa4_stats
    assert not return_lse and key[0] == "colsum"
    out, lse2 = aux_tensors
    assert lse2.dtype == torch.float64                    # the kernel reads the fp32 LSEs in 64-bit pairs
    lse2 = lse2.view(torch.float32)
    qh, kh = (t.transpose(1, 2).float() for t in (q, k))                   # [B, H, N, d]
    N = qh.shape[2]
    x = qh @ kh.transpose(-1, -2) * (softmax_scale * 1.4426950408889634)    # [B, H, N, N]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    if causal:
        vis = j <= i
    else:
        assert (window_size_left, window_size_right) == (0, None)
        vis = j >= i
    p = torch.exp2(x - lse2[:, :, None, fa4_stats.COLSUM_PAD:fa4_stats.COLSUM_PAD + N]).masked_fill(~vis, 0.0)
    out[0] = p.sum(-1)


@pytest.mark.parametrize("mask", ["causal", "local"])
@pytest.mark.parametrize("B, H, G, N", [(2, 4, 2, 37), (1, 3, 3, 16), (1, 8, 1, 5)])
def test_received_sums_host_side(monkeypatch, mask, B, H, G, N):
    """received_sums' host side (GQA copies, reversed sequences for the causal variant, LSE buffer with
    its padding, the flip back) around a PyTorch model of the transposed pass equals the reference's
    column sums; the GPU test below holds the real kernel to the same reference."""
    import types

    from headscope.kernels import fa4_stats
    monkeypatch.setattr(fa4_stats, "_run_variant", _transposed_pass)
    monkeypatch.setattr(fa4_stats, "COLSUM_MASK", mask)
    # test double for the CuTe-DSL module (it imports only where flash_attn.cute is installed): received_sums
    # takes its kernel-class factory and softmax from it and hands them to _run_variant, modelled above
    cute_half = types.ModuleType("headscope.kernels.fa4_stats_sm90")
    cute_half.make_colsum_kernel_class = cute_half.create_colsum_softmax = None
    monkeypatch.setitem(sys.modules, "headscope.kernels.fa4_stats_sm90", cute_half)
    q, k, _ = make(B, H, G, N, N, 16, torch.float32, 3)
    _, ref, _ = reference.attention(q, k, k, scaling=0.25, stats=StatRequest(received=True))
    got = fa4_stats.received_sums(q, k, ref["lse"], scaling=0.25)
    assert got.shape == ref["received_sum"].shape == (B, H, N)
    err = (got - ref["received_sum"]).abs().max().item()
    assert err <= 2e-5 * ref["received_sum"].abs().max().item(), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention-4 runs on Hopper/Blackwell)")
@pytest.mark.parametrize("shape", [(2, 8, 2, 128, 1000), (1, 9, 3, 64, 777), (2, 4, 4, 64, 1531), (1, 8, 4, 256, 600)])
@torch.no_grad()
def test_in_kernel_statistics_equal_reference(shape):
    """Every row statistic from inside FA4's softmax (fa4.attention routes d64, d128 and d256 there)
    against the fp32 reference: odd lengths, GQA, two batches with shifted positions, argmax exactly."""
    if not _real_fa4():
        pytest.skip(f"FlashAttention-4 not importable or not this GPU ({fa4.import_error() or 'not installed'})")
    B, H, G, d, N = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    q = (torch.randn(B, H, N, d, device="cuda", generator=g) * 3).bfloat16()
    k = torch.randn(B, G, N, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, G, N, d, device="cuda", generator=g).bfloat16()
    kpos = torch.arange(B, device="cuda") * 5
    req = StatRequest(sink_k=5, spans=((3, 40), (N // 2, N // 2 + 77)), entropy=True, distance=True,
                      window_distance=100, recent=37, argmax=True, received=True)
    from headscope.kernels import fa4_stats
    if d in fa4_stats.HEAD_DIMS:                    # the probe's route
        assert fa4.supports(q, k, v, req, None) is None
    out, st = fa4_stats.attention(q, k, v, scaling=d ** -0.5, key_pos0=kpos, stats=req)
    out_ref, ref, _ = reference.attention(q.float(), k.float(), v.float(), scaling=d ** -0.5, key_pos0=kpos, stats=req)
    close(out, out_ref, 3e-2, "out")
    for name, tol in (("lse", 2e-5), ("entropy", 2e-5), ("recent_mass", 1e-5), ("max_prob", 1e-5),
                      ("sink_mass", 1e-5), ("span_mass", 1e-5), ("window_distance", 1e-3), ("distance", 1e-2)):
        close(st[name], ref[name], tol, name)
    assert torch.equal(st["argmax"], ref["argmax"])
    # column sums (the transposed pass): up to N per key; relative 1e-5 of the largest
    close(st["received_sum"], ref["received_sum"], 1e-5 * ref["received_sum"].abs().max().item(), "received_sum")
    assert torch.equal(st["received_count"], ref["received_count"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention-4 runs on Hopper/Blackwell)")
@pytest.mark.parametrize("search", ["branch", "scan"])
@torch.no_grad()
def test_in_kernel_argmax_ties_go_to_the_first_key(monkeypatch, search):
    """Keys copied to later positions (same key block and other blocks, so the copies tie exactly):
    the in-kernel argmax is the first of the tied keys, as the reference's ``p.max()``, for each
    search placement (``fa4_stats_sm90.ARGMAX_SEARCH``)."""
    if not _real_fa4():
        pytest.skip(f"FlashAttention-4 not importable or not this GPU ({fa4.import_error() or 'not installed'})")
    from headscope.kernels import fa4_stats, fa4_stats_sm90
    monkeypatch.setattr(fa4_stats_sm90, "ARGMAX_SEARCH", search)
    B, H, G, d, N = 1, 4, 2, 128, 700
    g = torch.Generator(device="cuda").manual_seed(3)
    q = (torch.randn(B, H, N, d, device="cuda", generator=g) * 3).bfloat16()
    k = torch.randn(B, G, N, d, device="cuda", generator=g).bfloat16()
    for src, dst in ((5, 60), (5, 300), (200, 201), (130, 650), (640, 699)):   # same and other blocks
        k[:, :, dst] = k[:, :, src]
    q[:, :, 400:] = k[:, :1, 130:131] * 4                      # these rows' max: key 130 and its copy
    req = StatRequest(argmax=True)
    _, st = fa4_stats.attention(q, k, k, scaling=d ** -0.5, stats=req)
    _, ref, _ = reference.attention(q.float(), k.float(), k.float(), scaling=d ** -0.5, stats=req)
    assert torch.equal(st["argmax"], ref["argmax"])
    assert (st["argmax"][:, :2, 650:] == 130).all()            # heads of KV head 0: the first copy wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention-4 runs on Hopper/Blackwell)")
@pytest.mark.parametrize("rescale", ["always", "threshold"])
@torch.no_grad()
def test_in_kernel_statistics_when_the_max_jumps_last(monkeypatch, rescale):
    """A sink-like key 0 far above every other score, met last (FA4 walks the key blocks from the
    diagonal back to block 0), next to rows whose max rises by small steps: every row statistic
    against the fp32 reference, for each rescale rule (``fa4_stats_sm90.RESCALE``: with "threshold"
    the frame moves only on jumps over 2^RESCALE_TAU)."""
    if not _real_fa4():
        pytest.skip(f"FlashAttention-4 not importable or not this GPU ({fa4.import_error() or 'not installed'})")
    from headscope.kernels import fa4_stats, fa4_stats_sm90
    monkeypatch.setattr(fa4_stats_sm90, "RESCALE", rescale)
    B, H, G, d, N = 1, 4, 2, 128, 900
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(B, H, N, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, G, N, d, device="cuda", generator=g).bfloat16()
    q[:, :2, ::2] += k[:, :1, :1] * 2            # even rows of heads 0-1: key 0 ~23 nats above the rest
    req = StatRequest(sink_k=4, spans=((3, 40),), entropy=True, distance=True, window_distance=100,
                      recent=37, argmax=True)
    out, st = fa4_stats.attention(q, k, k, scaling=d ** -0.5, stats=req)
    out_ref, ref, _ = reference.attention(q.float(), k.float(), k.float(), scaling=d ** -0.5, stats=req)
    assert ref["sink_mass"][:, :2, 200::2].min() > 0.99            # the jump happens: key 0 dominates
    close(out, out_ref, 3e-2, "out")
    for name, tol in (("lse", 2e-5), ("entropy", 2e-5), ("recent_mass", 1e-5), ("max_prob", 1e-5),
                      ("sink_mass", 1e-5), ("span_mass", 1e-5), ("window_distance", 1e-3), ("distance", 1e-2)):
        close(st[name], ref[name], tol, name)
    assert torch.equal(st["argmax"], ref["argmax"])


@pytest.mark.parametrize("var, bad, good", [("HEADSCOPE_FA4S_COLSUM", "casual", "local"),
                                            ("HEADSCOPE_FA4S_COLSUM_PV", "skp", "keep"),
                                            ("HEADSCOPE_FA4S_P", "shared", "smem"),
                                            ("HEADSCOPE_FA4S_COLSUM_TILE_N", "150", "160")])
def test_kernel_switches_refuse_unknown_values(var, bad, good):
    """The named switches of the in-kernel statistics (read at import, ``fa4_stats.env_choice``) take
    one of their values; a typo is an error at import that names the variable and the choices, not a
    silent default."""
    import os
    import subprocess
    env = {**os.environ, var: bad}
    r = subprocess.run([sys.executable, "-c", "import headscope.kernels.fa4_stats"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert var in r.stderr and repr(bad) in r.stderr and repr(good) in r.stderr
    env[var] = good
    r = subprocess.run([sys.executable, "-c", "import headscope.kernels.fa4_stats as m; "
                        "print(m.COLSUM_MASK, m.COLSUM_PV, m.ROWS_P, m.COLSUM_TILE_N)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert good in r.stdout.split()


def test_column_pass_tile_width_per_head_dim(monkeypatch):
    """The transposed pass's query columns per tile: the measured default per head dim (d64 wider),
    one width for all under HEADSCOPE_FA4S_COLSUM_TILE_N, and always within the LSE buffer's pad."""
    from headscope.kernels import fa4_stats
    monkeypatch.setattr(fa4_stats, "COLSUM_TILE_N", "auto")
    assert fa4_stats.colsum_tile_n(64) == fa4_stats.DEFAULT_COLSUM_TILE_N[64] != 128
    assert fa4_stats.colsum_tile_n(128) == 128
    monkeypatch.setattr(fa4_stats, "COLSUM_TILE_N", "176")
    assert fa4_stats.colsum_tile_n(64) == fa4_stats.colsum_tile_n(128) == 176
    assert all(int(n) <= fa4_stats.COLSUM_PAD for n in ("128", "144", "160", "176", "192"))


def test_tile_switch_reads_head_dims_and_refuses_bad_tiles(monkeypatch):
    """``HEADSCOPE_FA4S_TILES`` ("d:MxN" items) gives the row kernel's tile per head dim; a malformed
    item or a tile FA4 cannot take is an error that names the variable."""
    from headscope.kernels import fa4_stats
    monkeypatch.setenv("HEADSCOPE_FA4S_TILES", "64:128x96,128:128x112")
    assert fa4_stats.env_tiles("HEADSCOPE_FA4S_TILES") == {64: (128, 96), 128: (128, 112)}
    monkeypatch.delenv("HEADSCOPE_FA4S_TILES")
    assert fa4_stats.env_tiles("HEADSCOPE_FA4S_TILES") == {}
    for bad in ("64:128x100", "96:128x96", "128:256x96", "128-128x96", "64:128"):
        monkeypatch.setenv("HEADSCOPE_FA4S_TILES", bad)
        with pytest.raises(ValueError, match="HEADSCOPE_FA4S_TILES"):
            fa4_stats.env_tiles("HEADSCOPE_FA4S_TILES")
