"""Bad and tricky inputs at the probe's model/input boundary: each case gives a clear error or the
correct result, never a silently wrong one (padded batches keep their mask, unknown keywords are
refused, float indices are not truncated, NaN propagates the same on every CPU path, attention
keywords that change the math are implemented or refused, every fast path returns every requested
statistic or declines with one message)."""
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import headscope as hs
from headscope.kernels import LayerEdits, Redistribution, StatRequest, chunked, cpu_native, reference
from headscope.kernels import triton_attention as ta
from headscope.kernels.spec import expected_keys
from headscope.probe.attention import IGNORED_KWARGS, headscope_attention

ALL = StatRequest(sink_k=2, spans=((1, 4), (0, 1)), entropy=True, distance=True, window_distance=3, recent=2,
                  argmax=True, received=True)


def live_attention_module():
    """The copy of probe/attention.py transformers calls (pytest may import the package twice)."""
    return sys.modules[ALL_ATTENTION_FUNCTIONS["headscope"].__module__]


# ------------------------------------------------------------------ padded batches carry their mask
@pytest.mark.slow
@torch.no_grad()
def test_padded_list_rows_equal_each_prompt_alone(smollm2):
    m = smollm2
    short, long = "The capital of France is", "Once upon a time, in a land far away, there lived"
    toks = m.to_tokens([short, long])                             # left-padded [2, N]
    assert toks.shape[0] == 2 and m.padding_mask(toks) is not None
    batch = m(toks)
    inferred = m(toks.clone())                                    # a tensor not made by to_tokens: TL rule
    for i, text in enumerate((short, long)):
        alone = m.to_tokens(text)
        n = alone.shape[1]
        assert torch.equal(toks[i, -n:], alone[0])
        assert (batch[i, -n:] - m(alone)[0]).abs().max() < 1e-4, i
        assert (inferred[i, -n:] - m(alone)[0]).abs().max() < 1e-4, i
    gen = m.generate(toks, max_new_tokens=3)                       # generate keeps the mask too
    alone = m.to_tokens(short)
    assert torch.equal(gen[0, -3:], m.generate(alone, max_new_tokens=3)[0, -3:])


