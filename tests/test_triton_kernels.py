"""The Triton kernels (kernels/triton_attention.py) against the eager reference: output, every row
statistic, column sums and every edit, on random small shapes (lengths off the block grid, GQA
ratios 1/2/4/8, windows, padding, decode Q < K, fp32/bf16/fp16).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before triton
is imported) with 16-wide tiles; with one they run compiled, at larger sizes, with the tuned tiles.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from headscope.kernels import chunked, reference, triton_attention as ta
from headscope.kernels.spec import LayerEdits, Redistribution, StatRequest

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
INTERP = ta.interpreting()
if not CUDA and not INTERP:
    pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)


def _speed_up_interpreter():
    """Test-time only: the interpreter re-patches triton.language on every nested jit call (tl.sum,
    tl.max, ...: ~6 ms each) and checks every int32 op for overflow; both are pure overhead at these
    sizes. Here each language module set is patched once per launch (as the first nested call
    would) and the overflow check is off; the kernels' semantics are untouched. Skipped silently if
    this Triton's internals differ."""
    try:
        import dataclasses
        import inspect

        from triton.runtime import interpreter as itp
        tl = triton.language
        itp.interpreter_builder.options = dataclasses.replace(itp.interpreter_builder.options,
                                                              sanitize_overflow=False)
        orig = itp._patch_lang
        state = {"depth": 0, "done": set()}

        class _Outer:
            def __init__(self, inner):
                self.inner = inner

            def restore(self):
                state["depth"] -= 1
                state["done"].clear()
                self.inner.restore()

        class _Noop:
            def restore(self):
                pass

        def patch(fn):
            key = frozenset(id(m) for m in fn.__globals__.values()
                            if inspect.ismodule(m) and m in (tl, tl.core))
            if state["depth"] > 0:
                if key not in state["done"]:
                    state["done"].add(key)
                    orig(fn)            # nested patches are never restored by the interpreter either
                return _Noop()
            state["depth"] += 1
            state["done"] = {key}
            return _Outer(orig(fn))

        itp._patch_lang = patch
    except Exception:
        pass


if INTERP:
    _speed_up_interpreter()

