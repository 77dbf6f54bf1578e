"""Tiny random-initialised models of real architectures, for fast tests and examples.

Each is a real transformers model class with a small config (seeded), so everything that runs on
them runs on the full-size model of the same family.
"""
from __future__ import annotations

import torch

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               max_position_embeddings=512)

TINY = {
    # name: (config class path, extra config)
    "tiny-llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "tiny-qwen2": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=2)),
    "tiny-mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=8)),
    "tiny-gemma3": ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                             sliding_window=6, layer_types=["sliding_attention",
                                                                            "full_attention",
                                                                            "sliding_attention"])),
    "tiny-gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=512, vocab_size=128,
                                bos_token_id=0, eos_token_id=0)),
}


def tiny_model(name: str, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra = TINY[name]
    cfg_cls = getattr(transformers, cls_name)
    kw = dict(extra) if cls_name == "GPT2Config" else {**_COMMON, **extra}
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init is near-uniform attention; scale q/k weights up so patterns are peaked and
    # statistics are informative
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                p.mul_(8.0)
    return model.eval()
