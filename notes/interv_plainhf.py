"""Device check: the first token's RMS-normalised hidden-state peak of SmolLM2 under plain HF
(eager attention, no headscope) and under headscope. On the 2-core CPU machine (transformers 5.24,
torch 2.13) both give 20.207 at layer 2 (dim 507) and 23.82 at layer 20; headscope on the H200
machine (transformers 5.17) gave 13.99 / 9.02 with the same weights.
    GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf python notes/interv_plainhf.py"""
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

g = Path(os.environ["GGUF"])
if g.is_dir():
    g = sorted(g.glob("*.gguf"))[0]
tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
m = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32, attn_implementation="eager")
import hashlib, numpy, platform, importlib.metadata as md  # noqa: E402
print("versions", platform.python_version(), "numpy", numpy.__version__, "gguf", md.version("gguf"), "torch", torch.__version__,
      "transformers", transformers.__version__, "md5", hashlib.md5(g.read_bytes()).hexdigest())
for name, w in m.state_dict().items():  # where do the weights differ between machines?
    if any(f"layers.{l}." in name for l in (0, 1, 2)) or "embed" in name or name == "model.norm.weight":
        w = w.double()
        print("weight", name, tuple(w.shape), f"{float(w.sum()):.6e}", f"{float(w.abs().sum()):.6e}", f"{float(w.abs().max()):.6e}")
DEV = os.environ.get("DEVICE", "cpu")
m.to(DEV)
ids = torch.tensor([[1] + tok("Read the text and the notes in it", add_special_tokens=False)["input_ids"]]).to(DEV)


def peaks(hidden, who):
    for l in (1, 2, 5, 10, 20):
        x = hidden[l][0, 0].float()
        x = (x * torch.rsqrt(x.pow(2).mean() + 1e-6)).abs()
        print(who, DEV, transformers.__version__, torch.__version__, "layer", l, round(float(x.max()), 3), int(x.argmax()))


with torch.no_grad():
    out = m(ids, output_hidden_states=True)
peaks(out.hidden_states, "plain-HF-eager")
print("plain next token", repr(tok.decode(out.logits[0, -1].argmax())), float(out.logits[0, -1].max()))
import headscope as hs  # noqa: E402
hm = hs.load(m)
with torch.no_grad():
    _, cache = hm.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
    lg = hm(ids)
peaks([cache[f"blocks.{l}.hook_resid_pre"] for l in range(hm.cfg.n_layers)], "headscope")
print("headscope next token", repr(tok.decode(lg[0, -1].argmax())), float(lg[0, -1].max()))
# how the experiments tokenise (VAR's first-token peak came out 13.99 on the device, 23.9 here)
from headscope.interventions.var import first_token_peak  # noqa: E402
hm = hs.load(os.environ["GGUF"], device=DEV)             # as the experiments load it
t = hm.to_tokens("Read the text and the notes in it, then answer the question.\n\n")[0]
print("to_tokens", t[:4].tolist(), "bos", repr(hm.tokenizer.bos_token), hm.tokenizer.bos_token_id,
      "add_bos", getattr(hm.tokenizer, "add_bos_token", None), "plain tok", hm.tokenizer("Read the text")["input_ids"])
print("first_token_peak", round(first_token_peak(hm, t), 3))
