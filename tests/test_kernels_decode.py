"""The split-key decode kernels (kernels/triton_decode.py) against the eager reference: output, every
row statistic and the LSE for few queries against many keys, with the partial results of several
key splits merged (GQA ratios 1/4/8, windows, padding, softcap, key positions, fp32/bf16/fp16), and
the automatic choice of the decode path in ``triton_attention.attention``.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) with 16-key blocks and
32-key splits, so K=75 gives three splits (the last one partial). The tests marked with the ``merge``
fixture run twice: with the splits merged by the last split of each group to finish (``fused``, one
launch) and by the second kernel (``kernel``); ``auto`` (the default) picks one per call.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

triton = pytest.importorskip("triton")

from headscope.kernels import reference, triton_attention as ta, triton_decode as td
from headscope.kernels.spec import LayerEdits, Redistribution, StatRequest

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not ta.interpreting():
    pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)

ALL_ROW = dict(sink_k=2, spans=((3, 9), (0, 1), (12, 30)), entropy=True, distance=True,
               window_distance=5, recent=4, argmax=True)
OUT_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
K_SCALE = 40 if CUDA else 1          # longer key ranges on the GPU (many splits)


@pytest.fixture(autouse=True)
def _verify_keyed_launches(monkeypatch):
    """Every keyed launch of the decode kernel (``launch.Bound.run_keyed``, on the GPU) is checked
    against the full specialisation key: a caller key that missed a fact raises."""
    from headscope.kernels import launch
    monkeypatch.setattr(launch, "VERIFY_KEYED", True)


def _problem(B=2, H=8, G=2, Q=1, K=75, D=32, dtype=torch.float32, seed=0, pad=False, pos0=False, **kw):
    g = torch.Generator().manual_seed(seed)
    K = K * K_SCALE
    q = torch.randn(B, H, Q, D, generator=g)
    k = torch.randn(B, G, K, D, generator=g)
    v = torch.randn(B, G, K, D, generator=g)
    k[:, :, :2] *= 3                                   # peaky scores on the first keys (sinks)
    p = dict(q=q.to(DEV, dtype), k=k.to(DEV, dtype), v=v.to(DEV, dtype), scaling=D ** -0.5, causal=True,
             sliding_window=None, softcap=None, key_padding=None, key_pos0=None)
    if pad:
        kp = torch.rand(B, K, generator=g) > 0.25
        kp[0, :3] = False
        p["key_padding"] = kp.to(DEV)
    if pos0:
        p["key_pos0"] = torch.randint(-5, 6, (B,), generator=g).to(DEV)
    p.update(kw)
    return p


def _check(prob, out, got, req, edits=None, need_clear=True):
    f = {n: (t.float() if n in "qkv" else t) for n, t in prob.items()}
    ref, want, probs = reference.attention(**f, stats=req, edits=edits, want_probs=True)
    tol = OUT_TOL[prob["q"].dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    if req is None:
        assert got == {}
        return
    assert set(got) == set(want)
    K = prob["k"].shape[2]
    st_tol = 2e-4 if prob["q"].dtype == torch.float32 else 2e-3
    for n, w in want.items():
        if n == "argmax":
            continue
        scale = {"distance": K, "window_distance": 5, "lse": 10.0, "entropy": 3.0}.get(n, 1.0)
        assert got[n].dtype == w.dtype and got[n].shape == w.shape, n
        torch.testing.assert_close(got[n], w, atol=st_tol * scale, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    if "argmax" in want:
        g, w = got["argmax"], want["argmax"]
        assert g.dtype == torch.int64
        top2 = probs.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 1e-3
        assert clear.any() or not need_clear, "no row has a clear top key: the problem cannot check the argmax"
        assert torch.equal(g[clear], w[clear]), "argmax differs where the top key is clear"


@pytest.fixture(params=["fused", "kernel"])
def merge(request, monkeypatch):
    """Both ways of merging the key splits (``triton_decode.MERGE``), with fresh plans."""
    monkeypatch.setattr(td, "MERGE", request.param)
    td.clear_plans()
    yield request.param
    td.clear_plans()


CASES = [
    dict(),                                                        # GQA 4, three splits
    dict(Q=3, H=4, G=4, dtype=torch.bfloat16),                     # MHA, several queries
    dict(H=8, G=1, sliding_window=40, dtype=torch.float16),        # GQA 8, window skips splits
    dict(pad=True, pos0=True, K=61),                               # padding, positions, odd K
    dict(causal=False, softcap=20.0, Q=2, D=80),                   # non-causal, softcap, d not 2^n
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "base")
def test_decode_matches_reference(case, merge):
    prob = _problem(**case)
    req = StatRequest(**ALL_ROW)
    assert td.eligible(prob["q"], prob["k"], stats=req, min_k=1) is None
    out, got = td.attention(**prob, stats=req)
    _check(prob, out, got, req)


@st.composite
def decode_problems(draw):
    """A random decode call: shapes (GQA ratios 1-8, a few queries, odd K and head dims), dtype,
    masks (causal or not, a window, padding, key positions, softcap), a random subset of the row
    statistics with spans, ``q_scale``, the merge and the split count."""
    G, ratio = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3, 4, 8]))
    Q = draw(st.sampled_from([1, 1, 2, 3])) if ratio <= 4 else 1
    K = draw(st.integers(max(Q, 2), 130))
    kw = dict(B=draw(st.integers(1, 3)), H=G * ratio, G=G, Q=Q, K=K, D=draw(st.sampled_from([16, 32, 48, 80])),
              dtype=draw(st.sampled_from(list(OUT_TOL))), seed=draw(st.integers(0, 1000)), pad=draw(st.booleans()),
              pos0=draw(st.booleans()), causal=draw(st.booleans()) or draw(st.booleans()),
              sliding_window=draw(st.one_of(st.none(), st.integers(1, K + 3))),
              softcap=draw(st.sampled_from([None, None, 15.0])))
    fields = dict(entropy=draw(st.booleans()), distance=draw(st.booleans()), argmax=draw(st.booleans()),
                  recent=draw(st.sampled_from([0, 1, 7, K + 2])), window_distance=draw(st.sampled_from([0, 1, 12])),
                  sink_k=draw(st.sampled_from([0, 0, 1, 6])),
                  spans=tuple(draw(st.lists(st.tuples(st.integers(0, K), st.integers(1, 20)).map(
                      lambda t: (t[0], t[0] + t[1])), max_size=2))))
    req = StatRequest(**fields) if any(fields.values()) else None
    return kw, req, draw(st.booleans()), draw(st.sampled_from(["fused", "kernel"])), \
        draw(st.sampled_from([None, None, 1, 3, 8]))


@settings(max_examples=int(os.environ.get("HEADSCOPE_KERNEL_EXAMPLES", 12)), deadline=None, derandomize=True)
@given(case=decode_problems())
def test_random_decode_calls_match_the_reference(case):
    """Random decode calls (``decode_problems``) against the eager reference: output, LSE and every
    requested statistic. (Off-CI fuzzing of this kind, 300 random calls in the interpreter: no
    failure, 2026-12-04.)"""
    kw, req, qscale, merge, splits = case
    prob = _problem(**kw)
    H = kw["H"]
    edits = LayerEdits(q_scale=(torch.rand(H, generator=torch.Generator().manual_seed(kw["seed"])) * 2).to(DEV)) \
        if qscale else None
    saved = td.MERGE
    try:
        td.MERGE = merge
        td.clear_plans()
        out, got = td.attention(**prob, stats=req, edits=edits, splits=splits)
    finally:
        td.MERGE = saved
        td.clear_plans()
    _check(prob, out, got, req, edits=edits, need_clear=False)


def test_decode_plain_argmax_only_and_qscale():
    prob = _problem(B=1, dtype=torch.bfloat16, seed=3)
    out, got = td.attention(**prob)
    _check(prob, out, got, None)
    req = StatRequest(argmax=True)
    e = LayerEdits(q_scale=(torch.rand(8) + 0.5).to(DEV))
    out, got = td.attention(**prob, stats=req, edits=e)
    assert set(got) == {"lse", "argmax", "max_prob"}
    _check(prob, out, got, req, edits=e)


def test_kept_plans_give_every_call_its_own_answer():
    """The host keeps a plan per shape and request (tiles, constexprs, buffer widths); K is not part
    of it. A decode loop whose cache grows by one key a step, alternating two requests (one of them
    the same object every step, one new each step), with and without padding, matches the
    reference at every step, and the statistics dict holds separate tensors."""
    kept = StatRequest(**ALL_ROW)
    base = _problem(B=1, H=6, G=3, K=70, D=48, pad=True, seed=5)
    K0 = base["k"].shape[2]
    for step in range(4):
        K = K0 - 3 + step
        prob = dict(base, k=base["k"][:, :, :K], v=base["v"][:, :, :K],
                    key_padding=base["key_padding"][:, :K] if step % 2 else None)
        for req in (kept, StatRequest(argmax=True, recent=3 + step)):
            out, got = td.attention(**prob, stats=req)
            _check(prob, out, got, req)
            ptrs = [t.data_ptr() for n, t in got.items() if n not in ("span_mass", "argmax")]
            assert len(set(ptrs)) == len(ptrs)


def test_decode_split_count_does_not_change_the_result(merge):
    """One split (no merge) and many splits agree to rounding; rows that see no key (all padded)
    give lse -inf, zero output and zero statistics."""
    prob = _problem(pad=True)
    prob["key_padding"][1] = False
    req = StatRequest(**ALL_ROW)
    o1, g1 = td.attention(**prob, stats=req, splits=1)
    o2, g2 = td.attention(**prob, stats=req, splits=4)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-4 * (prob["k"].shape[2] if n == "distance" else 1),
                                   rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert torch.isneginf(g2["lse"][1]).all() and (o2[1] == 0).all() and (g2["entropy"][1] == 0).all()
    _check(prob, o2, g2, req)


def test_merge_in_chunks_of_splits_keeps_every_statistic_and_the_first_argmax(merge, monkeypatch):
    """The merge reads the splits a chunk at a time with a running max (an online softmax over
    splits). With chunks of 2 splits: every statistic matches the reference, and the argmax is the
    first of two equal top keys in different chunks, or the later key when it is larger (the
    running max moves, so the earlier chunk's candidate is dropped). The fused merge leaves its
    counters at 0 for the next call."""
    monkeypatch.setattr(td, "MERGE_BLOCK_S", 2)
    td.clear_plans()
    prob = _problem(B=1, H=4, G=2, K=75, D=32, seed=7)
    K = prob["k"].shape[2]
    late = K - 11                                    # a key in the last chunk of splits
    req = StatRequest(**ALL_ROW)
    out, got = td.attention(**prob, stats=req, splits=6)
    _check(prob, out, got, req)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(1)), dim=0).to(DEV)
    q = (3 * u).expand_as(prob["q"]).contiguous()    # every head asks for u
    for scale_late, want in ((1.0, 9), (1.05, late)):
        k = prob["k"].clone()
        k[0, :, 9] = 20 * u                          # score ~10.6 against ~0.5 for the random keys
        k[0, :, late] = 20 * scale_late * u
        p = dict(prob, q=q, k=k)
        out, got = td.attention(**p, stats=StatRequest(argmax=True), splits=6)
        f = {n: (t.float() if n in "qkv" else t) for n, t in p.items()}
        ref = reference.attention(**f, stats=StatRequest(argmax=True))[1]
        assert (ref["argmax"] == want).all(), "the test's keys do not make the intended top key"
        assert torch.equal(got["argmax"], ref["argmax"])
    if merge == "fused":
        assert (td.split_counts(torch.device(DEV), 2)[:2] == 0).all()


def test_auto_merge_fuses_small_calls_and_launches_the_merge_kernel_for_large_ones(monkeypatch):
    """``MERGE = "auto"``: a call with B * G * K up to FUSED_MAX_KEYS merges in the partial kernel
    (no merge-kernel launch), a larger one launches the merge kernel; both match the reference."""
    monkeypatch.setattr(td, "MERGE", "auto")
    merges = []
    orig = td._Plan.merge
    monkeypatch.setattr(td._Plan, "merge", lambda self, S: merges.append(S) or orig(self, S))
    prob = _problem()
    req = StatRequest(**ALL_ROW)
    for max_keys, launched in ((1 << 40, False), (1, True)):
        monkeypatch.setattr(td, "FUSED_MAX_KEYS", max_keys)
        td.clear_plans()
        merges.clear()
        out, got = td.attention(**prob, stats=req)
        assert bool(merges) == launched
        _check(prob, out, got, req)
    td.clear_plans()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_auto_merge_inside_a_cuda_graph_uses_the_merge_kernel_and_replays_exactly(monkeypatch):
    """Captured in a CUDA graph a call costs no host time, so "auto" takes the merge kernel (less GPU
    time) even for a small call; the replayed graph gives the eager answer for new inputs."""
    monkeypatch.setattr(td, "MERGE", "auto")
    td.clear_plans()
    merges = []
    orig = td._Plan.merge
    monkeypatch.setattr(td._Plan, "merge", lambda self, S: merges.append(S) or orig(self, S))
    prob = _problem(B=1, H=8, G=2, K=75, D=64, dtype=torch.bfloat16, seed=4)
    req = StatRequest(argmax=True, entropy=True)
    q = prob["q"].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        td.attention(**dict(prob, q=q), stats=req)               # warm-up: compiles, small call: fused
    torch.cuda.current_stream().wait_stream(s)
    assert merges == []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, got = td.attention(**dict(prob, q=q), stats=req)
    assert merges, "the captured call did not launch the merge kernel"
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    _check(dict(prob, q=q), out, got, req)
    td.clear_plans()


def test_decode_eligibility():
    prob = _problem()
    q, k = prob["q"], prob["k"]
    assert td.eligible(q, k, min_k=1) is None
    assert "too few" in td.eligible(q, k, min_k=10 ** 6)
    assert "received" in td.eligible(q, k, stats=StatRequest(received=True), min_k=1)
    r = Redistribution(heads=(0,), factor=0.5, source=((0, 1),))
    assert "redistributions" in td.eligible(q, k, edits=LayerEdits(redistributions=(r,)), min_k=1)
    assert "spans" in td.eligible(q, k, stats=StatRequest(spans=tuple((i, i + 1) for i in range(9))), min_k=1)
    big_q = torch.zeros(1, 8, 17, 32, device=DEV)
    assert "decode path" in td.eligible(big_q, k, min_k=1)


def test_triton_attention_dispatches_decode(monkeypatch):
    """triton_attention.attention sends an eligible call (few queries, enough keys) to the decode
    kernels, and a call with column sums or an explicit block to flash_stats; both match."""
    prob = _problem(Q=2, dtype=torch.bfloat16, seed=5)
    req = StatRequest(**ALL_ROW)
    calls = []
    orig = td.attention
    monkeypatch.setattr(td, "attention", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    monkeypatch.setattr(td, "DECODE_MIN_K", 1)
    out, got = ta.attention(**prob, stats=req)
    assert calls == [1]
    _check(prob, out, got, req)
    ta.attention(**prob, stats=StatRequest(received=True))
    ta.attention(**prob, stats=req, block=16)
    assert calls == [1]
    monkeypatch.setattr(td, "DECODE_MIN_K", 10 ** 9)
    ta.attention(**prob, stats=req)
    assert calls == [1]


def test_decode_nan_row_stays_nan(merge):
    """A NaN in one query makes that row NaN throughout (output and every float statistic), as in
    eager attention (spec.StatRequest); the other rows are untouched."""
    prob = _problem(B=1, H=4, G=2)
    prob["q"][0, 1, 0, 3] = float("nan")
    req = StatRequest(sink_k=2, entropy=True, distance=True, argmax=True)
    out, got = td.attention(**prob, stats=req)
    assert out[0, 1].isnan().all() and not out[0, [0, 2, 3]].isnan().any()
    for n in ("lse", "sink_mass", "entropy", "distance", "max_prob"):
        assert got[n][0, 1].isnan().all() and not got[n][0, [0, 2, 3]].isnan().any(), n


def test_partials_scratch_is_kept_per_stream_and_thread_and_shared_by_calls():
    """The partials live in scratch kept per (device, stream, thread): calls of one thread reuse it
    (one allocation less per eager call) and stay exact when their shapes and requests change
    between calls; another thread gets its own (its launches may fall between a call's partial and
    merge launches); a larger call gets a larger buffer."""
    import threading
    dev = torch.device(DEV)
    td._SCRATCH.clear()
    a = td.partial_scratch(dev, 100)
    assert td.partial_scratch(dev, 50) is a and a.dtype == torch.float32 and a.numel() >= 100
    other = []
    t = threading.Thread(target=lambda: other.append(td.partial_scratch(dev, 100)))
    t.start()
    t.join()
    assert other[0] is not a
    big = td.partial_scratch(dev, a.numel() + 1)
    assert big is not a and big.numel() > a.numel() and td.partial_scratch(dev, 10) is big
    td._SCRATCH.clear()
    reqs = [StatRequest(**ALL_ROW), None, StatRequest(argmax=True, entropy=True)]
    probs = [_problem(), _problem(B=1, H=4, G=4, Q=2, K=61, seed=1), _problem(B=3, H=6, G=3, K=90, seed=2)]
    for i in range(6):                                 # shapes and requests alternate on one scratch
        p, req = probs[i % 3], reqs[i % 3]
        out, got = td.attention(**p, stats=req)
        _check(p, out, got, req)
    assert len(td._SCRATCH) == 1


@pytest.mark.skipif(not CUDA, reason="the compiled-kernel launch (kernels/launch.py) is off in the interpreter")
def test_decode_steps_through_the_compiled_kernel_launch_stay_exact(merge):
    """A decode loop as generation runs it: the cache grows by one key per step, K / V are views at
    varying offsets, and the query is at times not 16-byte aligned (a kernel specialised for aligned
    pointers would fault or misread on it). The first call of each specialisation compiles, later
    ones launch the kept compiled kernel (``launch.fast``); every step matches the reference."""
    from headscope.kernels import launch
    prob = _problem(B=1, H=8, G=2, K=75, D=64, dtype=torch.bfloat16)
    req = StatRequest(**ALL_ROW)
    kk, vv, q = prob["k"], prob["v"], prob["q"]
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEV)
    q_odd = buf[1:].view(q.shape)                          # 2 bytes past a 16-byte boundary
    q_odd.copy_(q)
    assert q_odd.data_ptr() % 16 != 0
    steps = [(2000, 0, q), (2001, 0, q), (2002, 1, q), (2003, 0, q_odd), (2016, 3, q_odd), (2017, 0, q_odd),
             (2018, 0, q)]
    for K, off, qq in steps:
        p = dict(prob, q=qq, k=kk[:, :, off:off + K], v=vv[:, :, off:off + K])
        out, got = td.attention(**p, stats=req)
        _check(p, out, got, req)
    fl = launch.fast(td.decode_partial_kernel)
    assert fl.on and fl.plans and any(plan[1] for plan in fl.plans.values()), \
        "no key was reused: the loop did not exercise the compiled-kernel launch"
    assert any(plan[2] for plan in fl.plans.values()), \
        "no kept kernel went through Triton's launcher directly (launch._direct_handles)"
    assert any(b.keyed for p in td._PLANS.values() for b in p.partial.values()), \
        "no caller key was kept: the decode calls did not skip the full key (launch.Bound.run_keyed)"


def test_the_fast_path_declines_off_cuda_and_before_a_signature_is_kept():
    """``triton_decode.fast_attention`` returns None (the caller takes the full path) for CPU tensors
    (the interpreter; no CUDA call is made) and, on the GPU, for a signature no full call has kept;
    the full call then answers as ever."""
    td.clear_plans()
    prob = _problem(B=1, H=8, G=2, K=75, D=64)
    q, k, v = prob["q"], prob["k"], prob["v"]
    assert td.fast_attention(q, k, v, prob["scaling"], True, None, None, None, False) is None
    out, got = ta.attention(q, k, v, scaling=prob["scaling"], causal=True)
    _check(prob, out, got, None)


@pytest.mark.skipif(not CUDA, reason="the fast path takes calls whose kernel launches directly (off in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_repeated_decode_calls_take_the_fast_path_and_equal_the_full_path(dtype, monkeypatch):
    """``triton_attention.attention`` on decode loops whose cache grows a key a step, as generation
    runs them (every row statistic; argmax with a window and key positions; nothing recorded): once
    a signature's kernel launches directly, calls take ``triton_decode.fast_attention``, and every
    call equals the full path's (``triton_decode.attention``) bit for bit. Under ``VERIFY_KEYED``
    (this module's fixture) each fast call is also checked against the full path's plan, ``eligible``
    and specialisation key. What the fast path cannot vouch for takes the full path, with its result
    or its error: a misaligned query, a KV tensor of another dtype, an input that requires grad."""
    td.clear_plans()
    hits = []
    real = td.fast_attention

    def spy(*args):
        got = real(*args)
        hits.append(got is not None)
        return got
    monkeypatch.setattr(td, "fast_attention", spy)
    monkeypatch.setattr(td, "MERGE", "auto")
    prob = _problem(B=1, H=8, G=2, K=75, D=64, dtype=dtype)
    kk, vv, q = prob["k"], prob["v"], prob["q"]
    pos0 = torch.tensor([5], device=DEV)
    all_rows = StatRequest(**ALL_ROW)
    loops = ((all_rows, None, None), (StatRequest(argmax=True), 1000, pos0), (None, None, pos0))
    for req, window, kp0 in loops:
        n_hits = sum(hits)
        for K in range(2000, 2012):
            kw = dict(scaling=prob["scaling"], causal=True, sliding_window=window, key_pos0=kp0, stats=req)
            out, got = ta.attention(q, kk[:, :, :K], vv[:, :, :K], **kw)
            ref_out, ref = td.attention(q, kk[:, :, :K], vv[:, :, :K], **kw)
            assert torch.equal(out, ref_out) and set(got) == set(ref), (req, K)
            assert all(torch.equal(got[n], ref[n]) for n in ref), (req, K)
        assert sum(hits) - n_hits >= 4, f"the loop {req}, window {window} took the fast path {sum(hits) - n_hits} times"
    kw = dict(scaling=prob["scaling"], causal=True, stats=all_rows)     # the first loop's kept signature
    out, got = ta.attention(q, kk[:, :, :2005], vv[:, :, :2005], **kw)
    assert hits[-1], "a call of a kept signature did not take the fast path"
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEV)
    q_odd = buf[1:].view(q.shape)                          # 2 or 4 bytes past a 16-byte boundary
    q_odd.copy_(q)
    n_hits = sum(hits)
    out, got = ta.attention(q_odd, kk[:, :, :2005], vv[:, :, :2005], **kw)
    ref_out, ref = td.attention(q_odd, kk[:, :, :2005], vv[:, :, :2005], **kw)
    assert sum(hits) == n_hits and torch.equal(out, ref_out) and all(torch.equal(got[n], ref[n]) for n in ref)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(ta.Unsupported, match="dtypes"):
        ta.attention(q, kk[:, :, :2005].to(other), vv[:, :, :2005], **kw)
    with torch.enable_grad(), pytest.raises(ta.Unsupported, match="backward"):
        ta.attention(q.clone().requires_grad_(), kk[:, :, :2005], vv[:, :, :2005], **kw)
    assert sum(hits) == n_hits


@pytest.mark.skipif(not CUDA, reason="a race between GPU programs needs a GPU")
def test_fused_merge_gives_the_same_bits_call_after_call():
    """The fused merge: the last of a group's splits to finish merges them, after an acquire on the
    group's counter. A merge that read another split's partials before they landed would differ
    from call to call. 300 calls on Llama-3-8B decode shapes (33 splits a group on an H200), each
    bit-equal to the first, equal to the merge kernel's result within rounding, counters back at 0."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, 1, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 8, 8192, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, 8, 8192, 128, device="cuda", generator=g).bfloat16()
    req = StatRequest(sink_k=4, spans=((4, 68),), entropy=True, distance=True, window_distance=128, recent=64,
                      argmax=True)
    saved = td.MERGE
    try:
        td.MERGE = "fused"
        o0, s0 = td.attention(q, k, v, scaling=128 ** -0.5, stats=req)
        for _ in range(300):
            o, s = td.attention(q, k, v, scaling=128 ** -0.5, stats=req)
            assert torch.equal(o, o0) and all(torch.equal(s[n], s0[n]) for n in s0)
        assert (td.split_counts(q.device, 8)[:8] == 0).all()
        td.MERGE = "kernel"
        o1, s1 = td.attention(q, k, v, scaling=128 ** -0.5, stats=req)
    finally:
        td.MERGE = saved
    torch.testing.assert_close(o0, o1, atol=1e-2, rtol=1e-2)
    for n in s0:
        if n == "argmax":
            assert torch.equal(s0[n], s1[n])
        else:
            torch.testing.assert_close(s0[n], s1[n], atol=1e-5 * (8192 if n == "distance" else 1), rtol=1e-5)
