"""DuoAttention streaming/retrieval heads: the O(N) proxy against full patterns, planted far /
sink / previous-token heads, gate training that keeps exactly the planted far-looking KV head,
the passkey data, and SmolLM2."""
import pytest
import torch

import headscope as hs
from headscope.heads import ANALYZERS
from headscope.heads.streaming import (NATO, DuoGates, StreamingProxy, expand_kv, kv_group_max, lr_factor,
                                       outside_mass, passkey_samples, split)


def _brute_outside(m, toks, sink, recent, layers=None):
    """Reference: mass on keys s >= sink with t - s >= recent from full patterns, mean over t >= sink+recent."""
    layers = list(range(m.cfg.n_layers)) if layers is None else layers
    _, cache = m.run_with_cache(toks, names_filter=[f"blocks.{l}.attn.hook_pattern" for l in layers])
    N = toks.shape[1]
    t, s = torch.arange(N)[:, None], torch.arange(N)[None]
    outside = (s >= sink) & (t - s >= recent)
    return torch.stack([(cache["pattern", l] * outside).sum(-1)[..., sink + recent:].mean(-1) for l in layers])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-mistral"])
def test_proxy_is_exact(name):
    m = hs.load(name)
    toks = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    out, sink_m = outside_mass(m, toks, sink=3, recent=5)
    ref = _brute_outside(m, toks, 3, 5)
    assert out.shape == ref.shape == (m.cfg.n_layers, 2, m.cfg.n_heads)
    assert torch.allclose(out, ref, atol=1e-5)
    assert (out > 0.01).any()                       # the check is not vacuous
    assert ((sink_m >= 0) & (sink_m + out <= 1 + 1e-5)).all()


FAR, SINK_HEAD, PREV = (1, 0), (2, 3), (0, 2)


def _plant_attention(far=(FAR,), sink_heads=(SINK_HEAD,), prev=(PREV,), sink=4, others=None):
    """Score hooks: heads in ``far`` look at key position ``sink`` (outside the window once t >= sink +
    recent), ``sink_heads`` at BOS, ``prev`` at the previous token; ``others`` (a (layer, head) ->
    target rule) for everything else."""
    plan = {**{h: "far" for h in far}, **{h: "bos" for h in sink_heads}, **{h: "prev" for h in prev}}

    def make(layer):
        def fn(s, hook):
            B, H, Q, K = s.shape
            t = torch.arange(K - Q, K)
            s = s.clone()
            for h in range(H):
                kind = plan.get((layer, h), others)
                if kind is None:
                    continue
                tgt = {"far": torch.where(t >= sink, torch.full_like(t, sink), t), "bos": torch.zeros_like(t),
                       "prev": (t - 1).clamp_min(0)}[kind]
                s[:, h] = -1e4
                s[:, h, torch.arange(Q), tgt] = 1e4
            return s
        return fn
    return [(f"blocks.{l}.attn.hook_attn_scores", make(l)) for l in range(3)]


def test_planted_proxy_heads():
    m = hs.load("tiny-llama")                                          # 3 layers x 4 heads, 2 KV heads
    toks = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    with m.hooks(_plant_attention()):
        res = StreamingProxy(sink=4, recent=8, sparsity=0.5).score(m, data=toks, progress=False)
    assert res.scores[FAR] == pytest.approx(1.0, abs=1e-4)
    assert res.scores[SINK_HEAD] == pytest.approx(0.0, abs=1e-4)
    assert res.scores[PREV] == pytest.approx(0.0, abs=1e-4)
    assert res.top(1)[0][:2] == FAR
    assert res.extra["sink_mass"][SINK_HEAD] == pytest.approx(1.0, abs=1e-4)
    assert res.extra["recent_mass"][PREV] == pytest.approx(1.0, abs=1e-4)
    # GQA: the KV head of the far head (layer 1, KV 0) takes its max, and is never streaming
    assert res.extra["kv_scores"][1, 0] == pytest.approx(1.0, abs=1e-4)
    assert res.extra["streaming"][FAR] == 0 and res.extra["streaming"][1, 1] == 0   # same KV group
    assert int(res.extra["streaming"].sum()) == 6                     # half of the 6 KV heads x 2 query heads


def test_split_and_kv_helpers():
    kv = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    thr, st = split(kv, 0.5)
    assert thr == pytest.approx(0.4, abs=1e-5)
    assert st.tolist() == [[True, False], [False, True]]
    zeros = torch.zeros(4, 3)                                          # ties are broken: half stream
    assert int(split(zeros, 0.5)[1].sum()) == 6
    assert split(kv, 0.0)[1].sum() == 0 and split(kv, 1.0)[1].all()
    assert torch.equal(expand_kv(kv, 4), torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.5, 0.5, 0.3, 0.3]]))
    assert kv_group_max(torch.tensor([[1.0, 2.0, 0.0, 3.0]]), 2).tolist() == [[2.0, 3.0]]
    with pytest.raises(ValueError):
        split(kv, 1.5)


