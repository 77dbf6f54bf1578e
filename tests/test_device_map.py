"""Models split with accelerate's device_map (dispatch_model / cpu_offload): accelerate puts an
AlignDevicesHook on every module, the machinery a multi-GPU split uses; on this CPU machine layers
sit on "cpu" and on "disk" (weights on "meta", loaded per forward). Logits, recorded statistics,
edits, hook_z caches and gradients must equal the plain single-device run."""
import pytest
import torch
from accelerate import cpu_offload

import headscope as hs

STATS = hs.Stats(sink_k=1, entropy=True, distance=True, argmax=True, received=True)


def _split_map(m):
    """Embedding, norm and head on the CPU; odd layers offloaded to disk, even layers on the CPU."""
    n = m.cfg.n_layers
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(n)})
    return dm


def _edits(m):
    L, H = m.cfg.n_layers, m.cfg.n_heads
    return [hs.Ablate(L - 1, 0, how="uniform"), hs.ScaleKeys(1, H - 1, keys=[(0, 1)], factor=0.4),
            hs.HeadAffine(0, 1, scale=torch.full((m.cfg.d_head,), 0.3))]


def _run(m, toks):
    out = {"logits": m(toks)}
    with m.record(STATS) as rec:
        m(toks)
    for name in ("sink_mass", "entropy", "distance", "argmax"):
        out[name] = rec.stack(name)
    out["received"] = rec.received_mean(1)
    with m.edit(_edits(m)):
        out["edited"] = m(toks)
    _, c = m.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_z") or n.endswith("hook_resid_pre"))
    out["z"] = torch.stack([c["z", l] for l in range(m.cfg.n_layers)])
    top = m.cfg.n_layers - 1
    out["start_at"] = m(toks, start_at_layer=top, resid_pre=c["resid_pre", top])
    v = torch.zeros(m.cfg.d_head, requires_grad=True)                # gradient through an edit
    with m.edit([hs.AddToHead(1, 0, v)]):
        m(toks)[:, -1].logsumexp(-1).sum().backward()
    out["grad"] = v.grad
    return out


def _compare(ref, got):
    for k, a in ref.items():
        b = got[k]
        assert b.device == a.device, k                                # statistics come back on one device
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-6), (k, (a.float() - b.float()).abs().max())
    assert ref["grad"].abs().sum() > 0 and not torch.equal(ref["edited"], ref["logits"])


@pytest.fixture(scope="module")
def tiny_ref():
    m = hs.load("tiny-llama")
    toks = torch.randint(0, m.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    return toks, _run(m, toks)


def _hooked_modules(m):
    return [n for n, mod in m.model.named_modules() if type(getattr(mod, "_hf_hook", None)).__name__ == "AlignDevicesHook"]


def test_device_map_split_over_cpu_and_disk_equals_one_device(tiny_ref, tmp_path):
    toks, ref = tiny_ref
    m = hs.load("tiny-llama")
    m = hs.load("tiny-llama", device_map=_split_map(m), offload_dir=str(tmp_path))
    assert {p.device.type for p in m.model.model.layers[1].parameters()} == {"meta"}   # really offloaded
    assert any(".layers.1" in n for n in _hooked_modules(m))
    _compare(ref, _run(m, toks))


def test_cpu_offload_every_weight_on_meta_equals_one_device(tiny_ref):
    toks, ref = tiny_ref
    hf = cpu_offload(hs.load("tiny-llama").model, execution_device=torch.device("cpu"))
    assert {p.device.type for p in hf.parameters()} == {"meta"}           # every weight loaded per forward
    m = hs.load(hf)
    assert m.device == torch.device("cpu")                                # inputs go to the execution device
    _compare(ref, _run(m, toks))


def test_auto_device_map_and_bad_maps(tmp_path):
    m = hs.load("tiny-llama", device_map="sequential")
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, m.cfg.vocab_size)
    with pytest.raises(ValueError, match="offload_dir"):
        hs.load("tiny-llama", device_map={"": "disk"})
    with pytest.raises(ValueError, match="device_map="):
        hs.load("tiny-llama", device_map="everywhere")


@pytest.mark.slow
@torch.no_grad()       # both runs on the same CPU row pass (with grad, offloaded weights take the PyTorch one)
def test_smollm2_split_over_cpu_and_disk(smollm2, tmp_path):
    toks = smollm2.to_tokens("The capital of France is")
    ref = smollm2(toks)
    with smollm2.record(hs.Stats(sink_k=1, entropy=True)) as rec:
        smollm2(toks)
    m = hs.load("smollm2", device_map=_split_map(smollm2), offload_dir=str(tmp_path))
    with m.record(hs.Stats(sink_k=1, entropy=True)) as rec2:
        got = m(toks)
    assert (ref - got).abs().max() <= 1e-5 * ref.abs().max()         # fp32 summation order (|logit| ~ 30)
    assert len([p for p in m.model.parameters() if p.device.type == "meta"]) > 50    # half the layers on disk
    assert torch.allclose(rec.stack("entropy"), rec2.stack("entropy"), atol=1e-5)
    assert torch.allclose(rec.stack("sink_mass"), rec2.stack("sink_mass"), atol=1e-5)
