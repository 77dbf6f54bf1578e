"""One-off check (not a test: ~1 min and 3 GB on 2 cores): headscope idioms vs TransformerLens 4's
TransformerBridge on Gemma-3-270M. Run: HF_HUB_OFFLINE=1 PYTHONPATH=<dir holding headscope> python notes/tlidioms_gemma_parity.py"""
import os, copy, time
os.environ["HF_HUB_OFFLINE"]="1"
import torch
torch.set_num_threads(2)
import headscope as hs
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights
t0=time.time()
m = hs.load("gemma3-270m")
cfg = copy.deepcopy(m.model.config); cfg._attn_implementation = "eager"; cfg.architectures = [type(m.model).__name__]
with no_init_weights():
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
hf.load_state_dict(m.model.state_dict())
from transformer_lens.model_bridge import TransformerBridge
br = TransformerBridge.boot_transformers("google/gemma-3-270m", hf_model=hf.eval(), tokenizer=copy.deepcopy(m.tokenizer))
print("boot", time.time()-t0)
P = "When Mary and John went to the store, John gave a drink to"
tb = br.to_tokens(P)
print("tokens equal", torch.equal(tb, hs.probe.tl_idioms.tokens_with_bos(m.tokenizer, P)["input_ids"]), m.to_str_tokens(P)[:3] == br.to_str_tokens(P)[:3])
for n in ["W_Q","W_K","W_V","W_O","W_E","W_U"]:
    a, b = getattr(br, n), getattr(m, n); print(n, tuple(a.shape), tuple(b.shape), (a-b).abs().max().item() if a.shape==b.shape else "SHAPE")
with torch.no_grad():
    lb, cb = br.run_with_cache(tb)
    lh, ch = m.run_with_cache(tb)
print("logits", (lb-lh).abs().max().item())
print("scale final", (cb["ln_final.hook_scale"]-ch["ln_final.hook_scale"]).abs().max().item())
for n in ["W_in", "W_gate", "W_out"]:
    a, b = getattr(br, n), getattr(m, n); print(n, tuple(a.shape), tuple(b.shape), (a-b).abs().max().item() if a.shape==b.shape else "SHAPE")
for k in ["hook_embed", "blocks.3.hook_attn_out", "blocks.3.hook_mlp_out", "blocks.3.hook_resid_mid",
          "blocks.3.mlp.hook_pre", "blocks.3.mlp.hook_pre_linear", "blocks.3.mlp.hook_post"]:
    print(k, (cb[k]-ch[k]).abs().max().item() if k in cb.cache_dict else "not in TL")
with torch.no_grad():
    a1 = cb.accumulated_resid(apply_ln=True); a2 = ch.accumulated_resid(apply_ln=True); print("accum", (a1-a2).abs().max().item(), a1.abs().max().item())
    d1, l1 = cb.decompose_resid(return_labels=True); d2, l2 = ch.decompose_resid(return_labels=True); print("decomp", l1 == l2, (d1-d2).abs().max().item())
    print("TL decomposition sums to the final residual:", (d1.sum(0) - cb["resid_post", -1]).abs().max().item(),
          "| TL attn_out == resid_mid - resid_pre:", (cb["attn_out", 3] - (cb["resid_mid", 3] - cb["resid_pre", 3])).abs().max().item())
    print("hs decomposition sums to the final residual:", (d2.sum(0) - ch["resid_post", -1]).abs().max().item())
    s1 = cb.stack_head_results(); s2 = ch.stack_head_results(); print("heads", (s1-s2).abs().max().item())
    n1, nl1 = cb.stack_neuron_results(18, pos_slice=-1, return_labels=True); n2, nl2 = ch.stack_neuron_results(18, pos_slice=-1, return_labels=True)
    print("neurons", nl1 == nl2, (n1-n2).abs().max().item(), n1.abs().max().item())
    br.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    fin = ch["resid_post", -1][None]
    x1 = cb.logit_attrs(cb["resid_post", -1][None], " Mary", " John"); x2 = ch.logit_attrs(fin, " Mary", " John")
    print("DLA final", (x1-x2).abs().max().item(), x2.abs().max().item())
    x1 = cb.logit_attrs(s1, " Mary", pos_slice=None); x2 = ch.logit_attrs(s2, " Mary"); print("DLA heads", (x1-x2).abs().max().item(), x2.abs().max().item())
print("total", time.time()-t0)
