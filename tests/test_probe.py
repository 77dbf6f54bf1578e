"""The probe: outputs equal HF eager attention, statistics equal the eager pattern's, hooks fire with
TransformerLens names and shapes, edits do what they say, bad input gets clear errors."""
import math

import pytest
import torch

import headscope as hs
from headscope.probe.tiny import TINY, tiny_model

N_TOK = 29  # odd, and longer than the tiny sliding windows (6, 8)


def eager_twin(name):
    ref = tiny_model(name)
    ref.set_attn_implementation("eager")
    return ref


def padded_batch(seed=0, n=N_TOK, pad=5):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 128, (2, n), generator=g)
    mask = torch.ones_like(toks)
    mask[1, :pad] = 0
    return toks, mask


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request):
    return request.param, hs.load(request.param), eager_twin(request.param)


def eager_run(ref, toks, mask):
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = ref(input_ids=toks, attention_mask=mask, position_ids=pos, output_attentions=True)
    return out.logits, out.attentions


@torch.no_grad()
def test_logits_match_eager_padded_batch(pair):
    name, m, ref = pair
    toks, mask = padded_batch()
    lr, _ = eager_run(ref, toks, mask)
    lh = m(toks, attention_mask=mask)
    keep = mask.bool()
    assert (lr - lh)[keep].abs().max() < 1e-4, name
    # unpadded, single sequence, odd length: the SDPA fast path (or chunked for windows)
    assert (ref(input_ids=toks[:1, :17]).logits - m(toks[:1, :17])).abs().max() < 1e-4


@torch.no_grad()
def test_recording_does_not_change_logits_and_stats_match_eager(pair):
    name, m, ref = pair
    toks, mask = padded_batch(seed=1)
    lr, attns = eager_run(ref, toks, mask)
    st = hs.Stats(sink_k=3, spans=((4, 9), (0, 1)), entropy=True, distance=True, window_distance=5,
                  recent=4, argmax=True, received=True, received_window=(2, 10))
    with m.record(st) as rec:
        lh = m(toks, attention_mask=mask)
    keep = mask.bool()
    assert (lr - lh)[keep].abs().max() < 1e-4
    pad = (mask == 0).sum(-1)                                     # left pads per row
    N = toks.shape[1]
    for l, A in enumerate(attns):                                 # A [B, H, N, N] from HF eager
        A = A.float()
        idx = torch.arange(N)
        pos = idx[None, :] - pad[:, None]                         # token position of each cache index
        t_minus_s = (idx[:, None] - idx[None, :]).clamp_min(0).float()
        for b in range(2):
            rows = slice(int(pad[b]), N)                          # real queries only
            Ab = A[b][:, rows]                                    # [H, Q', N]
            exp = {
                "sink_mass": (Ab * (pos[b] < 3)).sum(-1),
                "entropy": -(Ab * Ab.clamp_min(1e-30).log()).sum(-1),
                "distance": (Ab * t_minus_s[rows]).sum(-1),
                "window_distance": (Ab * t_minus_s[rows].clamp_max(5)).sum(-1),
                "recent_mass": (Ab * (t_minus_s[rows] < 4) * (idx[rows, None] >= idx[None, :])).sum(-1),
                "max_prob": Ab.max(-1).values,
            }
            for k, v in exp.items():
                got = rec[k, l][b][:, rows]
                assert torch.allclose(got, v, atol=2e-5), (name, l, k, (got - v).abs().max())
            span = rec["span_mass", l][b][:, rows]
            assert torch.allclose(span[..., 0], (Ab * ((pos[b] >= 4) & (pos[b] < 9))).sum(-1), atol=2e-5)
            assert torch.allclose(span[..., 1], (Ab * (pos[b] == 0)).sum(-1), atol=2e-5)
            # argmax: the most attended key's position (ties are measure-zero with random weights)
            assert torch.equal(rec["argmax", l][b][:, rows], Ab.argmax(-1) - pad[b])
            # column sums over queries with 2 <= t - s <= 10
            win = ((t_minus_s >= 2) & (t_minus_s <= 10) & (idx[:, None] >= idx[None, :])).float()
            if m.cfg.windows[l] is not None:                      # sliding layers: only the window sees s
                win = win * (t_minus_s < m.cfg.windows[l]).float()
            win = win * (idx[None, :] >= pad[b]).float()          # padded keys are seen by nobody
            win[: int(pad[b])] = 0                                # padded queries see nothing
            assert torch.allclose(rec["received_sum", l][b], (A[b] * win).sum(-2), atol=2e-5)
            assert torch.allclose(rec["received_count", l][b], win.sum(-2))


