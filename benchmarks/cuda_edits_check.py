"""On a GPU: every edit kind through the probe (Triton kernels for probability-space edits, PyTorch
for output-space ones) equals the CPU chunked path; a forward that needs gradients declines Triton
with one warning and gives the CPU gradient. Prints one line per check and exits non-zero on a
mismatch.

    python benchmarks/cuda_edits_check.py
"""
import logging
import sys as _sys


import torch

import headscope as hs
from headscope.probe.tiny import tiny_model

logging.basicConfig(level=logging.WARNING)
bad = 0


def report(what, diff, tol):
    global bad
    ok = diff <= tol
    bad += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what:60s} max|diff| {diff:.2e} (tol {tol:.0e})", flush=True)


g = torch.Generator().manual_seed(0)
d = 16
EDITS = {
    "Ablate zero": [hs.Ablate(0, [0, 2])],
    "Ablate mean [B, d] per example": [hs.Ablate(1, 1, how="mean", mean=torch.randn(2, d, generator=g))],
    "Ablate uniform": [hs.Ablate(1, [0, 3], how="uniform")],
    "ScaleKeys ACT": [hs.ScaleKeys(0, 1, keys=((0, 2),), factor=0.4)],
    "ScaleKeys VAR": [hs.ScaleKeys(2, 3, keys=((0, 1),), target=((5, 40),), factor=0.6, max_ratio=0.5,
                                   min_target=0.2)],
    "StreamingGate": [hs.StreamingGate(1, [0, 1, 2, 3], torch.rand(4, generator=g), sink=2, recent=8)],
    "HeadAffine": [hs.HeadAffine(2, [1, 2], scale=torch.randn(2, d, generator=g) * 0.1,
                                 bias=torch.randn(2, d, generator=g))],
    "AddToHead [B, Q, d]": [hs.AddToHead(0, 3, torch.randn(2, 64, d, generator=g))],
}
EDITS["all together"] = [e for es in EDITS.values() for e in es]

cpu = hs.load(tiny_model("tiny-llama"))
gpu = hs.load(tiny_model("tiny-llama"), device="cuda")
toks = torch.randint(0, 128, (2, 64), generator=g)
stats = hs.Stats(sink_k=2, entropy=True, received=True)
with torch.no_grad():
    for name, edits in EDITS.items():
        with cpu.edit(edits), cpu.record(stats) as rc:
            lc = cpu(toks)
        with gpu.edit(edits), gpu.record(stats) as rg:
            lg = gpu(toks.cuda()).cpu()
        report(f"{name}: logits", (lc - lg).abs().max().item(), 1e-4)
        ds = max((rc[n, l] - rg[n, l].cpu()).abs().max().item() for n in ("sink_mass", "entropy", "received_sum")
                 for l in range(3))
        report(f"{name}: statistics", ds, 1e-4)
        with gpu.edit(edits):                       # no recorder: output edits on the plain fast path
            lp = gpu(toks.cuda()).cpu()
        with cpu.edit(edits):
            lpc = cpu(toks)
        report(f"{name}: logits without a recorder", (lpc - lp).abs().max().item(), 1e-4)

# gradients: Triton has no backward, so the probe takes the chunked path and says so once
for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
    vec = torch.zeros(d, device=dev, requires_grad=True)
    with m.edit([hs.AddToHead(0, 1, vec), hs.ScaleKeys(1, 0, keys=((0, 1),), factor=0.5)]), \
            m.record(hs.Stats(entropy=True)):
        m(toks.to(dev))[:, -1].logsumexp(-1).sum().backward()
    if dev == "cpu":
        g_cpu = vec.grad.clone()
report("gradient wrt AddToHead vector (cuda vs cpu)", (vec.grad.cpu() - g_cpu).abs().max().item(), 1e-4)
_sys.exit(1 if bad else 0)
