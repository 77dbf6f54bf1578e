"""Bad edit specs, indices, spans, statistics requests and hook filters are refused at the
boundary with an error that names the problem (type + message fragment)."""
import numpy as np
import pytest
import torch

import headscope as hs


@pytest.fixture(scope="module")
def m():
    return hs.load("tiny-llama")          # 3 layers, 4 heads, d_head 16


X = torch.arange(3, 11)[None]             # 8 tokens


@pytest.mark.parametrize("make, err, frag", [
    (lambda: hs.Ablate(0, 1, how="zeros"), ValueError, "use 'zero', 'mean' or 'uniform'"),
    (lambda: hs.Ablate(0, 1, how="mean"), ValueError, "needs mean="),
    (lambda: hs.Ablate(0, 1, how="zero", mean=torch.zeros(16)), ValueError, "only with how='mean'"),
    (lambda: hs.Ablate(0, 1, how="uniform", eps=-1e-3), ValueError, "eps must be >= 0"),
    (lambda: hs.Ablate(0, 1, how="uniform", eps=float("nan")), ValueError, "must be finite"),
    (lambda: hs.Ablate(1.0, 1), TypeError, "layer must be an integer"),
    (lambda: hs.Ablate(1.7, 1), TypeError, "layer must be an integer"),
    (lambda: hs.Ablate(0, True), TypeError, "bool"),
    (lambda: hs.Ablate(0, [1, 2.0]), TypeError, "head must be an integer"),
    (lambda: hs.Ablate(0, torch.tensor(1.0)), TypeError, "head must be an integer"),
    (lambda: hs.Ablate(0, "1"), TypeError, "integer or a sequence"),
    (lambda: hs.Ablate(0, []), ValueError, "empty"),
    (lambda: hs.Ablate(0, [1, 1]), ValueError, "more than once"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0, 1),), factor=1.5), ValueError, "factor must be in [0, 1]"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0, 1),), factor=-0.1), ValueError, "factor must be in [0, 1]"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0, 1),), factor=float("inf")), ValueError, "finite"),
    (lambda: hs.ScaleKeys(0, 1, keys=((4, 2),), factor=0.5), ValueError, "reversed"),
    (lambda: hs.ScaleKeys(0, 1, keys=((2, 2),), factor=0.5), ValueError, "empty"),
    (lambda: hs.ScaleKeys(0, 1, keys=((-1, 2),), factor=0.5), ValueError, "before position 0"),
    (lambda: hs.ScaleKeys(0, 1, keys=(), factor=0.5), ValueError, "no spans"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0.5, 2),), factor=0.5), TypeError, "start must be an integer"),
    (lambda: hs.ScaleKeys(0, 1, keys=(3,), factor=0.5), TypeError, "not a (start, end) pair"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0, 1),), target=((5, 1),), factor=0.5), ValueError, "target: span (5, 1)"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0, 1),), factor=0.5, max_ratio=2.0), ValueError, "max_ratio must be in"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0, 1),), factor=0.5, min_query=-3), ValueError, "min_query must be a token position"),
    (lambda: hs.ScaleKeys(0, 1, keys=((0, 1),), factor=0.5, min_query=2.5), TypeError, "min_query must be an integer"),
    (lambda: hs.StreamingGate(0, [0, 1], alpha=torch.ones(3)), ValueError, "one per head"),
    (lambda: hs.StreamingGate(0, 0, alpha=torch.ones(1), sink=-1), ValueError, "sink must be >= 0"),
    (lambda: hs.Stats(sink_k=-1), ValueError, "sink_k must be >= 0"),
    (lambda: hs.Stats(sink_k=2.0), TypeError, "sink_k must be an integer"),
    (lambda: hs.Stats(spans=((5, 3),)), ValueError, "reversed"),
    (lambda: hs.Stats(spans=(5,)), TypeError, "(start, end) pairs"),
    (lambda: hs.Stats(received=True, received_window=(9, 2)), ValueError, "a <= b"),
    (lambda: hs.Stats(received_window=(0, 2)), ValueError, "received=True"),
    (lambda: hs.Stats(recent=-3), ValueError, "recent must be >= 0"),
    (lambda: hs.Stats(entropy="yes"), TypeError, "flag"),
])
def test_malformed_specs_are_refused_at_construction(make, err, frag):
    with pytest.raises(err) as e:
        make()
    assert frag in str(e.value)


