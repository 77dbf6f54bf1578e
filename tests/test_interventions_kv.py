"""KV-cache compression by head class (DuoAttention / RazorAttention deployment): the two-group
cache gives the same tokens as the mask-only streaming gate over a full cache, and holds the
expected number of bytes."""
import pytest
import torch

import headscope as hs
from headscope.interventions import kv_compress


@pytest.mark.parametrize("stream", [{0: [1], 2: [0]}, {0: [0, 1], 1: [1], 2: [0, 1]}])
def test_compressed_cache_matches_mask_only(stream):
    m = hs.load("tiny-llama")
    sink, recent = 2, 4
    toks = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    edits = kv_compress.streaming_edits(m, stream, sink, recent)
    with m.edit(edits):
        ref = m.generate(toks, max_new_tokens=10)                               # full cache, masked
        cache = kv_compress.HeadClassCache(stream, m.cfg.n_layers, sink, recent)
        out = m.generate(toks, max_new_tokens=10, cache=cache)
    assert torch.equal(out, ref)
    with torch.no_grad(), m.edit(edits):                                       # the gate does something here
        streamed = m(out)
    assert (streamed - m(out)).abs().max() > 1e-3
    T = cache.get_seq_length()
    assert T == 12 + 10 - 1                                                     # the last token is not fed
    d, G = m.cfg.d_head, m.cfg.n_kv_heads
    per_token = 2 * d * 4                                                       # k + v, fp32
    expect = sum(((G - len(stream.get(l, []))) * T + len(stream.get(l, [])) * (sink + recent)) * per_token
                 for l in range(m.cfg.n_layers))
    assert cache.nbytes() == expect
    assert cache.nbytes() < m.cfg.n_layers * G * T * per_token


def test_cache_without_streaming_heads_is_the_plain_cache():
    """No streaming head on any layer (the 0% row of the KV tables): the same tokens and bytes as
    transformers' own DynamicCache, each layer storing its keys and values as they come."""
    from transformers import DynamicCache
    m = hs.load("tiny-llama")
    toks = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ref_cache = DynamicCache()
    ref = m.generate(toks, max_new_tokens=8, cache=ref_cache)
    cache = kv_compress.HeadClassCache({}, m.cfg.n_layers, sink=2, recent=4)
    out = m.generate(toks, max_new_tokens=8, cache=cache)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 9 + 8 - 1
    assert cache.nbytes() == sum(x.numel() * x.element_size() for l in ref_cache.layers for x in (l.keys, l.values))


@pytest.mark.parametrize("stream", [{}, {2: [0]}, {1: [0], 2: [0]}])
def test_sliding_window_layers_keep_only_their_window(stream):
    # tiny-gemma3: layers 0 and 2 slide over 6 tokens, layer 1 is global; 1 KV head per layer
    m = hs.load("tiny-gemma3")
    assert m.cfg.windows == (6, None, 6)
    sink, recent = 2, 4
    toks = torch.randint(0, 128, (1, 15), generator=torch.Generator().manual_seed(1))
    edits = kv_compress.streaming_edits(m, stream, sink, recent)
    with m.edit(edits):
        ref = m.generate(toks, max_new_tokens=8)                                # full cache, masked
    new, nbytes, _ = kv_compress.generate_compressed(m, toks[0], stream, sink, recent, 8)   # applies the gate
    assert torch.equal(new, ref[0, 15:])
    T = 15 + 8 - 1
    per_token = 2 * m.cfg.d_head * 4                                            # k + v, fp32
    kept = [min(T, w) if w else T for w in m.cfg.windows]                       # full heads: window or all
    expect = sum(((sink + recent) if stream.get(l) else kept[l]) * per_token for l in range(m.cfg.n_layers))
    assert nbytes == expect
    with pytest.raises(ValueError, match="compensation token is not supported on a sliding-window layer"):
        kv_compress.HeadClassCache({0: [0]}, 3, sink, recent, compensate=True, windows=m.cfg.windows)
    with pytest.raises(ValueError, match="windows has 2 entries for 3 layers"):
        kv_compress.HeadClassCache({}, 3, windows=(6, None))


def test_stream_from_scores_picks_lowest():
    from headscope.heads.scores import HeadScores
    sc = HeadScores(scores=torch.tensor([[0.9, 0.1], [0.5, 0.2], [0.8, 0.7]]), method="duo",
                    model={"n_kv_heads": 2})
    assert kv_compress.stream_from_scores(sc, 0.5) == {0: [1], 1: [1, 0]}


