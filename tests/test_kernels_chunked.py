"""The chunked CPU path equals the eager reference: outputs, every statistic, every edit, over
random shapes (odd lengths, GQA ratios, windows, padding, the decode case Q < K) and dtypes."""
import contextlib
import os
import shutil

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from headscope.kernels import LayerEdits, Redistribution, StatRequest, chunked, cpu_native, reference

ALL = StatRequest(sink_k=3, spans=((4, 9), (0, 1)), entropy=True, distance=True, window_distance=5,
                  recent=7, argmax=True, received=True)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make(B, H, G, Q, K, d, dtype, seed, pad):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Q, d, generator=g) * 2).to(dtype)
    k = (torch.randn(B, G, K, d, generator=g) * 2).to(dtype)
    v = torch.randn(B, G, K, d, generator=g).to(dtype)
    kp = None
    if pad:
        kp = torch.ones(B, K, dtype=torch.bool)
        kp[-1, :pad] = False
    key_pos0 = torch.zeros(B, dtype=torch.long)
    if kp is not None:
        key_pos0 = -(~kp).sum(-1)
    return q, k, v, kp, key_pos0


def edits_for(H, d, seed):
    g = torch.Generator().manual_seed(seed)
    return LayerEdits(q_scale=torch.where(torch.arange(H) == 0, 1e-4, 1.0),
                      redistributions=(Redistribution((1 % H,), 0.4, ((0, 2),)),
                                       Redistribution((H - 1,), 0.6, ((1, 3),), target=((0, 12),),
                                                      max_ratio=0.5, min_target=0.2, min_query=6)),
                      gate=torch.rand(H, generator=g), gate_sink=2, gate_recent=5)


@contextlib.contextmanager
def native_rows(on: bool):
    """HEADSCOPE_NATIVE=1/0 for the block: the fused C row pass on or off."""
    old = os.environ.get("HEADSCOPE_NATIVE")
    os.environ["HEADSCOPE_NATIVE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HEADSCOPE_NATIVE")
        else:
            os.environ["HEADSCOPE_NATIVE"] = old


def check(a, b, tol, what):
    assert a.shape == b.shape, what
    assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), (what, (a.float() - b.float()).abs().max())


@settings(deadline=None)
@example(B=2, G=1, ratio=1, K=43, dq=0, d=8, window=3, pad=0, block=None, dtype=torch.float32, use_edits=True,
         seed=10000, rwin=None, native=True, causal=False)   # near-uniform rows (q_scale 1e-4): argmax ties
@given(B=st.integers(1, 2), G=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 4, 8]),
       K=st.integers(1, 70), dq=st.integers(0, 9), d=st.sampled_from([8, 16]),
       window=st.sampled_from([None, 3, 16]), pad=st.integers(0, 4), block=st.sampled_from([None, 8, 13]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), use_edits=st.booleans(),
       seed=st.integers(0, 10_000), rwin=st.sampled_from([None, (2, 9)]), native=st.booleans(),
       causal=st.sampled_from([True, True, False]))
def test_chunked_equals_reference(B, G, ratio, K, dq, d, window, pad, block, dtype, use_edits, seed, rwin,
                                  native, causal):
    """``native`` switches the fused C row pass (cpu_rows.c) on or off: both must equal the reference."""
    with native_rows(native):
        H = G * ratio
        if not causal:
            dq = 0                      # non-causal attention comes with Q == K (encoder-style)
        Q = max(1, K - dq)
        pad = min(pad, K - 1)
        q, k, v, kp, kpos = make(B, H, G, Q, K, d, dtype, seed, pad)
        stats = StatRequest(**{**ALL.__dict__, "received_window": rwin})
        ed = edits_for(H, d, seed) if use_edits else None
        kw = dict(scaling=d ** -0.5, sliding_window=window, key_padding=kp, key_pos0=kpos, edits=ed, causal=causal)
        o_ref, s_ref, p_ref = reference.attention(q, k, v, stats=stats, want_probs=True, **kw)
        o_chk, s_chk = chunked.attention(q, k, v, stats=stats, block=block, **kw)
        tol = TOL[dtype]
        # rows of fully padded queries are undefined in HF too: compare real queries only
        real = torch.ones(B, Q, dtype=torch.bool) if kp is None else kp[:, K - Q:]
        check(o_chk.transpose(1, 2)[real], o_ref.transpose(1, 2)[real], tol * 4, "out")
        for name in s_ref:
            a, b = s_chk[name], s_ref[name]
            if name in ("received_sum", "received_count"):
                check(a, b, tol * 4, name)
                continue
            a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]
            if name == "argmax":
                # Near-ties are decided by rounding (e.g. q_scale=1e-4 makes rows almost uniform), so
                # compare only rows whose top two probabilities differ by more than the dtype's
                # tolerance; in low precision any key of (nearly) equal weight may win.
                top2 = p_ref.float().topk(min(2, K), dim=-1).values.transpose(1, 2)[real]
                clear = (top2[..., 0] - top2[..., -1] > tol) if K > 1 else torch.ones_like(top2[..., 0], dtype=torch.bool)
                if dtype == torch.float32:
                    assert torch.equal(a[clear], b[clear]), name
                continue
            if name == "lse" and use_edits:
                continue                # lse is of the scores, compared below without redistribution
            check(a, b, tol * 4 if name != "distance" else tol * 4 * K, name)
        # plain (no statistics) path: SDPA per block
        o_plain, _ = chunked.attention(q, k, v, block=block, **kw)
        check(o_plain.transpose(1, 2)[real], o_ref.transpose(1, 2)[real], tol * 4, "plain out")


