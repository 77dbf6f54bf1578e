"""CUDA check of the arch work (run on the device machine): GPT-OSS sinks through the probe on CUDA
(Triton declines s_aux once, the chunked path gives HF eager's logits), every statistic through the
real Triton kernels has the reference's keys, and Gemma-2 softcapping / padded batches on CUDA.
    PYTHONPATH=<dir holding a headscope link> python notes/arch_cuda_check.py"""
import copy
import logging

import torch

import headscope as hs
from headscope.kernels import reference, triton_attention as ta
from headscope.kernels.spec import StatRequest, expected_keys
from headscope.probe.tiny import tiny_model

logging.basicConfig(level=logging.WARNING)
msgs = []
logging.getLogger("headscope").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: msgs.append(r.getMessage())})())
dev = "cuda"
ALL = StatRequest(sink_k=2, spans=((3, 7),), entropy=True, distance=True, window_distance=4, recent=3, argmax=True,
                  received=True)
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(2, 4, 33, 64, generator=g).to(dev, dt) for _ in range(3))
    ref = reference.attention(q, k, v, scaling=0.125, stats=ALL)[1]
    out = ta.attention(q, k, v, scaling=0.125, stats=ALL)[1]
    print(dt, "triton keys == reference keys:", set(out) == set(ref) == set(expected_keys(ALL)))
for name in ("tiny-gptoss", "tiny-gemma2", "tiny-qwen3", "tiny-mixtral"):
    hf = tiny_model(name).to(dev)
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    m = hs.load(hf)
    toks = torch.randint(3, 128, (2, 40), generator=g).to(dev)
    mask = torch.ones_like(toks)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        lr = eager(input_ids=toks, attention_mask=mask, position_ids=pos).logits
        d_plain = (lr - m(toks, attention_mask=mask))[mask.bool()].abs().max().item()
        with m.record(ALL) as rec:
            lh = m(toks, attention_mask=mask)
            m(toks, attention_mask=mask)
        d_rec = (lr - lh)[mask.bool()].abs().max().item()
    print(name, f"plain {d_plain:.2e} recorded {d_rec:.2e}", "keys ok:", set(rec.names) == set(expected_keys(ALL)))
print("warnings:", msgs)