def test_compensation_token_bytes_and_formula():
    """RazorAttention §3.3 on a hand-built layer (2 KV heads, head 1 streaming, sink 2, recent 3):
    after a 10-token prefill the dropped positions 2..6 of head 1 read as (mean k, mean v); the
    softmax over that view equals the count-weighted formula; the layer holds full head 0 plus
    sink + recent + one compensation token for head 1."""
    g = torch.Generator().manual_seed(0)
    d = 4
    k, v = torch.randn(1, 2, 10, d, generator=g), torch.randn(1, 2, 10, d, generator=g)
    layer = kv_compress.HeadClassLayer([1], sink=2, recent=3, compensate=True)
    keys, values = layer.update(k, v)
    torch.testing.assert_close(keys, k)                              # prefill attends to the full cache
    k1, v1 = torch.randn(1, 2, 1, d, generator=g), torch.randn(1, 2, 1, d, generator=g)
    keys, values = layer.update(k1, v1)                              # first decode step, position 10
    kc, vc = k[0, 1, 2:7].mean(0), v[0, 1, 2:7].mean(0)
    torch.testing.assert_close(keys[0, 1, 2:7], kc.expand(5, d))
    torch.testing.assert_close(values[0, 1, 2:7], vc.expand(5, d))
    torch.testing.assert_close(keys[0, 0], torch.cat([k[0, 0], k1[0, 0]]))   # the full head is untouched
    q = torch.randn(d, generator=g)
    view = torch.softmax(keys[0, 1] @ q, 0) @ values[0, 1]           # what the attention function computes
    kept = torch.cat([k[0, 1, [0, 1, 7, 8, 9]], k1[0, 1]])
    kept_v = torch.cat([v[0, 1, [0, 1, 7, 8, 9]], v1[0, 1]])
    w = torch.exp(kept @ q)
    wc = 5 * torch.exp(kc @ q)
    formula = ((w[:, None] * kept_v).sum(0) + wc * vc) / (w.sum() + wc)
    torch.testing.assert_close(view, formula)
    assert layer.n_dropped == 6 and layer.n == 11                    # position 7 left the window too
    per_token = 2 * d * 4                                            # k + v, fp32
    assert layer.nbytes() == (11 + 2 + 3 + 1) * per_token
    torch.testing.assert_close(layer.kc[0, 0, 0] / 6, k[0, 1, 2:8].mean(0))


def test_compensation_is_exact_when_nothing_is_dropped():
    """With sink + recent covering every position, the compensated cache gives the full model's tokens;
    with a small window it runs and holds fewer bytes."""
    m = hs.load("tiny-llama")
    toks = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(1))
    stream = {0: [1], 2: [0]}
    full = m.generate(toks[None], max_new_tokens=6)[0, 12:]
    new, nb, _ = kv_compress.generate_compressed(m, toks, stream, sink=4, recent=32, max_new_tokens=6, compensate=True)
    assert torch.equal(new, full)
    new2, nb2, _ = kv_compress.generate_compressed(m, toks, stream, sink=2, recent=3, max_new_tokens=6, compensate=True)
    assert new2.shape == (6,) and nb2 < nb


def test_beam_search_and_cropping_are_refused():
    """The inherited DynamicLayer helpers would touch the full heads only: they raise instead."""
    m = hs.load("tiny-llama")
    toks = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = kv_compress.HeadClassCache({0: [1]}, m.cfg.n_layers, 2, 4)
    layer = cache.layers[0]
    for call in (lambda: layer.crop(4), lambda: layer.reorder_cache(torch.tensor([0])),
                 lambda: layer.batch_repeat_interleave(2), lambda: layer.batch_select_indices(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="num_beams=1"):
            call()
    with pytest.raises(NotImplementedError, match="num_beams=1"):
        m.generate(toks, max_new_tokens=3, num_beams=2, do_sample=False,
                   cache=kv_compress.HeadClassCache({0: [1]}, m.cfg.n_layers, 2, 4))


def test_razor_recent_is_max_4000_or_a_fifth():
    """RazorAttention §3.3: the last max(4000, N/5) tokens stay."""
    assert [kv_compress.razor_recent(n) for n in (0, 100, 20000, 20004, 50000)] == [4000, 4000, 4000, 4000, 10000]
    with pytest.raises(ValueError, match="n_tokens"):
        kv_compress.razor_recent(-1)