def test_native_row_kernel_builds_and_matches_torch():
    """Where a C compiler exists (CI has gcc) the fused row pass is built and used, and on long rows
    (vector loops, the 32-wide max, every statistic) it equals the plain PyTorch block path."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.fail("no C compiler: the CPU fast path cannot be built (install gcc)")
    assert cpu_native.available()
    g = torch.Generator().manual_seed(0)
    B, H, G, N = 2, 6, 2, 301
    q, k, v = (torch.randn(B, h, N, 32, generator=g) * 2 for h in (H, G, G))
    kp = torch.ones(B, N, dtype=torch.bool)
    kp[1, :5] = False
    kp[1, 200] = False
    stats = StatRequest(sink_k=4, spans=((10, 90), (0, 1)), entropy=True, distance=True, window_distance=20,
                        recent=64, argmax=True, received=True)
    for key_padding, window, rwin in ((None, None, None), (kp, None, None), (None, 100, (3, 40)), (kp, 77, None)):
        kw = dict(scaling=32 ** -0.5, stats=StatRequest(**{**stats.__dict__, "received_window": rwin}),
                  key_padding=key_padding, sliding_window=window, block=64)
        o_n, s_n = chunked.attention(q, k, v, **kw)
        with native_rows(False):
            o_t, s_t = chunked.attention(q, k, v, **kw)
        real = torch.ones(B, N, dtype=torch.bool) if key_padding is None else key_padding
        check(o_n.transpose(1, 2)[real], o_t.transpose(1, 2)[real], 2e-5, "out")
        assert s_n.keys() == s_t.keys()
        for name in s_t:
            a, b = s_n[name], s_t[name]
            if name in ("received_sum", "received_count"):
                check(a, b, 1e-4, name)
            elif name == "argmax":
                assert torch.equal(a.transpose(1, 2)[real], b.transpose(1, 2)[real])
            else:
                check(a.transpose(1, 2)[real], b.transpose(1, 2)[real], 2e-4 if name == "distance" else 2e-5, name)


def test_block_default_and_memory_is_linear():
    """A 4096-token call never allocates an N×N tensor for all heads: peak temporary memory stays
    near heads · block · N floats."""
    import tracemalloc
    assert chunked._default_block(9, 8192) <= 64
    assert chunked._default_block(9, 8192, native=True) == 64
    H, N = 4, 4096
    q = torch.randn(1, H, N, 16)
    k = torch.randn(1, 1, N, 16)
    out, st = chunked.attention(q, k, k, scaling=0.25, stats=ALL)
    assert out.shape == q.shape and st["entropy"].shape == (1, H, N)


@pytest.mark.parametrize("native", [True, False])
def test_min_query_edits_only_the_later_query_rows(native):
    """``Redistribution.min_query``: rows of queries at positions < min_query are the unedited
    attention, rows at or after it the every-row edit (positions shift with left padding)."""
    B, H, G, K, d = 2, 4, 2, 23, 16
    q, k, v, kp, kpos = make(B, H, G, K, K, d, torch.float32, 3, pad=4)
    red = dict(heads=(1, 2), factor=0.2, source=((0, 2),), target=((2, 12),))
    run = lambda e: chunked.attention(q, k, v, scaling=d ** -0.5, causal=True, key_padding=kp, key_pos0=kpos,
                                      edits=e, stats=ALL, block=8)
    with native_rows(native):
        plain, _ = run(None)
        every, _ = run(LayerEdits(redistributions=(Redistribution(**red),)))
        later, st = run(LayerEdits(redistributions=(Redistribution(**red, min_query=9),)))
    qpos = kpos[:, None] + torch.arange(K)                                      # [B, Q] positions
    before = (qpos < 9)[:, None, :, None]
    torch.testing.assert_close(later, torch.where(before, plain, every))
    assert not torch.allclose(every, plain, atol=1e-3)                          # the edit does something
    assert not torch.allclose(later, every, atol=1e-3)                          # ... and min_query holds it back
    ref, want, _ = reference.attention(q, k, v, scaling=d ** -0.5, causal=True, key_padding=kp, key_pos0=kpos,
                                       edits=LayerEdits(redistributions=(Redistribution(**red, min_query=9),)),
                                       stats=ALL)
    torch.testing.assert_close(later, ref, atol=2e-5, rtol=2e-5)
    for name in want:
        torch.testing.assert_close(st[name].float(), want[name].float(), atol=2e-5, rtol=2e-5)


def test_a_paths_declined_requests_are_kept_per_path_and_request():
    """``spec.decline_reason`` keeps its answer per request (every layer of every step asks it): the
    same request gets each path's own answer, a new request its own, and edits are read afresh."""
    from headscope.kernels.spec import LayerEdits, decline_reason
    entropy_only, both = frozenset({"entropy"}), frozenset({"entropy", "argmax"})
    req = StatRequest(entropy=True, argmax=True)
    for _ in range(2):
        assert "['argmax']" in decline_reason("path A", entropy_only, frozenset(), req, None)
        assert decline_reason("path B", both, frozenset(), req, None) is None
        assert decline_reason("path A", entropy_only, frozenset(), StatRequest(entropy=True), None) is None
    assert decline_reason("path A", both, frozenset(), None, None) is None
    e = LayerEdits(q_scale=torch.ones(2))
    assert "q_scale" in decline_reason("path A", both, frozenset(), req, e)
    assert decline_reason("path A", both, frozenset({"q_scale"}), req, e) is None
