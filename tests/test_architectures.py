"""Architecture conformance: tiny seeded random models of 18 HF families, loaded with ``hs.load``,
give HF eager's logits (unpadded, left-padded with a mask, and with every statistic recorded so the
instrumented chunked path runs, not SDPA), and greedy generation under an edit (KV-cache decode
path) agrees with full forwards under the same edit. A family whose attention does not dispatch
through transformers' ``AttentionInterface`` (Falcon) is refused at load with a message naming it."""
import copy
import inspect
import logging
import sys
import types

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import headscope as hs
from headscope.kernels.spec import expected_keys
from headscope.probe.tiny import ARCHS, TINY, tiny_model



def _falcon_dispatches() -> bool:
    """Falcon's attention calls ALL_ATTENTION_FUNCTIONS from transformers 5.25 on; before, it ran
    its own attention."""
    from transformers.models.falcon import modeling_falcon
    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_falcon.FalconAttention.forward)


REFUSED = {} if _falcon_dispatches() else {"tiny-falcon": "FalconAttention"}
NAMES = sorted(set(TINY) | set(ARCHS) - set(REFUSED))
ALL = hs.Stats(sink_k=2, spans=((3, 7),), entropy=True, distance=True, window_distance=4, recent=3,
               argmax=True, received=True)
TOL = 1e-4


def live_attention_module():
    """The module whose ``headscope_attention`` transformers calls (pytest may import the package
    under a second name; the registered copy is the one that logs)."""
    return sys.modules[ALL_ATTENTION_FUNCTIONS["headscope"].__module__]


def pair(name):
    hf = tiny_model(name)
    ref = copy.deepcopy(hf)
    ref.set_attn_implementation("eager")
    return hs.load(hf), ref


def batch(seed=0, n=13, pad=4):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, 128, (2, n), generator=g)
    mask = torch.ones_like(toks)
    mask[1, :pad] = 0
    toks[1, :pad] = 0                                          # the pad id of ARCHS configs
    return toks, mask


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_logits_and_edited_generation_match(name):
    m, ref = pair(name)
    toks, mask = batch()
    # unpadded, one sequence: the plain fast path (SDPA, or chunked for windows / softcap / sinks)
    d = (ref(input_ids=toks[:1]).logits - m(toks[:1])).abs().max()
    assert d < TOL, (name, "unpadded", float(d))
    # left-padded batch with its mask: real positions only
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    lr = ref(input_ids=toks, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    d = (lr - m(toks, attention_mask=mask))[keep].abs().max()
    assert d < TOL, (name, "padded", float(d))
    # every statistic recorded: the instrumented (chunked) path runs in every layer
    with m.record(ALL) as rec:
        lh = m(toks, attention_mask=mask)
    d = (lr - lh)[keep].abs().max()
    assert d < TOL, (name, "recorded", float(d))
    assert set(rec.names) == set(expected_keys(ALL)), name
    for layer in range(m.cfg.n_layers):
        for stat in rec.names:
            assert rec[stat, layer].shape[0] == 2, (name, layer, stat)
        assert torch.isfinite(rec["entropy", layer][keep[:, None].expand(-1, m.cfg.n_heads, -1)]).all()

    # one greedy generate step under an edit (KV-cache decode, Q=1 < K) = full forwards under it
    toks = toks[:1, :9]
    edit = hs.Ablate(0, [0, 1], how="zero")
    with m.edit(edit):
        out = m.generate(toks, max_new_tokens=2)
        first = m(toks)[:, -1].argmax(-1)
        second = m(torch.cat([toks, first[:, None]], 1))[:, -1].argmax(-1)
    assert torch.equal(out[:, -2:], torch.stack([first, second], 1)), name
    # attention hooks fire (a model that bypassed the attention function would ignore them)
    assert not torch.allclose(m(toks), m.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z",
                                                                          lambda z, hook: z * 0)]))


def _bypassing_llama():
    """A tiny Llama whose attention modules compute attention themselves (plain SDPA, no
    AttentionInterface), as custom or older model classes do."""
    hf = tiny_model("tiny-llama")

    def own_attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, N, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, N, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, N, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, N, -1, self.head_dim).transpose(1, 2)
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(z.transpose(1, 2).reshape(B, N, -1)), None

    for layer in hf.model.layers:
        layer.self_attn.forward = types.MethodType(own_attention, layer.self_attn)
    return hf


BYPASSING = {"llama-own-attention": (_bypassing_llama, "LlamaAttention"),
             **{name: (lambda name=name: tiny_model(name), cls) for name, cls in REFUSED.items()}}


@pytest.mark.parametrize("name", sorted(BYPASSING))
def test_model_bypassing_attention_interface_is_refused(name):
    build, cls = BYPASSING[name]
    hf = build()
    assert hf(torch.zeros(1, 3, dtype=torch.long)).logits.isfinite().all()   # the model itself runs
    with pytest.raises(TypeError, match=f"{cls}.*ALL_ATTENTION_FUNCTIONS"):
        hs.load(hf)


@torch.no_grad()
def test_gpt_oss_sinks_are_used_and_declined_once():
    """GPT-OSS's learned sinks (``s_aux``) change the logits (dropping them was off by 0.28); the
    fused C row pass cannot do them and says so once, whatever the number of calls."""
    m, ref = pair("tiny-gptoss")
    toks = batch()[0]
    sinks = [a.sinks for a in m.attn]
    live_attention_module()._declined.clear()
    # count emissions with a handler on the headscope logger itself: run alone, pytest's root-level
    # capture can hold one record twice
    seen = []
    counter = logging.Handler(logging.WARNING)
    counter.emit = seen.append
    log = logging.getLogger("headscope")
    log.addHandler(counter)
    try:
        lh = m(toks)
        with m.record(entropy=True):
            m(toks)
    finally:
        log.removeHandler(counter)
    assert (ref(input_ids=toks).logits - lh).abs().max() < TOL
    msgs = [r.getMessage() for r in seen if "s_aux" in r.getMessage()]
    from headscope.kernels import cpu_native
    assert len(msgs) == (1 if cpu_native.available() else 0), msgs
    # without the sinks the logits differ: the test above could fail
    for s in sinks:
        s.data.fill_(-1e4)
    assert (ref(input_ids=toks).logits - m(toks)).abs().max() > 1e-3