def test_padding_mask_follows_transformerlens_when_pad_is_bos():
    from transformer_lens.utilities.tokenize_utils import get_attention_mask
    m = hs.load("tiny-llama")
    toks = torch.tensor([[5, 5, 5, 9, 8], [5, 7, 9, 8, 6], [4, 5, 6, 7, 8]])

    def tl_mask(tokenizer):   # TransformerLens' rule with its default prepend_bos=True
        return get_attention_mask(tokenizer, toks, prepend_bos=True, padding_side="left")

    # pad != bos: the leading pad run is masked, pads later in a row are real tokens
    m.tokenizer = SimpleNamespace(pad_token_id=5, bos_token_id=1)
    assert torch.equal(m.padding_mask(toks), torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert torch.equal(m.padding_mask(toks), tl_mask(m.tokenizer))
    # pad == bos: the last token of the run is the BOS and stays visible, whether or not the
    # tokenizer prepends one itself (SmolLM2's GGUF tokenizer in transformers 5.17: no pad token,
    # EOS = BOS = 1 and no BOS of its own -- masking the BOS there changed every inferred-mask forward)
    for prepends in ([60], [5, 60]):
        m.tokenizer = lambda text, ids=prepends: {"input_ids": ids}
        m.tokenizer.pad_token_id = m.tokenizer.bos_token_id = 5
        assert torch.equal(m.padding_mask(toks), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
        assert torch.equal(m.padding_mask(toks), tl_mask(m.tokenizer))
        assert m.padding_mask(torch.tensor([[5, 9, 8, 7]])) is None      # a to_tokens-style row: all visible
    # no BOS token (Qwen2): to_tokens prepends the EOS, which is also the pad; TL's tokenizer setup
    # installs that EOS as BOS, so TL keeps it visible too
    m.tokenizer = SimpleNamespace(pad_token_id=5, bos_token_id=None, eos_token_id=5)
    assert torch.equal(m.padding_mask(toks), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert torch.equal(m.padding_mask(toks), tl_mask(SimpleNamespace(pad_token_id=5, bos_token_id=5)))
    m.tokenizer = SimpleNamespace(pad_token_id=5, bos_token_id=1)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of the tokens are all padding"):
        m(torch.tensor([[4, 5, 6], [5, 5, 5]]))
    # no tokenizer: nothing is inferred
    m.tokenizer = None
    assert m.padding_mask(toks) is None


# ------------------------------------------------------------------ forward keywords
@torch.no_grad()
def test_return_type_and_unknown_keywords(tiny_llama):
    m = tiny_llama
    toks = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = m(toks)
    logp = torch.log_softmax(logits, -1)
    want = -logp[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]        # [2, 8]
    assert torch.allclose(m(toks, return_type="loss"), want.mean(), atol=1e-6)
    assert torch.allclose(m(toks, return_type="loss", loss_per_token=True), want, atol=1e-6)
    both = m(toks, return_type="both")
    assert torch.allclose(both[0], logits) and torch.allclose(both[1], want.mean(), atol=1e-6)
    assert m(toks, return_type=None) is None
    mask = torch.ones_like(toks)
    mask[1, :3] = 0                                                   # padded positions leave the mean
    per = m(toks, attention_mask=mask, return_type="loss", loss_per_token=True)
    assert (per[1, :3] == 0).all() and (per[0] > 0).all()
    assert torch.allclose(m(toks, attention_mask=mask, return_type="loss"), per.sum() / (16 - 3), atol=1e-6)
    with pytest.raises(TypeError, match="unexpected keyword.*'foo'.*accepted: tokens, attention_mask, return_type"):
        m(toks, foo=1)
    with pytest.raises(TypeError, match="prepend_bos"):
        m.run_with_cache(toks, prepend_bos=False)
    with pytest.raises(ValueError, match="return_type='bogus'"):
        m(toks, return_type="bogus")
    assert m(toks, logits_to_keep=1).shape == (2, 1, 128)             # HF's logits_to_keep passes through


# ------------------------------------------------------------------ indices
@torch.no_grad()
def test_float_layer_and_head_indices_are_refused(tiny_llama):
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 7))
    _, cache = m.run_with_cache(toks, names_filter="blocks.1.hook_resid_pre")
    resid = cache["resid_pre", 1]
    for bad in (1.0, 1.5, torch.tensor(1.0), True):
        with pytest.raises(TypeError, match="start_at_layer must be an integer"):
            m(toks, start_at_layer=bad, resid_pre=resid)
        with pytest.raises(TypeError, match="must be an integer"):
            with m.start_at(bad, resid):
                pass
    with pytest.raises(TypeError, match="layers must be an integer"):
        with m.record(entropy=True, layers=[0, 1.0]):
            pass
    with pytest.raises(TypeError, match="heads must be an integer"):
        with m.record(entropy=True, heads=2.0):
            pass
    with pytest.raises(IndexError, match="head 4 out of range"):
        with m.record(entropy=True, heads=[4]):
            pass
    # integer types that are not Python ints are fine and mean what they say
    base = m(toks, start_at_layer=1, resid_pre=resid)
    for ok in (np.int64(1), torch.tensor(1)):
        assert torch.equal(m(toks, start_at_layer=ok, resid_pre=resid), base)
    with m.record(entropy=True, layers=np.array([1]), heads=torch.tensor([0, 2])) as rec:
        m(toks)
    assert rec.layers == [1] and rec["entropy", 1].shape == (1, 2, 7)


# ------------------------------------------------------------------ prompts
def test_over_long_and_empty_prompts(tiny_llama):
    m = tiny_llama
    with pytest.raises(ValueError, match="empty prompt"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty prompt"):
        m([])
    with pytest.raises(ValueError, match="allows at most 512"):
        m(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m.generate(torch.zeros(1, 510, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(TypeError, match="integer token ids"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="no tokenizer"):
        m("hello")


# ------------------------------------------------------------------ NaN / inf
def _nan_inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 11, 8, generator=g)
    k = torch.randn(2, 2, 11, 8, generator=g)
    v = torch.randn(2, 2, 11, 8, generator=g)
    q[0, 1, 5, 0] = float("nan")                    # one query row NaN
    k[1, 0, 7, 2] = float("inf")                    # +inf scores for some queries, -inf for others
    k[1, 1, 3, 0] = float("nan")                    # a NaN key: every query that sees it
    kp = torch.ones(2, 11, dtype=torch.bool)
    kp[1, :2] = False
    return q, k, v, kp, -(~kp).sum(-1)


def _same_nan(a, b, tol=2e-5):
    assert torch.equal(a.isnan(), b.isnan()), (a.isnan() ^ b.isnan()).nonzero()[:5]
    fin = ~a.isnan()
    assert torch.allclose(a[fin].float(), b[fin].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [None, 4])
def test_nan_and_inf_scores_propagate_the_same_on_every_cpu_path(window, monkeypatch):
    q, k, v, kp, pos0 = _nan_inputs()
    stats = StatRequest(**{**ALL.__dict__, "received_window": (1, 5)}) if window else ALL
    kw = dict(scaling=8 ** -0.5, sliding_window=window, key_padding=kp, key_pos0=pos0, stats=stats)
    out_r, st_r, _ = reference.attention(q, k, v, **kw)
    assert out_r.isnan().any() and not out_r.isnan().all()
    results = {"torch": chunked.attention(q, k, v, native=False, block=4, **kw)}
    if cpu_native.available():
        results["native"] = chunked.attention(q, k, v, block=4, **kw)
    for path, (out, st) in results.items():
        _same_nan(out_r, out)
        assert set(st) == set(st_r), path
        for name in st_r:
            if name != "argmax":                    # argmax of a NaN row is unspecified (spec.py)
                _same_nan(st_r[name], st[name])
        rows = ~st_r["max_prob"].isnan()
        assert torch.equal(st_r["argmax"][rows], st["argmax"][rows]), path
    # NaN rows are NaN, not zeros: the row of the NaN query
    assert results["torch"][0][0, 1, 5].isnan().all()


@torch.no_grad()
def test_nan_activation_gives_nan_logits_with_and_without_the_fused_row_pass(tiny_llama, monkeypatch):
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))

    def poison(q, hook):                            # q [batch, pos, head, d_head]
        q = q.clone()
        q[0, 6, 1, 0] = float("nan")
        return q

    outs = []
    for native in ("1", "0"):
        monkeypatch.setenv("HEADSCOPE_NATIVE", native)
        with m.record(entropy=True, argmax=True) as rec:
            outs.append(m.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_q", poison)]))
        assert rec["entropy", 0][0, 1, 6].isnan()
    a, b = outs
    # NaN from position 6 on (earlier positions too, as in eager attention: their zero weight on
    # key 6 times its NaN value is NaN); never finite zeros
    assert a[0, 6:].isnan().all()
    _same_nan(a, b)


# ------------------------------------------------------------------ attention keywords
class _Attn(torch.nn.Module):
    is_causal = True
    layer_idx = 0


def test_attention_keywords_that_change_the_math_are_refused():
    mod = _Attn().eval()
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, _ = headscope_attention(mod, q, k, v, None, scaling=0.3, dropout=0.1)        # eval: no dropout
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
    mod.train()
    with pytest.raises(NotImplementedError, match="dropout.*model.eval"):
        headscope_attention(mod, q, k, v, None, scaling=0.3, dropout=0.1)
    mod.eval()
    with pytest.raises(NotImplementedError, match="position_bias"):
        headscope_attention(mod, q, k, v, None, scaling=0.3, position_bias=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="cu_seq_lens_q"):
        headscope_attention(mod, q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 5]))
    # None means "off"; the allow-listed bookkeeping arguments do not change the math
    extra = {name: object() for name in IGNORED_KWARGS}
    out2, _ = headscope_attention(mod, q, k, v, None, scaling=0.3, position_bias=None, **extra)
    assert torch.equal(out, out2)
    # is_causal=False is honoured, s_aux (learned sinks) is implemented
    out3, _ = headscope_attention(mod, q, k, v, None, scaling=0.3, is_causal=False)
    assert torch.allclose(out3, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
                          .transpose(1, 2), atol=1e-6)
    sinks = torch.tensor([0.5, -1.0])
    out4, _ = headscope_attention(mod, q, k, v, None, scaling=0.3, s_aux=sinks)
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    logits = torch.cat([s, sinks.view(1, 2, 1, 1).expand(1, 2, 5, 1)], -1)
    want = torch.softmax(logits, -1)[..., :-1] @ v                   # transformers' GPT-OSS eager math
    assert torch.allclose(out4, want.transpose(1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="one sink logit per head"):
        headscope_attention(mod, q, k, v, None, scaling=0.3, s_aux=torch.zeros(3))


# ------------------------------------------------------------------ fast paths declare what they do
def test_fast_paths_declare_support():
    red = LayerEdits(redistributions=(Redistribution((0,), 0.5, ((0, 1),)),))
    assert cpu_native.supports(ALL, None) is None
    assert "redistributions" in cpu_native.supports(ALL, red)
    assert "s_aux" in cpu_native.supports(ALL, None, sinks=True)
    assert "backward" in cpu_native.supports(None, None, grad=True)
    assert ta.supports(ALL, red) is None
    assert "s_aux" in ta.supports(ALL, None, sinks=True)
    assert cpu_native.SUPPORTED_STATS == ta.SUPPORTED_STATS == frozenset(StatRequest.__dataclass_fields__)
    with pytest.raises(ta.Unsupported, match="s_aux"):
        ta.attention(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), scaling=0.25,
                     sinks=torch.zeros(2))


def test_every_path_returns_every_requested_statistic():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    kw = dict(scaling=0.25, stats=ALL)
    ref = reference.attention(q, k, v, **kw)[1]
    assert set(ref) == set(expected_keys(ALL))
    got = {"chunked-torch": chunked.attention(q, k, v, native=False, **kw)[1]}
    if cpu_native.available():
        got["chunked-native"] = chunked.attention(q, k, v, native=None, **kw)[1]
    got["chunked-sinks"] = chunked.attention(q, k, v, sinks=torch.zeros(2), **kw)[1]
    if ta.available(q):
        got["triton"] = ta.attention(q, k, v, **kw)[1]
    for path, st in got.items():
        assert set(st) == set(ref), path


@torch.no_grad()
def test_probe_falls_back_with_one_message_and_every_key(tiny_llama, caplog):
    """A redistribution edit is outside the fused C row pass's declaration: the probe says so once
    (however many layers and calls) and the chunked PyTorch row pass returns every statistic."""
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 10))
    live_attention_module()._declined.clear()
    with caplog.at_level(logging.WARNING, logger="headscope"):
        with m.edit(hs.ScaleKeys(0, 1, keys=[(0, 2)], factor=0.5)), m.record(ALL) as rec:
            m(toks)
            m(toks)
    msgs = [r.getMessage() for r in caplog.records if "redistributions" in r.getMessage()]
    assert len(msgs) == (1 if cpu_native.available() else 0), msgs
    assert set(rec.names) == set(expected_keys(ALL))
    assert rec["entropy", 0].shape == (1, 4, 20)


