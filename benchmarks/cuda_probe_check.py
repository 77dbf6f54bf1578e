"""On a GPU: the probe through the Triton kernels equals HF eager attention and the chunked CPU
path (logits and statistics) on the tiny models, bf16 and fp32. Prints one line per model."""
import torch

import headscope as hs
from headscope.probe.tiny import TINY, tiny_model

st = hs.Stats(sink_k=2, spans=((3, 9),), entropy=True, distance=True, window_distance=5, recent=4,
              argmax=True, received=True)
for name in sorted(TINY):
    for dtype in (torch.float32, torch.bfloat16):
        ref = tiny_model(name).to("cuda", dtype)
        ref.set_attn_implementation("eager")
        m = hs.load(tiny_model(name), dtype=dtype, device="cuda")
        cpu = hs.load(tiny_model(name))
        toks = torch.randint(0, 128, (2, 301), device="cuda")
        mask = torch.ones_like(toks); mask[1, :7] = 0
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            lr = ref(input_ids=toks, attention_mask=mask, position_ids=pos).logits.float()
            with m.record(st) as rg:
                lg = m(toks, attention_mask=mask).float()
            with cpu.record(st) as rc:
                cpu(toks.cpu(), attention_mask=mask.cpu())
        keep = mask.bool()
        dl = (lr - lg)[keep].abs().max().item()
        ds = max((rg[n, l].float().cpu()[..., 7:] - rc[n, l].float()[..., 7:]).abs().max().item()
                 for n in ("sink_mass", "entropy", "recent_mass") for l in range(m.cfg.n_layers))
        print(f"{name:13s} {str(dtype):15s} max|logit - eager| {dl:.2e}  max|stat - cpu chunked| {ds:.2e}",
              flush=True)