@torch.no_grad()
def test_hooks_fire_with_transformerlens_names_and_shapes(pair):
    name, m, _ = pair
    toks = torch.randint(0, 128, (2, 11))
    c = m.cfg
    logits, cache = m.run_with_cache(toks)
    for l in range(c.n_layers):
        assert cache["pattern", l].shape == (2, c.n_heads, 11, 11)
        assert cache["attn_scores", l].shape == (2, c.n_heads, 11, 11)
        assert cache["q", l].shape == (2, 11, c.n_heads, c.d_head)
        assert cache["k", l].shape == (2, 11, c.n_kv_heads, c.d_head)
        assert cache["v", l].shape == (2, 11, c.n_kv_heads, c.d_head)
        assert cache["z", l].shape == (2, 11, c.n_heads, c.d_head)
        assert cache["result", l].shape == (2, 11, c.n_heads, c.d_model)
        for k in ("resid_pre", "resid_mid", "resid_post"):
            assert cache[k, l].shape == (2, 11, c.d_model), (name, k)
        p = cache["pattern", l]
        assert torch.allclose(p.sum(-1), torch.ones(2, c.n_heads, 11), atol=1e-5)
        assert (p.triu(1) == 0).all()                             # causal
    # residual stream bookkeeping: post of layer l is pre of layer l+1
    assert torch.allclose(cache["resid_post", 0], cache["resid_pre", 1])
    assert cache.stack("pattern").shape == (c.n_layers, 2, c.n_heads, 11, 11)
    assert torch.allclose(logits, m(toks), atol=1e-5)


@torch.no_grad()
def test_sum_of_results_is_attention_output(tiny_llama):
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 9))
    _, cache = m.run_with_cache(toks, names_filter=["blocks.1.attn.hook_result", "blocks.1.hook_resid_pre",
                                                    "blocks.1.hook_resid_mid"])
    # Llama: resid_mid = resid_pre + o_proj(z) (no bias) = resid_pre + sum_h result_h
    assert torch.allclose(cache["resid_pre", 1] + cache["result", 1].sum(2), cache["resid_mid", 1], atol=1e-5)


@torch.no_grad()
def test_hook_can_modify_z_and_pattern(tiny_llama):
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 10))
    base = m(toks)
    zeroed = m.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z * 0)])
    with m.edit([hs.Ablate(0, [0, 1, 2, 3], how="zero")]):
        ablated = m(toks)
    assert (zeroed - base).abs().max() > 1e-3
    assert torch.allclose(zeroed, ablated, atol=1e-5)
    # replacing the pattern by itself is a no-op; by uniform equals the uniform-attention edit
    same = m.run_with_hooks(toks, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: p)])
    assert torch.allclose(same, base, atol=1e-5)
    def uniform(p, hook):
        vis = (p > 0).float()
        return vis / vis.sum(-1, keepdim=True)
    u1 = m.run_with_hooks(toks, fwd_hooks=[("blocks.1.attn.hook_pattern", uniform)])
    with m.edit(hs.Ablate(1, range(4), how="uniform", eps=0.0)):
        u2 = m(toks)
    assert torch.allclose(u1, u2, atol=1e-5) and (u1 - base).abs().max() > 1e-3


@torch.no_grad()
def test_noop_edits_leave_logits_unchanged(pair):
    name, m, _ = pair
    toks, mask = padded_batch(seed=2)
    base = m(toks, attention_mask=mask)
    d = m.cfg.d_head
    noop = [hs.ScaleKeys(0, 0, keys=((0, 2),), factor=1.0), hs.HeadAffine(1, [0, 1], scale=torch.zeros(d)),
            hs.Ablate(0, 1, how="uniform", eps=1.0),
            hs.StreamingGate(1, 0, alpha=torch.ones(1), sink=2, recent=4)]
    with m.edit(noop):
        out = m(toks, attention_mask=mask)
    keep = mask.bool()
    assert (out - base)[keep].abs().max() < 1e-5


