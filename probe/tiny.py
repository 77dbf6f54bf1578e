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


# More architectures, for the conformance test (tests/test_architectures.py): each against HF eager.
# Two layers, hidden 64, 4 heads (2 KV heads where the family has GQA), token ids 0/1/2 = pad/bos/eos.
_ARCH_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    max_position_embeddings=256, num_attention_heads=4, num_key_value_heads=2,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MHA = dict(num_key_value_heads=None)            # families without GQA in their config
ARCHS = {
    "tiny-qwen3": ("Qwen3Config", dict(head_dim=16)),
    "tiny-gemma2": ("Gemma2Config", dict(head_dim=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                         sliding_window=6)),
    "tiny-phi3": ("Phi3Config", {}),
    "tiny-gptneox": ("GPTNeoXConfig", _MHA),
    "tiny-opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, **_MHA)),
    "tiny-falcon": ("FalconConfig", _MHA),
    "tiny-mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    "tiny-olmo2": ("Olmo2Config", {}),
    "tiny-stablelm": ("StableLmConfig", {}),
    "tiny-cohere": ("CohereConfig", {}),
    "tiny-granite": ("GraniteConfig", {}),
    "tiny-gptoss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=6,
                                         layer_types=["sliding_attention", "full_attention"])),
    "tiny-smollm3": ("SmolLM3Config", {}),
}
_QK = ("q_proj.weight", "k_proj.weight", "c_attn.weight", "query_key_value.weight", "qkv_proj.weight")


def tiny_model(name: str, seed: int = 0, qk_scale: float | None = None):
    """A seeded random model of ``TINY`` or ``ARCHS``. ``qk_scale`` (default 8 for ``TINY``, 4 for
    ``ARCHS``) multiplies the query/key weights: random init is near-uniform attention, and peaked
    patterns make statistics (and mistakes) visible."""
    import transformers
    from transformers import AutoModelForCausalLM

    if name in TINY:
        cls_name, extra = TINY[name]
        kw = dict(extra) if cls_name == "GPT2Config" else {**_COMMON, **extra}
        qk_scale = 8.0 if qk_scale is None else qk_scale
    elif name in ARCHS:
        cls_name, extra = ARCHS[name]
        kw = {k: v for k, v in {**_ARCH_COMMON, **extra}.items() if v is not None}
        qk_scale = 4.0 if qk_scale is None else qk_scale
    else:
        raise KeyError(f"unknown tiny model {name!r}: one of {sorted(TINY) + sorted(ARCHS)}")
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in _QK):
                p.mul_(qk_scale)
    return model.eval()