MAX_K = 700 if CUDA else 44
BLOCK = None if CUDA else 16
# examples per property test; HEADSCOPE_KERNEL_EXAMPLES=N for a longer (still derandomized) sweep
EXAMPLES = int(os.environ.get("HEADSCOPE_KERNEL_EXAMPLES", 6 if CUDA else 10))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# output tolerance by dtype (p is cast to the value dtype for the PV product, as in FlashAttention)
OUT_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
HYP = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
               suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw, max_k=MAX_K):
    """A random attention problem: shapes, dtype, masking and positions."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    B = draw(st.integers(1, 2))
    G = draw(st.integers(1, 2))
    ratio = draw(st.sampled_from([1, 2, 4, 8]))
    H = G * ratio
    K = draw(st.integers(1, max_k))
    Q = draw(st.one_of(st.just(K), st.just(1), st.integers(1, K)))
    D = draw(st.sampled_from([64, 128, 80, 256, 32] if CUDA else [32, 16, 80, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    causal = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True
    window = draw(st.one_of(st.none(), st.integers(1, max(1, K))))
    pad = draw(st.booleans())
    pos0 = draw(st.booleans())
    softcap = draw(st.sampled_from([None, None, None, 20.0]))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g)
    k = torch.randn(B, G, K, D, generator=g)
    v = torch.randn(B, G, K, D, generator=g)
    if draw(st.booleans()):       # peaky scores (sinks): a few keys with large logits
        k[:, :, : min(K, 2)] *= 3
    kp = None
    if pad:
        kp = torch.rand(B, K, generator=g) > 0.25
        kp[0, :min(K, 3)] = False          # left padding on row 0
    kpos0 = torch.randint(-5, 6, (B,), generator=g) if pos0 else None
    return dict(q=q.to(DEV, dtype), k=k.to(DEV, dtype), v=v.to(DEV, dtype), scaling=D ** -0.5,
                causal=causal, sliding_window=window, key_padding=kp.to(DEV) if kp is not None else None,
                key_pos0=kpos0.to(DEV) if kpos0 is not None else None, softcap=softcap)


def _ref(prob, **kw):
    """The eager reference in fp32 on the same (rounded) inputs, with its probabilities."""
    p = dict(prob)
    for n in ("q", "k", "v"):
        p[n] = p[n].float()
    return reference.attention(**p, want_probs=True, **kw)


def _close(name, got, want, atol, rtol=1e-4):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    # NaN only where the reference has NaN (an edit that drives probabilities negative: xlogy's
    # entropy is NaN there, spec.StatRequest), nowhere else
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert bool(want.isnan().float().mean() < 0.5) if want.is_floating_point() and want.numel() else True, \
        f"{name}: the reference is mostly NaN: the problem is degenerate"


def _check_stats(prob, got, want, probs, K):
    """Row statistics (and column sums) of the kernel vs the reference's, dtype-independent
    tolerances: statistics are fp32 from fp32-accumulated scores whatever the input dtype."""
    assert set(got) == set(want), f"keys {sorted(got)} != {sorted(want)}"
    tol = 2e-3 if prob["q"].dtype != torch.float32 else 2e-4
    for name, w in want.items():
        g = got[name]
        if name == "argmax":
            continue
        scale = {"distance": K, "window_distance": K, "received_sum": max(1, K)}.get(name, 1.0)
        if name == "lse":
            scale = 10.0
        if name == "entropy":
            scale = math.log(K + 1)
        _close(name, g, w, atol=tol * scale)
    if "argmax" in want:
        g, w = got["argmax"], want["argmax"]
        assert g.dtype == torch.int64 and g.shape == w.shape
        pos0 = prob["key_pos0"]
        if pos0 is None:
            pos0 = torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
        idx = (g - pos0.view(-1, 1, 1)).clamp(0, K - 1)
        at = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1)       # reference p at the kernel's argmax
        _close("p[argmax]", at, want["max_prob"], atol=tol)
        # where the reference's top key is clearly ahead, the index must be identical
        top2 = probs.topk(min(2, K), dim=-1).values
        clear = (top2[..., 0] - top2[..., -1] > 1e-3) if K > 1 else torch.ones_like(g, dtype=torch.bool)
        assert torch.equal(g[clear], w[clear]), "argmax differs where the top key is clear"


ALL_ROW = dict(sink_k=2, spans=((3, 9), (0, 1), (12, 30)), entropy=True, distance=True,
               window_distance=5, recent=4, argmax=True)


# ---------------------------------------------------------------------------------------------
@HYP
@given(prob=problems())
def test_plain_output(prob):
    out, st_ = ta.attention(**prob, block=BLOCK)
    assert st_ == {}
    ref, _, _ = _ref(prob)
    assert out.dtype == prob["q"].dtype and out.shape == prob["q"].shape
    atol, rtol = OUT_TOL[out.dtype]
    _close("out", out.float(), ref, atol=atol, rtol=rtol)


@HYP
@given(prob=problems())
def test_row_statistics(prob):
    req = StatRequest(**ALL_ROW)
    out, got = ta.attention(**prob, stats=req, block=BLOCK)
    ref, want, probs = _ref(prob, stats=req)
    atol, rtol = OUT_TOL[out.dtype]
    _close("out", out.float(), ref, atol=atol, rtol=rtol)
    _check_stats(prob, got, want, probs, prob["k"].shape[2])


@HYP
@given(prob=problems(), rwin=st.one_of(st.none(), st.tuples(st.integers(0, 6), st.integers(0, 30)).map(sorted).map(tuple)))
def test_received(prob, rwin):
    req = StatRequest(received=True, received_window=rwin, sink_k=1)
    _, got = ta.attention(**prob, stats=req, block=BLOCK)
    _, want, probs = _ref(prob, stats=req)
    _check_stats(prob, got, want, probs, prob["k"].shape[2])


@st.composite
def edits(draw, H, D, K):
    heads = list(range(H))
    perm = draw(st.permutations(heads))
    e = LayerEdits()
    if draw(st.booleans()):
        qs = torch.rand(H) + 0.5
        qs[perm[0]] = 1e-4                  # uniform-attention ablation
        e.q_scale = qs
    reds = []
    n_red = draw(st.integers(0, min(2, H)))
    for i in range(n_red):
        a = draw(st.integers(-2, max(0, K - 1)))
        src = ((a, a + draw(st.integers(1, 5))),) + (((0, 1),) if draw(st.booleans()) else ())
        tgt = None
        if draw(st.booleans()):
            b = draw(st.integers(0, max(0, K - 1)))
            tgt = ((b, b + draw(st.integers(1, 20))),)
        var = draw(st.booleans())
        reds.append(Redistribution(heads=(perm[i],), factor=draw(st.sampled_from([0.0, 0.4, 0.6, 1.0])),
                                   source=src, target=tgt,
                                   max_ratio=draw(st.sampled_from([0.3, 0.5, 0.9])) if var else None,
                                   min_target=draw(st.sampled_from([0.0, 0.2])) if var else 0.0,
                                   min_query=draw(st.sampled_from([None, None, 0, K // 2, K - 1]))))
    e.redistributions = tuple(reds)
    if draw(st.booleans()):
        e.gate = torch.rand(H)
        e.gate_sink = draw(st.integers(0, 3))
        e.gate_recent = draw(st.integers(0, 8))
    return e


def _to(e: LayerEdits, dev):
    f = lambda t: t.to(dev) if t is not None else None  # noqa: E731
    return LayerEdits(q_scale=f(e.q_scale), redistributions=e.redistributions, gate=f(e.gate),
                      gate_sink=e.gate_sink, gate_recent=e.gate_recent)


@HYP
@given(data=st.data())
def test_edits(data):
    prob = data.draw(problems())
    H, D, K = prob["q"].shape[1], prob["q"].shape[3], prob["k"].shape[2]
    e = _to(data.draw(edits(H, D, K)), DEV)
    req = StatRequest(**ALL_ROW, received=True)
    out, got = ta.attention(**prob, stats=req, edits=e, block=BLOCK)
    ref, want, probs = _ref(prob, stats=req, edits=e)
    atol, rtol = OUT_TOL[out.dtype]
    _close("out", out.float(), ref, atol=atol, rtol=rtol)
    _check_stats(prob, got, want, probs, K)


def test_min_query_holds_back_earlier_rows():
    """``Redistribution.min_query`` (VAR's query rows): the kernel's first pass gives coefficients
    for every row, rows of queries before min_query get 1 back; output, row statistics and column
    sums equal the reference's, under left padding (positions shift) and Q < K (a cached prefix)."""
    kp = torch.ones(2, 45, dtype=torch.bool, device=DEV)
    kp[1, :5] = False
    prob = _fixed_problem(Q=29, key_padding=kp, key_pos0=-(~kp).sum(-1))
    red = Redistribution(heads=(1, 2), factor=0.2, source=((0, 3),), target=((3, 20),), min_query=30)
    e = LayerEdits(redistributions=(red,))
    req = StatRequest(**ALL_ROW, received=True)
    out, got = ta.attention(**prob, stats=req, edits=e, block=BLOCK)
    ref, want, probs = _ref(prob, stats=req, edits=e)
    _close("out", out.float(), ref, atol=2e-5, rtol=2e-5)
    _check_stats(prob, got, want, probs, prob["k"].shape[2])
    every, _ = ta.attention(**prob, edits=LayerEdits(redistributions=(dataclasses.replace(red, min_query=None),)),
                            block=BLOCK)
    assert float((every.float() - out.float()).abs().max()) > 1e-3       # min_query changed something


# ---------------------------------------------------------------------------------------------
def _fixed_problem(B=2, H=4, G=2, Q=37, K=45, D=32, dtype=torch.float32, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    p = dict(q=torch.randn(B, H, Q, D, generator=g), k=torch.randn(B, G, K, D, generator=g),
             v=torch.randn(B, G, K, D, generator=g))
    p = {n: t.to(DEV, dtype) for n, t in p.items()}
    p.update(scaling=D ** -0.5, causal=True, sliding_window=None, key_padding=None, key_pos0=None, softcap=None)
    p.update(kw)
    return p


def test_matches_sdpa_and_chunked_contract():
    """Plain output vs transformers' sdpa attention (dense bool mask), and the result dict of the
    chunked path (keys, shapes, dtypes) for a full request."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    kp = torch.ones(2, 45, dtype=torch.bool, device=DEV)
    kp[1, :4] = False
    prob = _fixed_problem(key_padding=kp, sliding_window=20)
    out, _ = ta.attention(**prob, block=BLOCK)
    vis = reference.visibility(torch.arange(8, 45, device=DEV), torch.arange(45, device=DEV), causal=True,
                               sliding_window=20, key_padding=kp)[:, None]
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, layer_idx=0)
    sd, _ = sdpa_attention_forward(module, prob["q"], prob["k"], prob["v"], vis.expand(2, 1, 37, 45),
                                   scaling=prob["scaling"], is_causal=False)
    torch.testing.assert_close(out.transpose(1, 2), sd, atol=1e-5, rtol=1e-5)

    req = StatRequest(**ALL_ROW, received=True, received_window=(0, 9))
    _, got = ta.attention(**prob, stats=req, block=BLOCK)
    cpu = {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in prob.items()}   # chunked is the CPU path
    _, want = chunked.attention(**cpu, stats=req, block=16)
    assert {n: (tuple(t.shape), t.dtype) for n, t in got.items()} == \
        {n: (tuple(t.shape), t.dtype) for n, t in want.items()}


def test_empty_rows_and_positions():
    """Rows that see no key (all keys padded) give lse -inf, zero output and zero statistics, like
    the reference; argmax is a position (key_pos0 + cache index)."""
    kp = torch.ones(2, 45, dtype=torch.bool, device=DEV)
    kp[1] = False
    prob = _fixed_problem(key_padding=kp, key_pos0=torch.tensor([3, -4], device=DEV))
    req = StatRequest(**ALL_ROW, received=True)
    out, got = ta.attention(**prob, stats=req, block=BLOCK)
    ref, want, probs = _ref(prob, stats=req)
    torch.testing.assert_close(out, ref)
    assert torch.isneginf(got["lse"][1]).all()
    _check_stats(prob, got, want, probs, 45)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_first_index_on_exact_ties_across_blocks(dtype):
    """Repeated key vectors make exact score ties, and the rows' maxima first occur in different key
    blocks (so several blocks are searched again after the loop): the kernel's argmax is the first
    position holding the row's max, as in the reference, and max_prob is that key's probability."""
    g = torch.Generator().manual_seed(3)
    H, K, d = 2, 150, 16
    base = torch.randn(40, d, generator=g)                           # 40 distinct key vectors
    k = base[torch.randint(0, 40, (K,), generator=g)].view(1, 1, K, d)
    q = 3 * base[torch.randint(0, 40, (H * K,), generator=g)].view(1, H, K, d)  # each aims at one vector
    v = torch.randn(1, 1, K, d, generator=g)
    q, k, v = (x.to(device=DEV, dtype=dtype) for x in (q, k, v))
    _, got = ta.attention(q, k, v, scaling=d ** -0.5, causal=True, stats=StatRequest(argmax=True), block=BLOCK)
    s = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5                      # [1, H, K, K]
    s = s.masked_fill(torch.ones(K, K, dtype=torch.bool, device=DEV).triu(1), float("-inf"))
    mx = s.amax(-1, keepdim=True)
    first = (s == mx).float().argmax(-1)                             # first True = first index of the max
    ties = (s == mx).sum(-1) > 1                                     # the max sits on several (equal) keys
    # compare where the runner-up *other* score is clearly below the max, so that the kernel's and
    # the reference's summation orders cannot swap two different keys (equal keys tie exactly in both)
    clear = (mx.squeeze(-1) - s.masked_fill(s == mx, float("-inf")).amax(-1)) > 1e-3
    assert (ties & clear).float().mean() > 0.3, "most rows should hold their max on several keys"
    assert torch.equal(got["argmax"][clear], first[clear])
    blocks = (first // (BLOCK or 64)).unique().numel()
    assert blocks > 1, "the rows' maxima should sit in several key blocks"
    torch.testing.assert_close(got["max_prob"], s.softmax(-1).amax(-1), atol=1e-5, rtol=1e-4)


def test_unsupported():
    prob = _fixed_problem()
    with pytest.raises(ta.Unsupported, match="several redistributions"):
        r = Redistribution(heads=(1,), factor=0.5, source=((0, 1),))
        ta.attention(**prob, edits=LayerEdits(redistributions=(r, r)), block=BLOCK)
    gate = torch.rand(4, device=DEV, requires_grad=True)
    with pytest.raises(ta.Unsupported, match="requires grad"):
        ta.attention(**prob, edits=LayerEdits(gate=gate), block=BLOCK)
    with torch.no_grad():   # inference with a trainable tensor is fine
        ta.attention(**prob, edits=LayerEdits(gate=gate), block=BLOCK)
    with pytest.raises(ta.Unsupported, match="Q <= K"):
        ta.attention(**{**prob, "q": prob["k"].repeat(1, 2, 2, 1)}, block=BLOCK)
    with pytest.raises(ta.Unsupported, match="dtypes"):
        ta.attention(**{**prob, "v": prob["v"].half()}, block=BLOCK)
    with pytest.raises(ta.Unsupported, match="head_dim"):
        big = _fixed_problem(D=320, Q=3, K=3)
        ta.attention(**big, block=BLOCK)
    assert ta.available(prob["q"])


def test_received_is_deterministic():
    prob = _fixed_problem(B=1, H=8, G=2, Q=40, K=40, dtype=torch.bfloat16)
    req = StatRequest(received=True)
    a = ta.attention(**prob, stats=req, block=BLOCK)[1]["received_sum"]
    b = ta.attention(**prob, stats=req, block=BLOCK)[1]["received_sum"]
    assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="long-context check needs a GPU")
def test_long_context_cuda():
    """A long decode-style problem on the GPU: chunked reference vs kernel, with statistics."""
    prob = _fixed_problem(B=1, H=8, G=2, Q=300, K=9000, D=128, dtype=torch.bfloat16,
                          sliding_window=4096, key_pos0=torch.tensor([-7], device=DEV))
    req = StatRequest(**ALL_ROW, received=True)
    out, got = ta.attention(**prob, stats=req)
    p32 = {**prob, "q": prob["q"].float(), "k": prob["k"].float(), "v": prob["v"].float()}
    ref, want = chunked.attention(**p32, stats=req, block=128)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for n in want:
        if n != "argmax":
            torch.testing.assert_close(got[n], want[n], atol=2e-3 * (9000 if "dist" in n or n == "received_sum" else 1),
                                       rtol=1e-3, msg=lambda m: f"{n}: {m}")


def test_device_cache_builds_once_and_stays_bounded(monkeypatch):
    """``device_cache.cached`` hands back the same tensor for a key (built once), a new one for a new
    key, and empties itself at MAX_ENTRIES instead of growing with every shape a session meets."""
    from headscope.kernels import device_cache
    monkeypatch.setattr(device_cache, "_CACHE", {})
    monkeypatch.setattr(device_cache, "MAX_ENTRIES", 3)
    built = []

    def make(n):
        built.append(n)
        return torch.zeros(n)
    a = device_cache.cached(("z", 2), lambda: make(2))
    assert device_cache.cached(("z", 2), lambda: make(2)) is a and built == [2]
    assert device_cache.cached(("z", 3), lambda: make(3)).shape == (3,) and built == [2, 3]
    for n in (4, 5, 6):
        device_cache.cached(("z", n), lambda n=n: make(n))
    assert len(device_cache._CACHE) <= 3
    assert device_cache.cached(("z", 2), lambda: make(2)) is not a          # evicted, built again


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a layer on the second GPU)")
def test_a_call_on_another_gpu_than_the_current_one_runs_there():
    """A layer of a model split over GPUs (device map) calls the kernels with tensors on a GPU other
    than the current one. The kernels launch on the current device, so ``attention`` switches to the
    tensors' device: same results as on the first GPU, and the current device is left as it was."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3000, 64, generator=g), torch.randn(1, 2, 3000, 64, generator=g)   # decode: K >= DECODE_MIN_K
    req = StatRequest(**ALL_ROW)
    got = {}
    for dev in ("cuda:0", "cuda:1"):
        q1 = q[:, :, -1:].to(dev, torch.bfloat16)
        for name, qq in (("prefill", q.to(dev, torch.bfloat16)), ("decode", q1)):
            torch.cuda.set_device(0)
            kk = k.to(dev, torch.bfloat16)
            got[dev, name] = ta.attention(qq, kk, kk, scaling=0.125, stats=req, block=None)
            torch.cuda.synchronize(dev)
            assert torch.cuda.current_device() == 0
    for name in ("prefill", "decode"):
        o0, s0 = got["cuda:0", name]
        o1, s1 = got["cuda:1", name]
        assert o1.device == torch.device("cuda:1")
        torch.testing.assert_close(o1.cpu(), o0.cpu())
        for n in s0:
            torch.testing.assert_close(s1[n].cpu(), s0[n].cpu(), msg=lambda m: f"{name} {n}: {m}")