@torch.no_grad()
def test_scale_keys_redistributes_in_proportion(tiny_llama):
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 12))
    _, c0 = m.run_with_cache(toks, names_filter="blocks.0.attn.hook_pattern")
    with m.edit(hs.ScaleKeys(0, 2, keys=((0, 1), (5, 6)), factor=0.4)):
        _, c1 = m.run_with_cache(toks, names_filter="blocks.0.attn.hook_pattern")
    p0, p1 = c0["pattern", 0][0], c1["pattern", 0][0]
    src = torch.zeros(12, dtype=torch.bool); src[0] = src[5] = True
    assert torch.equal(p1[2, 0], p0[2, 0])                       # row 0 sees only a sink: left alone
    assert torch.allclose(p1[2][1:, src], 0.4 * p0[2][1:, src], atol=1e-6)
    assert torch.allclose(p1.sum(-1), torch.ones(4, 12), atol=1e-5)
    # the other keys keep their ratios (rows 6.. see both sinks and several other keys)
    r0 = p0[2, 8, ~src][:9]; r1 = p1[2, 8, ~src][:9]
    assert torch.allclose(r1 / r1.sum(), r0 / r0.sum(), atol=1e-5)
    assert torch.equal(p1[[0, 1, 3]], p0[[0, 1, 3]])          # other heads untouched
    # ACT check by hand: freed mass goes to non-sink keys
    t = 8
    freed = 0.6 * p0[2, t, src].sum()
    rest = p0[2, t, ~src & (torch.arange(12) <= t)]
    assert torch.allclose(p1[2, t, ~src & (torch.arange(12) <= t)], rest * (1 + freed / rest.sum()), atol=1e-6)


def test_lofit_affine_is_differentiable(tiny_llama):
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 8))
    a = torch.zeros(m.cfg.d_head, requires_grad=True)
    v = torch.zeros(m.cfg.d_head, requires_grad=True)
    with m.edit(hs.HeadAffine(1, 2, scale=a, bias=v)):
        loss = m(toks)[0, -1].logsumexp(-1)
    loss.backward()
    assert a.grad is not None and v.grad.abs().sum() > 0
    gate = torch.ones(1, requires_grad=True)
    with m.edit(hs.StreamingGate(2, 0, alpha=gate, sink=1, recent=2)):
        m(toks)[0, -1].logsumexp(-1).backward()
    assert gate.grad is not None and gate.grad.abs() > 0


