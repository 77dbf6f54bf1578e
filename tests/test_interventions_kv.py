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


def test_stream_from_scores_picks_lowest():
    from headscope.heads.scores import HeadScores
    sc = HeadScores(scores=torch.tensor([[0.9, 0.1], [0.5, 0.2], [0.8, 0.7]]), method="duo",
                    model={"n_kv_heads": 2})
    assert kv_compress.stream_from_scores(sc, 0.5) == {0: [1], 1: [1, 0]}
