"""Diagnostic: the first token's RMS-normalised hidden state per layer (VAR's massive-activation
test, tau = 20) on the first calibration example of experiments/var.py's task.
    MODEL=... DEVICE=cuda python notes/interv_var_dims.py"""
import os
import torch
import headscope as hs
from headscope.interventions import tasks, var

m = hs.load(os.environ.get("MODEL", "smollm2"), device=os.environ.get("DEVICE") or None)
t = tasks.context_qa_task(m, 400, 4, 3, seed=0)
tok = t.splits(0, n_train=0, n_calibration=100, n_test=300)["calibration"][0].tokens
print("tokens", tok[:6].tolist(), len(tok), "d_model", m.cfg.d_model)
with torch.no_grad():
    _, cache = m.run_with_cache(tok[None], names_filter=lambda n: n.endswith("hook_resid_pre"))
for l in range(m.cfg.n_layers):
    x = cache[f"blocks.{l}.hook_resid_pre"][0, 0].float()
    x = (x * torch.rsqrt(x.pow(2).mean() + 1e-6)).abs()
    print(l, round(float(x.max()), 3), int(x.argmax()), cache[f"blocks.{l}.hook_resid_pre"].dtype)
print("massive_dims", var.massive_dims(m, tok))