def test_lr_schedule_matches_reference():
    f = [lr_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(0.5) and f[19] == 1.0
    assert f[50] == 1.0 and f[85] == pytest.approx(0.75) and f[99] == pytest.approx(0.1)


def test_planted_gate_training_keeps_only_the_far_kv_head():
    """Every head looks at the previous token (streaming == full) except the KV group of layer 1 /
    KV head 0 (query heads 0 and 1), which looks far back: only that gate must stay open."""
    m = hs.load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        ids = torch.randint(3, 128, (32,), generator=g)
        lab = torch.zeros(32, dtype=torch.bool)
        lab[-8:] = True
        data.append({"input_ids": ids, "label_mask": lab})
    hooks = _plant_attention(far=((1, 0), (1, 1)), sink_heads=(), prev=(), sink=2, others="prev")
    an = DuoGates(steps=30, lr=0.1, sink=2, recent=4, sparsity=5 / 6)
    with m.hooks(hooks):
        res = an.score(m, data=data, progress=False)
    a = res.extra["alpha_kv"]
    assert a.shape == (3, 2)
    assert a[1, 0] > 0.8, a
    others = torch.cat([a[0], a[1, 1:], a[2]])
    assert (others < 0.3).all(), a
    assert res.extra["streaming"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(res.scores, expand_kv(a, 4))                     # per-KV gates on the query heads
    assert res.extra["loss"].shape == (30,)
    assert all(0.0 <= float(x) <= 1.0 for x in a.flatten())
    assert all(p.requires_grad for p in m.parameters())                 # the model is given back as it was


def test_passkey_samples():
    class Tok:                                                          # a word-level stand-in tokenizer
        vocab: dict = {}

        def encode(self, s, add_special_tokens=False):
            return [self.vocab.setdefault(w, len(self.vocab)) for w in s.replace("\n", " \n ").split(" ") if w]

        def __call__(self, s, add_special_tokens=True):
            return {"input_ids": [9999] + self.encode(s)}

    class M:
        tokenizer = Tok()

    smp = passkey_samples(M(), n_samples=3, length_min=300, length_max=400, num_passkeys=3, passkey_length=5)
    assert [len(s["input_ids"]) for s in smp] == [300, 350, 400]
    inv = {v: k for k, v in Tok.vocab.items()}
    for s in smp:
        assert s["input_ids"][0] == 9999                               # BOS first
        words = [inv.get(int(i), "") for i in s["input_ids"][s["label_mask"]]]
        keys = s["passkeys"]
        assert len(keys) == 3 and all(len(k.split()) == 5 and set(k.split()) <= set(NATO) for k in keys)
        assert " ".join(w for w in words if w in NATO) == " ".join(keys)   # labels: questions + passkeys
        n_lab = int(s["label_mask"].sum())
        assert s["label_mask"][-n_lab:].all() and not s["label_mask"][:-n_lab].any()   # one block at the end
        text = " ".join(inv.get(int(i), "") for i in s["input_ids"][~s["label_mask"]])
        for k in keys:
            assert k in text                                           # each passkey is in the haystack
    with pytest.raises(ValueError, match="too short"):
        passkey_samples(M(), 1, 50, 50, num_passkeys=3, passkey_length=5)


def test_registered_and_bad_input():
    assert ANALYZERS["streaming"] is StreamingProxy and ANALYZERS["duo"] is DuoGates
    m = hs.load("tiny-llama")
    with pytest.raises(ValueError, match="outside"):
        StreamingProxy(sink=4, recent=8).score(m, data=torch.zeros(1, 12, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        StreamingProxy().score(m, progress=False)
    with pytest.raises(ValueError, match="never leave"):
        DuoGates(sink=4, recent=8).score(m, data=[{"input_ids": torch.zeros(10, dtype=torch.long),
                                                   "label_mask": torch.ones(10, dtype=torch.bool)}], progress=False)
    assert DuoGates.paper_config().steps == 2000 and DuoGates.paper_config().sink == 128


@pytest.mark.slow
def test_smollm2_proxy_exact_and_gate_steps(smollm2):
    toks = smollm2.to_tokens("It is a truth universally acknowledged, that a single man in possession of a "
                             "good fortune, must be in want of a wife. " * 6)[:, :128]
    out, _ = outside_mass(smollm2, toks, sink=8, recent=32)
    ref = _brute_outside(smollm2, toks, 8, 32, layers=[0, 15, 29])
    assert torch.allclose(out[[0, 15, 29]], ref, atol=1e-4)
    an = DuoGates.quick(steps=1, n_samples=1, length_min=150, length_max=150, num_passkeys=1, passkey_length=4)
    res = an.score(smollm2, progress=False)
    a = res.extra["alpha_kv"]
    assert a.shape == (30, 3) and (a < 1).all() and (a > 0.97).all()  # one step of lr 0.02 down from 1
    assert torch.isfinite(res.extra["loss"]).all()
