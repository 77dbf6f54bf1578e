"""A tiny Llama with a planted two-head induction circuit, for the circuit tests.

Residual layout (d_model 128): dims 0-15 token one-hot, 16-31 "previous token" one-hot, 32 a
constant, 40-55 the output slot read by the unembedding; the rest carries small noise.
- L0H1 (KV group 0) is a previous-token head: q and k read the constant dim into the fast rotary
  pairs 0-2 with k rotated by one position's angle, so q_m·k_n peaks at n = m - 1; v copies the token
  slot, o writes it into the previous-token slot.
- L1H2 (KV group 1) is an induction head: q reads the current token, k reads the previous-token slot,
  both into the slow rotary pairs 8-15 (rotation < 0.02 rad over the sequence: position-free
  content matching); v copies the token, o writes it to the output slot.
L0H0 and L1H3 share the planted heads' KV groups, so their values carry the token too; their
output weights are 20x smaller than the other heads'. Attention is peaked but not saturated (match scores ~4-6), so gradients are informative. Every
other head and both MLPs have small random weights. On "t0..t7 t0..t4" the model predicts t5.
"""
import random

import torch

import headscope as hs
from headscope.circuits.tasks import Task

PLANTED = [(0, 1), (1, 2)]


def planted_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=16, hidden_size=128, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                      max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    d = 32
    theta = [1e6 ** (-2 * i / d) for i in range(d // 2)]
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        for n, p in m.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
        E = m.model.embed_tokens.weight
        E.zero_()
        E[:, :16] = torch.eye(16)
        E[:, 32] = 4.0                                     # a large constant: RMS norms barely move
        E[:, 64:] = 0.01 * torch.randn(16, 64)
        a0 = 0.7
        l0 = m.model.layers[0].self_attn
        l0.q_proj.weight[32:64] = 0
        l0.k_proj.weight[0:32] = 0
        l0.v_proj.weight[0:32] = 0
        for i in range(3):                                  # previous-token head L0H1 (KV group 0)
            l0.q_proj.weight[32 + i, 32] = a0
            l0.k_proj.weight[i, 32] = a0 * torch.cos(torch.tensor(theta[i]))
            l0.k_proj.weight[i + 16, 32] = a0 * torch.sin(torch.tensor(theta[i]))
        for j in range(16):
            l0.v_proj.weight[j, j] = 1 / 2.74
        l0.o_proj.weight[:, 32:64] = 0
        l0.o_proj.weight[:, 0:32] *= 0.05                   # L0H0 shares L0H1's token-copying v: keep it faint
        for j in range(16):
            l0.o_proj.weight[16 + j, 32 + j] = 1.0
        l1 = m.model.layers[1].self_attn
        idx = list(range(8, 16)) + list(range(24, 32))      # slow rotary pairs 8-15
        l1.q_proj.weight[64:96] = 0
        l1.k_proj.weight[32:64] = 0
        l1.v_proj.weight[32:64] = 0
        for j in range(16):                                 # induction head L1H2 (KV group 1)
            l1.q_proj.weight[64 + idx[j], j] = 1.8
            l1.k_proj.weight[32 + idx[j], 16 + j] = 1.8
            l1.v_proj.weight[32 + j, j] = 1 / 2.67
        l1.o_proj.weight[:, 64:96] = 0
        l1.o_proj.weight[:, 96:128] *= 0.05                 # L1H3 shares L1H2's token-copying v: keep it faint
        for j in range(16):
            l1.o_proj.weight[40 + j, 64 + j] = 1.0
        m.lm_head.weight.zero_()
        for t in range(16):
            m.lm_head.weight[t, 40 + t] = 2.0
    return hs.load(m)


def induction_task(model, n: int = 16, seed: int = 0) -> Task:
    """Clean "t0..t7 t0..t4" -> t5 (wrong: t0); corrupted: the first half uses the 8 other tokens."""
    rng = random.Random(seed)
    clean, corrupt, ans, wrong = [], [], [], []
    for _ in range(n):
        perm = rng.sample(range(16), 16)
        t, s = perm[:8], perm[8:]
        clean.append(t + t[:5])
        corrupt.append(s + t[:5])
        ans.append(t[5])
        wrong.append(t[0])
    return Task.from_prompts(model, clean, corrupt, ans, wrong, name="induction")