@torch.no_grad()
def test_generate_with_cache_records_and_edits(tiny_llama):
    m = tiny_llama
    toks = torch.randint(0, 128, (1, 7))
    plain = m.generate(toks, max_new_tokens=5)
    full = m.model.generate(input_ids=toks, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(plain, full)                            # KV-cache path == no-cache path
    with m.record(hs.Stats(argmax=True, sink_k=1), layers=[0, 2]) as rec:
        out = m.generate(toks, max_new_tokens=5)
    assert torch.equal(out, plain)
    # prompt rows (7) + one row per decode step that produced a token (4; the 5th token needs no pass)
    assert rec["argmax", 0].shape[-1] == 7 + 4
    # statistics under the cache equal those of a full forward over the same tokens
    with m.record(hs.Stats(argmax=True, sink_k=1), layers=[0, 2]) as rec2:
        m(out[:, :-1])
    assert torch.allclose(rec["sink_mass", 2], rec2["sink_mass", 2], atol=1e-5)
    assert torch.equal(rec["argmax", 0], rec2["argmax", 0])
    with m.edit(hs.Ablate(0, [0, 1, 2, 3], how="zero")):
        edited = m.generate(toks, max_new_tokens=5)
    with m.edit(hs.Ablate(0, [0, 1, 2, 3], how="zero")):
        ref = m.model.generate(input_ids=toks, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(edited, ref)


def test_generate_takes_a_prefilled_cache_under_either_transformers_name(tiny_llama):
    # transformers renamed past_key_values to cache; model.generate(cache=) must work with the installed one
    import inspect
    from headscope.probe.hf_compat import GENERATE_CACHE_KWARG
    m = tiny_llama
    assert GENERATE_CACHE_KWARG in inspect.signature(type(m.model).forward).parameters
    toks = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    plain = m.generate(toks, max_new_tokens=4)
    cache = hs.probe.output_cache(m.model(input_ids=toks[:, :-1], use_cache=True))
    assert cache is not None and cache.get_seq_length() == 8
    assert torch.equal(m.generate(toks, max_new_tokens=4, cache=cache), plain)


def test_bad_inputs_raise_clear_errors(tiny_llama):
    m = tiny_llama
    with pytest.raises(hs.ModelNotFound, match="unknown model"):
        hs.load("no-such-model")
    with pytest.raises(IndexError, match="head 9 out of range"):
        with m.edit(hs.Ablate(0, 9)):
            pass
    with pytest.raises(IndexError, match="layer 7 out of range"):
        with m.record(hs.Stats(entropy=True), layers=[7]):
            pass
    with pytest.raises(ValueError, match="empty prompt"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="allows at most"):
        m(torch.zeros(1, m.cfg.max_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie"):
        m(torch.full((1, 3), 500))
    with pytest.raises(ValueError, match="unknown hook name"):
        m.run_with_hooks(torch.zeros(1, 3, dtype=torch.long), fwd_hooks=[("blocks.0.pattern", print)])
    with pytest.raises(MemoryError, match="record"):
        m.run_with_cache(torch.zeros(1, 64, dtype=torch.long), names_filter=lambda n: "pattern" in n,
                         max_bytes=1000)
    with pytest.raises(ValueError, match="mean="):
        with m.edit(hs.Ablate(0, 1, how="mean")):
            pass
    with pytest.raises(ValueError, match="span"):
        with m.record(hs.Stats(spans=((5, 5),))):
            pass


def test_corrupt_cache_is_reconverted(tmp_path, monkeypatch):
    """A cache entry whose checksum fails is converted again, never loaded."""
    from headscope.probe import loading
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    calls = []

    class FakeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4))
            self.config = type("C", (), {"to_dict": lambda s: {"model_type": "llama"}})()

    class FakeTok:
        def save_pretrained(self, folder):
            pass

    def fake_auto(*a, **k):
        calls.append(1)
        return FakeModel()
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_auto)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTok())
    monkeypatch.setattr(loading, "gguf_special_token_ids", lambda gguf: {})     # the fake .gguf has no metadata
    monkeypatch.setattr(loading, "check_gguf_tokenizer", lambda tok, gguf: None)  # nor a vocabulary
    gguf = tmp_path / "src" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 10)
    emb = loading.Embedded("fake", "none", "pip install none", "none/none")
    monkeypatch.setattr(loading.Embedded, "gguf_path", lambda self: gguf)
    folder = loading._cached_folder(emb)
    assert (folder / "model.safetensors").exists() and len(calls) == 1
    assert loading._cached_folder(emb) == folder and len(calls) == 1       # cached, verified
    with open(folder / "model.safetensors", "r+b") as f:                  # corrupt one byte
        f.seek(-1, 2); f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    loading._cached_folder(emb)
    assert len(calls) == 2                                                # re-converted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fake-")]   # no temp folders left


def test_gguf_special_tokens_override_what_transformers_read(smollm2, caplog):
    """transformers 5.17 reads SmolLM2's GGUF tokenizer with EOS = BOS = <|im_start|> and no pad;
    the GGUF says <|im_end|> (2) for both. headscope takes the file's ids, on any version."""
    import copy
    import logging
    from headscope.probe import loading
    gguf = loading.EMBEDDED["smollm2"].gguf_path()
    assert loading.gguf_special_token_ids(gguf) == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    assert (smollm2.tokenizer.bos_token_id, smollm2.tokenizer.eos_token_id, smollm2.tokenizer.pad_token_id) == (1, 2, 2)
    tok = copy.deepcopy(smollm2.tokenizer)
    tok.eos_token = "<|im_start|>"                                  # what 5.17 gives
    assert tok.eos_token_id == 1
    with caplog.at_level(logging.WARNING, logger="headscope"):
        assert loading.match_gguf_special_tokens(tok, gguf) is tok
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1 and tok.pad_token_id == 2
    assert [r.getMessage() for r in caplog.records if "the GGUF says" in r.getMessage()] == [
        "headscope: transformers read the eos token of SmolLM2-135M-Instruct.Q4_1.gguf as '<|im_start|>'; "
        "the GGUF says '<|im_end|>' (id 2): using the GGUF's"]


