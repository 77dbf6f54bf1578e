"""Architecture conformance: tiny seeded random models of 18 HF families, loaded with ``hs.load``,
give HF eager's logits (unpadded, left-padded with a mask, and with every statistic recorded so the
instrumented chunked path runs, not SDPA), and greedy generation under an edit (KV-cache decode
path) agrees with full forwards under the same edit. A family whose attention does not dispatch
through transformers' ``AttentionInterface`` (Falcon) is refused at load with a message naming it."""
import copy
import logging
import sys

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import headscope as hs
from headscope.kernels.spec import expected_keys
from headscope.probe.tiny import ARCHS, TINY, tiny_model

REFUSED = {"tiny-falcon": "FalconAttention"}       # bypasses AttentionInterface in transformers 5
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


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_model_bypassing_attention_interface_is_refused(name):
    with pytest.raises(TypeError, match=f"{REFUSED[name]}.*ALL_ATTENTION_FUNCTIONS"):
        hs.load(tiny_model(name))


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