@pytest.mark.parametrize("window", [None, 3])
def test_sink_statistics_have_the_sink_in_the_denominator(window):
    """Learned sinks (GPT-OSS's s_aux): p = softmax over [scores, sink] without the sink column;
    the reference's statistics are those of this p (spec.StatRequest), and the chunked path's
    (PyTorch row pass, blocks of 4 queries, left padding) equal the reference's."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    sinks = torch.tensor([1.0, -2.0, 0.0, 3.0])
    kp = torch.ones(2, 9, dtype=torch.bool)
    kp[1, :2] = False
    kw = dict(scaling=0.35, sliding_window=window, key_padding=kp, key_pos0=-(~kp).sum(-1), stats=ALL, sinks=sinks)
    out_r, st_r, p_r = reference.attention(q, k, v, want_probs=True, **kw)
    # by hand on the unpadded sequence 0
    s = q[0] @ k[0].repeat_interleave(2, 0).transpose(-1, -2) * 0.35                      # [H, 9, 9]
    t = torch.arange(9)
    vis = (t[:, None] >= t[None, :]) & ((t[:, None] - t[None, :] < window) if window else True)
    s = s.masked_fill(~vis, float("-inf"))
    full = torch.cat([s, sinks.view(4, 1, 1).expand(4, 9, 1)], -1)
    p = torch.softmax(full, -1)[..., :-1]
    assert torch.allclose(p_r[0], p, atol=1e-6)
    assert torch.allclose(st_r["lse"][0], torch.logsumexp(full, -1), atol=1e-5)
    assert torch.allclose(st_r["entropy"][0], -torch.special.xlogy(p, p).sum(-1), atol=1e-5)
    assert torch.allclose(st_r["sink_mass"][0], p[..., :2].sum(-1), atol=1e-6)
    assert (p.sum(-1) < 1).all()                                  # the sink keeps its share
    out_c, st_c = chunked.attention(q, k, v, native=False, block=4, **kw)
    assert torch.allclose(out_c, out_r, atol=1e-5)
    assert set(st_c) == set(st_r)
    for name in st_r:
        assert torch.allclose(st_c[name].float(), st_r[name].float(), atol=2e-5), name