def test_gguf_tokenizer_without_merges_is_refused(smollm2, gemma3):
    """transformers 5.9-5.17 read Gemma-3's GGUF tokenizer without merges (" capital" -> 4 pieces);
    headscope refuses such a tokenizer with the fix instead of analysing nonsense."""
    from pathlib import Path
    from headscope.probe import loading
    for m in (smollm2, gemma3):                                    # right tokenizers pass
        loading.check_gguf_tokenizer(m.tokenizer, Path("m.gguf"))

    class Broken:                                                  # what 5.17 builds for Gemma-3
        pieces = {"The": 1, "\u2581c": 2, "ap": 3, "it": 4, "al": 5, "\u2581capital": 9}

        def get_vocab(self):
            return dict(self.pieces)

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, 2, 3, 4, 5]}

        def convert_ids_to_tokens(self, ids):
            inv = {i: t for t, i in self.pieces.items()}
            return [inv[i] for i in ids]
    with pytest.raises(loading.ModelLoadError, match=r"reads the tokenizer of g\.gguf wrongly: 'The capital' becomes "
                       r"\['The', '\u2581c', 'ap', 'it', 'al'\].*Upgrade transformers"):
        loading.check_gguf_tokenizer(Broken(), Path("g.gguf"))


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_matches_eager_and_answers(smollm2):
    m = smollm2
    toks = m.to_tokens("What is the capital of France?", chat=True)
    from transformers import AutoModelForCausalLM
    import copy
    ref = copy.deepcopy(m.model)
    ref.set_attn_implementation("eager")
    for a in ref.modules():
        if hasattr(a, "_headscope"):
            del a._headscope
    with m.record(hs.Stats(sink_k=1, entropy=True, argmax=True, received=True)):
        lh = m(toks)
    lr = ref(input_ids=toks).logits
    assert (lh - lr).abs().max() < 1e-4
    out = m.generate(toks, max_new_tokens=8)
    assert "Paris" in m.to_string(out[0, toks.shape[1]:])


@pytest.mark.slow
@torch.no_grad()
def test_gemma3_sliding_window_matches_eager(gemma3):
    """Gemma-3-270M beyond its 512-token window: the sliding layers must use the window (without the
    registered mask function it is silently dropped and logits drift by ~18 at 700 tokens), and the
    window must show in the statistics: no sliding-layer query attends further back than 511."""
    import copy
    m = gemma3
    assert m.cfg.windows[5] is None and m.cfg.windows[0] == 512
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(1000, 20000, (1, 700), generator=g)
    toks[0, 0] = 2                                                   # <bos>
    ref = copy.deepcopy(m.model)
    ref.set_attn_implementation("eager")
    for a in ref.modules():
        if hasattr(a, "_headscope"):
            del a._headscope
    lr = ref(input_ids=toks, logits_to_keep=50).logits
    with m.record(hs.Stats(argmax=True, distance=True), layers=[0, 5]) as rec:
        lh = m(toks, logits_to_keep=50)
    assert (lh - lr).abs().max() < 1e-3 * max(1.0, lr.abs().max().item())
    t = torch.arange(700)
    assert (t - rec["argmax", 0][0]).max() < 512                      # sliding layer: within the window
    assert (t - rec["argmax", 5][0]).max() >= 512                     # full layer: the BOS sink, far back


def test_start_at_layer_is_exact_and_restores_layers():
    """``model(tokens, start_at_layer=l, resid_pre=r)`` with r = blocks.l.hook_resid_pre equals the
    full forward (also with an edit above l), and the layers' forward is restored, even on error."""
    m = hs.load("tiny-llama")
    x = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    full, cache = m.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for l in range(m.cfg.n_layers):
        torch.testing.assert_close(m(x, start_at_layer=l, resid_pre=cache[f"blocks.{l}.hook_resid_pre"]), full,
                                   atol=1e-5, rtol=1e-5)
    last = m.cfg.n_layers - 1
    with m.edit(hs.Ablate(last, 0)):
        edited = m(x)
        torch.testing.assert_close(m(x, start_at_layer=last, resid_pre=cache[f"blocks.{last}.hook_resid_pre"]),
                                   edited, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edited, full)
    with pytest.raises(RuntimeError):
        with m.start_at(1, cache["blocks.1.hook_resid_pre"]):
            raise RuntimeError("boom")
    assert all("forward" not in layer.__dict__ for layer in m.layers)
    torch.testing.assert_close(m(x), full)
    with pytest.raises(ValueError, match="outside"):
        m(x, start_at_layer=m.cfg.n_layers, resid_pre=cache["blocks.1.hook_resid_pre"])
    with pytest.raises(ValueError, match="resid_pre"):
        m(x, start_at_layer=1)
    with pytest.raises(ValueError, match="covers"):
        m(x[:1], start_at_layer=1, resid_pre=cache["blocks.1.hook_resid_pre"])