def test_integer_like_indices_are_accepted(m):
    a = hs.Ablate(np.int64(1), torch.tensor(2))
    assert (a.layer, a.head) == (1, 2) and type(a.layer) is int and type(a.head) is int
    b = hs.Ablate(0, np.array([0, 3]))
    assert b.head == (0, 3)
    s = hs.ScaleKeys(0, torch.tensor([1, 2]), keys=(0, 1), factor=0.5)   # one (start, end) pair
    assert s.keys == ((0, 1),) and s.head == (1, 2)
    with torch.no_grad():
        with m.edit(hs.Ablate(np.int32(1), torch.tensor(2))):
            a1 = m(X)
        with m.edit(hs.Ablate(1, 2)):
            a2 = m(X)
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)
    with m.record(hs.Stats(entropy=True), layers=np.int64(2), heads=[np.int64(0)]) as rec, torch.no_grad():
        m(X)
    assert rec["entropy", 2].shape == (1, 1, 8)


def test_out_of_range_names_the_models_size(m):
    with pytest.raises(IndexError, match="layer 3 out of range: the model has 3 layers"):
        with m.edit(hs.Ablate(3, 0)):
            pass
    with pytest.raises(IndexError, match="head -1 out of range: layer 0 has 4 heads"):
        with m.edit(hs.ScaleKeys(0, -1, keys=((0, 1),), factor=0.5)):
            pass
    with pytest.raises(IndexError, match="head 4 out of range.*4 heads per layer"):
        with m.record(hs.Stats(entropy=True), heads=[4]):
            pass
    with pytest.raises(TypeError, match="record layers must be an integer"):
        with m.record(hs.Stats(entropy=True), layers=[1.0]):
            pass
    with pytest.raises(TypeError, match="not a headscope edit"):
        with m.edit(["Ablate(0, 1)"]):
            pass
    assert not m.state.active()


def test_output_edit_value_shapes_are_checked(m):
    with pytest.raises(ValueError, match="last axis must be d_head = 16"):
        with m.edit(hs.AddToHead(0, 1, torch.zeros(8))):
            pass
    with pytest.raises(ValueError, match=r"\[n, d\].*n = 2"):
        with m.edit(hs.HeadAffine(0, [1, 2], scale=torch.zeros(3, 16))):
            pass
    with pytest.raises(ValueError, match="one head: shape"):
        with m.edit(hs.Ablate(0, 1, how="mean", mean=torch.zeros(1, 1, 1, 16))):
            pass
    with pytest.raises(ValueError, match=r"covers \(batch, pos\) = \(1, 5\).*\(1, 8\)"):
        with m.edit(hs.AddToHead(0, 1, torch.zeros(1, 5, 16))), torch.no_grad():
            m(X)
    assert not m.state.active()


def test_span_beyond_the_sequence_is_an_error_at_forward_time(m):
    with pytest.raises(ValueError, match=r"span \(6, 12\) reaches beyond the sequence \(8 positions"):
        with m.edit(hs.ScaleKeys(1, 0, keys=((0, 1),), target=((6, 12),), factor=0.5)), torch.no_grad():
            m(X)
    with torch.no_grad(), m.edit(hs.ScaleKeys(1, 0, keys=((0, 1),), target=((6, 8),), factor=0.5)):
        m(X)                                   # the last position is inside


def test_hook_names_and_filters_are_validated(m):
    with pytest.raises(ValueError, match="unknown hook"):
        m.run_with_hooks(X, fwd_hooks=[("blocks.0.attn.hook_nope", lambda t, hook: t)])
    with pytest.raises(TypeError, match="not callable"):
        m.run_with_hooks(X, fwd_hooks=[("blocks.0.attn.hook_z", None)])
    with pytest.raises(TypeError, match=r"\(name or name-filter, fn\) pairs"):
        m.run_with_hooks(X, fwd_hooks=["blocks.0.attn.hook_z"])
    with pytest.raises(ValueError, match="matched no hook name"):
        m.run_with_hooks(X, fwd_hooks=[(lambda n: n.endswith("hook_nothing"), lambda t, hook: t)])
    with pytest.raises(TypeError, match="lists hook names"):
        m.run_with_cache(X, names_filter=["blocks.0.attn.hook_z", 3])
    with pytest.raises(ValueError, match="unknown hook name"):
        m.run_with_cache(X, names_filter=["blocks.0.attn.z"])
    with pytest.raises(ValueError, match="matched no hook name"):
        m.run_with_cache(X, names_filter=lambda n: False)
    with pytest.raises(TypeError, match="names_filter is None"):
        m.run_with_cache(X, names_filter=3)
    with pytest.raises(IndexError, match="layer 9 out of range"):
        m.run_with_cache(X, names_filter=["blocks.9.attn.hook_z"])
    assert not m.state.active()
