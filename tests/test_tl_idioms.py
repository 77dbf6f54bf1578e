"""TransformerLens idioms on HookedModel and ActivationCache.

Tiny models: the weights reproduce the activations the model computed (q/k/v, head results), the
cache helpers add up (components sum to the residual stream, attributions to the logit difference),
persistent hooks persist until reset, BOS handling on tokenizers that do and do not add a BOS.
SmolLM2: every idiom gives the numbers TransformerLens 4's TransformerBridge gives on the same
weights (the Bridge is booted once, offline, on a copy of the model)."""
import copy

import pytest
import torch

import headscope as hs
from headscope.probe.tl_idioms import tokenizer_prepends_bos, tokens_with_bos

PROMPT = "When Mary and John went to the store, John gave a drink to"


# ------------------------------------------------------------------------------ tokenizers
def _word_tokenizer(prepends_bos: bool, has_bos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "hello": 3, "world": 4, "a": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if prepends_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    kw = dict(bos_token="<bos>") if has_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", **kw)


@pytest.mark.parametrize("prepends", [True, False])
def test_tokens_with_bos_adds_exactly_one_bos_on_any_tokenizer(prepends):
    tok = _word_tokenizer(prepends)
    assert tokenizer_prepends_bos(tok) is prepends
    with_bos = tokens_with_bos(tok, ["hello world", "a"], prepend_bos=True)
    without = tokens_with_bos(tok, ["hello world", "a"], prepend_bos=False)
    assert with_bos["input_ids"].tolist() == [[2, 3, 4], [0, 2, 5]]          # left padded
    assert with_bos["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert without["input_ids"].tolist() == [[3, 4], [0, 5]]
    right = tokens_with_bos(tok, ["hello world", "a"], prepend_bos=True, padding_side="right")
    assert right["input_ids"].tolist() == [[2, 3, 4], [2, 5, 0]]


def test_tokens_with_bos_falls_back_to_eos_and_rejects_empty_input():
    tok = _word_tokenizer(False, has_bos=False)       # like Qwen2: no BOS token at all
    assert tokens_with_bos(tok, "hello", prepend_bos=True)["input_ids"].tolist() == [[1, 3]]
    with pytest.raises(ValueError, match="empty prompt"):
        tokens_with_bos(tok, "", prepend_bos=False)
    with pytest.raises(ValueError, match="padding_side"):
        tokens_with_bos(tok, "hello", padding_side="middle")


# ------------------------------------------------------------------------------ tiny models
def load_with_biases(name):
    """A tiny model whose biases (zero at initialisation) are random, so they count in the checks."""
    m = hs.load(name)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def tiny():
    return hs.load("tiny-llama")


def test_config_aliases(tiny):
    c = tiny.cfg
    assert (c.d_vocab, c.n_ctx, c.n_key_value_heads) == (128, 512, 2)
    assert (c.d_model, c.d_head, c.n_heads, c.n_layers) == (64, 16, 4, 3)


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-gemma3"])
def test_weights_reproduce_the_activations(name):
    """v (no rotary) from the pre-attention norm's output, W_V and b_V; on GPT-2 (fused Conv1D
    c_attn, biases, no rotary) q and k too; head results are z @ W_O; OV / QK factor as TL's."""
    m = load_with_biases(name)
    c = m.cfg
    toks = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    _, cache = m.run_with_cache(toks)
    assert m.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert m.W_K.shape == m.W_V.shape == (c.n_layers, c.n_kv_heads, c.d_model, c.d_head)
    assert m.W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    assert m.b_Q.shape == (c.n_layers, c.n_heads, c.d_head) and m.b_O.shape == (c.n_layers, c.d_model)
    assert m.W_U.shape == (c.d_model, c.d_vocab) and m.W_E.shape == (c.d_vocab, c.d_model)
    for l in range(c.n_layers):
        x = m.layer_norm(l).module(cache["resid_pre", l])                       # [B, pos, d_model]
        v = torch.einsum("bpm,hmd->bphd", x, m.W_V[l]) + m.b_V[l]
        assert torch.allclose(v, cache["v", l], atol=1e-5), (name, l)
        if name == "tiny-gpt2":
            q = torch.einsum("bpm,hmd->bphd", x, m.W_Q[l]) + m.b_Q[l]
            k = torch.einsum("bpm,hmd->bphd", x, m.W_K[l]) + m.b_K[l]
            assert torch.allclose(q, cache["q", l], atol=1e-5) and torch.allclose(k, cache["k", l], atol=1e-5)
            assert m.b_Q[l].abs().sum() > 0                                     # GPT-2 has biases
        res = torch.einsum("bphd,hdm->bphm", cache["z", l], m.W_O[l])
        assert torch.allclose(res, cache["result", l], atol=1e-5)
    group, h = c.n_heads // c.n_kv_heads, c.n_heads - 1                     # query head h reads KV head h // group
    ov = m.OV
    assert ov.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model)
    assert torch.allclose(ov.A[1, h], m.W_V[1, h // group]) and torch.allclose(ov.B[1, h], m.W_O[1, h])
    assert torch.allclose(m.QK[2, h].AB, m.W_Q[2, h] @ m.W_K[2, h // group].T, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_mlp_neuron_hooks_and_weights(name):
    """blocks.{l}.mlp.hook_pre / hook_pre_linear / hook_post (TransformerLens' neuron hooks) are the
    gate/up projections' outputs and the down projection's input; W_in/W_gate/W_out/b_in/b_out
    reproduce them; a hook on hook_post changes the MLP's output; gradients reach it."""
    m = load_with_biases(name)
    gated = name != "tiny-gpt2"
    toks = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    _, cache = m.run_with_cache(toks)
    L = m.cfg.n_layers
    assert m.W_in.shape[:2] == (L, m.cfg.d_model) and m.W_out.shape[::2] == (L, m.cfg.d_model)
    d_mlp = m.W_in.shape[2]
    assert cache["post", 0].shape == (2, 9, d_mlp) and "blocks.1.mlp.hook_post" in m.hook_names()
    for l in range(L):
        x = cache["mlp_in", l]
        pre_in = x @ m.W_in[l] + m.b_in[l]
        if gated:
            assert torch.allclose(x @ m.W_gate[l], cache["pre", l], atol=1e-5)
            assert torch.allclose(pre_in, cache["pre_linear", l], atol=1e-5)
        else:
            assert torch.allclose(pre_in, cache["pre", l], atol=1e-5)
            assert "blocks.0.mlp.hook_pre_linear" not in m.hook_names()
            with pytest.raises(TypeError, match="gated MLPs only"):
                m.W_gate
        out = cache["post", l] @ m.W_out[l] + m.b_out[l]
        if name != "tiny-gemma3":                                              # Gemma: post-MLP norm after
            assert torch.allclose(out, cache["mlp_out", l], atol=1e-5)
    zero_n = lambda t, hook: t.index_fill(-1, torch.tensor([0, 3]), 0.0)      # noqa: E731
    with m.hooks([("blocks.1.mlp.hook_post", zero_n)]):
        _, c2 = m.run_with_cache(toks, names_filter=["blocks.1.hook_mlp_out"])
    if name != "tiny-gemma3":
        expect = zero_n(cache["post", 1], None) @ m.W_out[1] + m.b_out[1]
        assert torch.allclose(c2["mlp_out", 1], expect, atol=1e-5)
    assert not torch.allclose(c2["mlp_out", 1], cache["mlp_out", 1])
    with torch.enable_grad():
        _, g = m.run_with_cache(toks, names_filter=["blocks.2.mlp.hook_post"], incl_bwd=True)
    assert g["post_grad", 2].shape == cache["post", 2].shape and g["post_grad", 2].abs().sum() > 0
    with pytest.raises(ValueError, match="did you mean 'blocks.0.mlp.hook_post'"):
        m.run_with_cache(toks, names_filter=["blocks.0.hook_post"])


def test_weights_error_names_what_is_missing(tiny):
    from torch import nn

    class Odd(nn.Module):
        pass

    saved = tiny.attn[0]
    tiny.attn[0] = Odd()
    try:
        with pytest.raises(TypeError, match="q/k/v projections"):
            tiny.W_Q
    finally:
        tiny.attn[0] = saved


@torch.no_grad()
def test_persistent_hooks_until_reset(tiny):
    toks = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    clean = tiny(toks)

    def zero_head0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    seen = []
    tiny.add_hook("blocks.1.attn.hook_z", zero_head0)
    tiny.add_hook(lambda n: n.endswith("hook_pattern"), lambda t, hook: seen.append(hook.name), is_permanent=True)
    try:
        a = tiny(toks)
        logits, cache = tiny.run_with_cache(toks, names_filter=["blocks.1.attn.hook_z"])
        assert not torch.allclose(a, clean, atol=1e-3) and torch.equal(tiny(toks), a)    # active on every call
        assert torch.equal(logits, a)                                           # ... and in run_with_cache,
        assert cache["z", 1][:, :, 0].abs().max() == 0                          # before its saver (TL's order)
        with tiny.hooks([("blocks.1.attn.hook_z", zero_head0)]):
            assert torch.equal(tiny(toks), a)                                   # the same edit as a context hook
        assert len(seen) == 4 * tiny.cfg.n_layers                               # one per layer and call
        tiny.reset_hooks()                                                      # the permanent one stays
        assert torch.allclose(tiny(toks), clean, atol=1e-5) and len(seen) == 5 * tiny.cfg.n_layers
        with pytest.raises(ValueError, match="unknown hook"):
            tiny.add_hook("blocks.0.attn.hook_nothing", zero_head0)             # refused at once
    finally:
        tiny.reset_hooks(including_permanent=True)
    n = len(seen)
    tiny(toks)
    assert len(seen) == n


@torch.no_grad()
def test_persistent_hooks_follow_a_deepcopy():
    m = hs.load("tiny-llama")
    toks = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    clean = m(toks)
    m.add_hook("blocks.0.attn.hook_z", lambda z, hook: torch.zeros_like(z))
    ablated = m(toks)
    twin = copy.deepcopy(m)
    assert torch.equal(twin(toks), ablated)                                     # the copy has its own hooks
    twin.reset_hooks()
    assert torch.allclose(twin(toks), clean, atol=1e-5) and torch.equal(m(toks), ablated)


def test_persistent_backward_hook(tiny):
    toks = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    grads = []
    tiny.add_hook("blocks.2.hook_resid_post", lambda g, hook: grads.append((hook.name, g)), dir="bwd")
    try:
        tiny(toks)[0, -1, 3].backward()
        assert len(grads) == 1 and grads[0][0] == "blocks.2.hook_resid_post"
        g = grads[0][1]
        # the last layer's output reaches the logit at its own position only
        assert g.shape == (1, 8, tiny.cfg.d_model) and g[0, -1].abs().sum() > 0 and g[0, :-1].abs().sum() == 0
    finally:
        tiny.reset_hooks()
        tiny.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        tiny(toks)
    assert len(grads) == 1
    with pytest.raises(ValueError, match="dir"):
        tiny.add_hook("blocks.1.hook_resid_post", lambda g, hook: None, dir="both")


@torch.no_grad()
def test_cache_indexing_and_batch_dim(tiny):
    toks = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    _, cache = tiny.run_with_cache(toks)
    L = tiny.cfg.n_layers
    assert cache["pattern", -1] is cache["pattern", L - 1]
    assert cache["blocks.1.attn.hook_rot_k"] is cache["k", 1] and cache["rot_q", 2] is cache["q", 2]
    assert cache["z", 0, "attn"] is cache["blocks.0.attn.hook_z"] and cache["resid_pre", -3] is cache["resid_pre", 0]
    assert cache.stack_activation("pattern").shape == (L, 1, tiny.cfg.n_heads, 6, 6)
    assert cache.stack_activation("resid_pre", layer=2).shape == (2, 1, 6, tiny.cfg.d_model)
    s = cache["ln_final.hook_scale"]                                            # computed, not cached
    x = cache["resid_post", -1]
    assert s.shape == (1, 6, 1) and torch.allclose(s, (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())
    with pytest.raises(KeyError):
        cache["blocks.0.attn.hook_nothing"]
    seen = []
    with tiny.hooks([("blocks.1.hook_resid_mid", lambda t, hook: seen.append(t.shape))]):
        cache["blocks.1.ln2.hook_scale"]                                        # reads the ln2 module, no hook runs
    assert seen == []
    cache.remove_batch_dim()
    assert cache["pattern", -1].shape == (tiny.cfg.n_heads, 6, 6) and not cache.has_batch_dim
    stack = cache.accumulated_resid(apply_ln=True)                             # works without the batch dim
    assert stack.shape == (L + 1, 6, tiny.cfg.d_model)
    _, c2 = tiny.run_with_cache(torch.cat([toks, toks]))
    with pytest.raises(ValueError, match="batch sizes"):
        c2.remove_batch_dim()


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_decompositions_add_up(name, caplog):
    """Components sum to the residual stream; direct logit attributions of the final stack sum to
    the logit difference (RMSNorm: exactly; GPT-2's LayerNorm: up to its bias term, the same for
    both tokens); logit lens on the final residual gives the logits."""
    m = load_with_biases(name)
    toks = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    logits, cache = m.run_with_cache(toks)
    final = cache["resid_post", -1]
    parts, labels = cache.decompose_resid(return_labels=True)
    n_embed = 2 if name == "tiny-gpt2" else 1                                  # GPT-2: learned positions
    assert labels[:n_embed + 2] == ["embed", "pos_embed"][:n_embed] + ["0_attn_out", "0_mlp_out"]
    assert len(labels) == n_embed + 2 * m.cfg.n_layers
    heads, hl = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert hl[0] == "L0H0" and hl[-1] == "remainder" and torch.allclose(heads.sum(0), final, atol=1e-4)
    full, fl = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert fl[-1] == "bias" and len(fl) == m.cfg.n_layers * (m.cfg.n_heads + 1) + n_embed + 1
    a, b = 5, 17
    diff = logits[..., a] - logits[..., b]
    # hook_attn_out / hook_mlp_out are what each branch adds (after Gemma's post-branch norms), so
    # the layer decomposition adds up on every architecture
    assert torch.allclose(parts.sum(0), final, atol=1e-4)
    if name == "tiny-gemma3":
        # per-head results are normalised again before they are added: not additive terms
        assert not torch.allclose(full.sum(0), final, atol=1e-2)
        assert caplog.text.count("not additive") == 1                          # the full decomposition only
    else:
        assert torch.allclose(full.sum(0), final, atol=1e-4)
        assert "not additive" not in caplog.text
    attrs = cache.logit_attrs(parts, a, incorrect_tokens=b)                    # [component, batch, pos]
    bias_term = 0.0
    ln = m.final_norm()
    if ln.bias is not None:
        bias_term = ln.bias @ (m.W_U[:, a] - m.W_U[:, b]) + m.b_U[a] - m.b_U[b]
    assert torch.allclose(attrs.sum(0) + bias_term, diff, atol=1e-4)
    lens = cache.accumulated_resid(apply_ln=True)
    assert torch.allclose(lens[-1] @ m.W_U + m.b_U, logits, atol=1e-4)
    per_example = cache.logit_attrs(parts, torch.tensor([a, b]))                # one token per example
    assert torch.allclose(per_example[:, 1], cache.logit_attrs(parts, b, batch_slice=1))
    # per-neuron terms (TransformerLens' default expand_neurons=True): hook_post[n] * W_out[n]
    neurons, nl = cache.get_full_resid_decomposition(return_labels=True, pos_slice=-1)
    d_mlp = m.W_out.shape[1]
    L = m.cfg.n_layers
    assert nl[L * m.cfg.n_heads] == "L0N0" and nl[-(n_embed + 2)] == f"L{L - 1}N{d_mlp - 1}" and nl[-1] == "bias"
    assert len(nl) == m.cfg.n_layers * (m.cfg.n_heads + d_mlp) + n_embed + 1
    if name != "tiny-gemma3":                                                  # post-MLP norm: not additive
        assert torch.allclose(neurons.sum(0), final[:, -1], atol=1e-4)
        mlp0 = cache.neuron_terms(1).sum(0) + m.b_out[0]
        assert torch.allclose(mlp0, cache["mlp_out", 0], atol=1e-5)
    sn, sl = cache.stack_neuron_results(2, neuron_slice=(1, 4), return_labels=True)
    assert sl == ["L0N1", "L0N2", "L0N3", "L1N1", "L1N2", "L1N3"] and sn.shape == (6, 2, 7, m.cfg.d_model)
    assert torch.equal(sn[4], cache.neuron_terms(2)[d_mlp + 2])


# ------------------------------------------------------------------------------ TransformerLens parity
@pytest.fixture(scope="module")
def tl(smollm2):
    """TransformerLens 4's TransformerBridge on a copy of SmolLM2's weights (booting switches the
    model it wraps to eager attention and, in compatibility mode, folds weights in place). Returns
    the Bridge's numbers; the Bridge itself is dropped."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = copy.deepcopy(smollm2.model.config)
    cfg._attn_implementation = "eager"
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    hf.load_state_dict(smollm2.model.state_dict())
    br = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf.eval(),
                                             tokenizer=copy.deepcopy(smollm2.tokenizer))
    r = {"cfg": {k: getattr(br.cfg, k) for k in ("d_vocab", "n_ctx", "d_model", "d_head", "n_heads",
                                                   "n_layers", "n_key_value_heads")}}
    r["tokens"] = br.to_tokens(PROMPT)
    r["tokens_nobos"] = br.to_tokens(PROMPT, prepend_bos=False)
    r["str_tokens"] = br.to_str_tokens(PROMPT)
    r["str_tokens_ids"] = br.to_str_tokens(r["tokens"][0, 3:])
    r["mary"] = br.to_single_token(" Mary")
    r["pos"] = (br.get_token_position(" John", PROMPT), br.get_token_position(" John", PROMPT, mode="last"))
    with torch.no_grad():
        for n in ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U", "b_U", "W_in", "W_gate", "W_out"):
            r[n] = getattr(br, n).detach().clone()
        r["OV_shape"], r["QK_shape"] = br.OV.shape, br.QK.shape
        r["OV_4_7"], r["QK_20_2"] = br.OV[4, 7].AB, br.QK[20, 2].AB
        logits, cache = br.run_with_cache(r["tokens"])
        r["logits"] = logits
        r["pattern_last"] = cache["pattern", -1]
        r["neurons_3"] = {k: cache[k, 3] for k in ("pre", "pre_linear", "post")}
        r["full_neurons"], r["full_neurons_labels"] = cache.get_full_resid_decomposition(pos_slice=-1,
                                                                                         return_labels=True)
        r["neurons_stack"], r["neurons_stack_labels"] = cache.stack_neuron_results(
            5, pos_slice=-1, neuron_slice=(10, 20), return_labels=True, incl_remainder=True, apply_ln=True)
        r["scale_final"], r["scale_ln2_5"] = cache["ln_final.hook_scale"], cache["blocks.5.ln2.hook_scale"]
        r["decomp"], r["decomp_labels"] = cache.decompose_resid(return_labels=True)
        r["decomp_mlp_in_7"] = cache.decompose_resid(7, mlp_input=True, mode="attn", pos_slice=-1)
        r["accum"], r["accum_labels"] = cache.accumulated_resid(apply_ln=True, return_labels=True)
        r["accum_9"] = cache.accumulated_resid(9, incl_mid=True, apply_ln=True, pos_slice=(2, 8))
        r["heads"], r["head_labels"] = cache.stack_head_results(return_labels=True)
        r["heads_12_ln"] = cache.stack_head_results(12, apply_ln=True, pos_slice=-1)
        r["stack_z"] = cache.stack_activation("z")
        r["decomp_ln"] = cache.apply_ln_to_stack(r["decomp"])
        r["full"], r["full_labels"] = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
        r["string"] = br.to_string(r["tokens"][0])
        # direct logit attribution in TransformerLens' post-processed coordinates (fold_ln); the
        # cache keeps its residual stream and reads the folded unembedding through the Bridge
        br.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
        r["dla"] = cache.logit_attrs(r["decomp"], " Mary", incorrect_tokens=" John")
        r["dla_heads"] = cache.logit_attrs(r["heads"][:, :, -1], r["mary"], pos_slice=-1)
    return r


@pytest.fixture(scope="module")
def hs_cache(smollm2, tl):
    with torch.no_grad():
        logits, cache = smollm2.run_with_cache(tl["tokens"])
    return logits, cache


def close(a, b, tol=1e-4):
    """Equal to float32 rounding of the two forward implementations (relative to the magnitude)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


@pytest.mark.slow
def test_tokens_and_config_match_transformerlens(smollm2, tl):
    m = smollm2
    assert {k: getattr(m.cfg, k) for k in tl["cfg"]} == tl["cfg"]
    assert torch.equal(tokens_with_bos(m.tokenizer, PROMPT)["input_ids"], tl["tokens"])
    assert tl["tokens"][0, 0] == m.tokenizer.bos_token_id                       # SmolLM2's tokenizer adds none
    assert torch.equal(tokens_with_bos(m.tokenizer, PROMPT, prepend_bos=False)["input_ids"], tl["tokens_nobos"])
    assert torch.equal(m.to_tokens(PROMPT), tl["tokens"])                       # the model's own to_tokens too
    assert torch.equal(m.to_tokens(PROMPT, prepend_bos=False), tl["tokens_nobos"])
    assert m.to_str_tokens(PROMPT) == tl["str_tokens"]
    assert m.to_string(tl["tokens"][0]) == tl["string"]
    assert m.to_str_tokens(tl["tokens"][0, 3:]) == tl["str_tokens_ids"]
    assert m.to_single_token(" Mary") == tl["mary"]
    assert (m.get_token_position(" John", PROMPT), m.get_token_position(" John", PROMPT, mode="last")) == tl["pos"]
    with pytest.raises(ValueError, match="not one"):
        m.to_single_token(" Mary and John")


@pytest.mark.slow
def test_weights_match_transformerlens(smollm2, tl):
    m = smollm2
    for n in ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U", "b_U", "W_in", "W_gate", "W_out"):
        assert torch.equal(getattr(m, n).detach(), tl[n]), n
    assert m.OV.shape == tl["OV_shape"] and m.QK.shape == tl["QK_shape"]
    assert torch.equal(m.OV[4, 7].AB, tl["OV_4_7"]) and torch.equal(m.QK[20, 2].AB, tl["QK_20_2"])


@pytest.mark.slow
@torch.no_grad()
def test_cache_helpers_match_transformerlens(tl, hs_cache):
    logits, c = hs_cache
    close(logits, tl["logits"])
    close(c["pattern", -1], tl["pattern_last"])
    close(c["ln_final.hook_scale"], tl["scale_final"])
    close(c["blocks.5.ln2.hook_scale"], tl["scale_ln2_5"])
    d, labels = c.decompose_resid(return_labels=True)
    assert labels == tl["decomp_labels"]
    close(d, tl["decomp"], 1e-4)
    close(c.decompose_resid(7, mlp_input=True, mode="attn", pos_slice=-1), tl["decomp_mlp_in_7"])
    a, al = c.accumulated_resid(apply_ln=True, return_labels=True)
    assert al == tl["accum_labels"]
    close(a, tl["accum"])
    close(c.accumulated_resid(9, incl_mid=True, apply_ln=True, pos_slice=(2, 8)), tl["accum_9"])
    h, hl = c.stack_head_results(return_labels=True)
    assert hl == tl["head_labels"]
    close(h, tl["heads"])
    close(c.stack_head_results(12, apply_ln=True, pos_slice=-1), tl["heads_12_ln"])
    close(c.stack_activation("z"), tl["stack_z"])
    close(c.apply_ln_to_stack(d), tl["decomp_ln"])
    full, fl = c.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert fl == tl["full_labels"]
    close(full, tl["full"])
    for k, v in tl["neurons_3"].items():                                       # blocks.3.mlp.hook_*
        close(c[k, 3], v)
    full, fl = c.get_full_resid_decomposition(pos_slice=-1, return_labels=True)  # per neuron
    assert fl == tl["full_neurons_labels"]
    close(full, tl["full_neurons"])
    st, sl = c.stack_neuron_results(5, pos_slice=-1, neuron_slice=(10, 20), return_labels=True,
                                    incl_remainder=True, apply_ln=True)
    assert sl == tl["neurons_stack_labels"]
    close(st, tl["neurons_stack"])


@pytest.mark.slow
@torch.no_grad()
def test_direct_logit_attribution_matches_transformerlens(smollm2, tl, hs_cache):
    logits, c = hs_cache
    d = c.decompose_resid()
    dla = c.logit_attrs(d, " Mary", incorrect_tokens=" John")
    close(dla, tl["dla"])
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    close(dla.sum(0), logits[..., mary] - logits[..., john])                  # attributions add up
    h = c.stack_head_results()
    close(c.logit_attrs(h[:, :, -1], tl["mary"], pos_slice=-1), tl["dla_heads"])


def test_module_hooks_are_registered_on_first_use_and_follow_a_deepcopy():
    """A model that never uses TransformerLens hooks runs without torch module hooks (they cost host
    time on every decode step); the first hooks context registers them, and a deep copy (made
    before or after that) serves its own hooks only: module-served hook points (resid_pre, mlp_out)
    read the copy's state, not the original's."""
    m = hs.load("tiny-llama")
    toks = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    layer = m.layers[0]
    assert not layer._forward_pre_hooks and not layer._forward_hooks          # nothing registered at load
    early = copy.deepcopy(m)                                                  # copied before registration
    seen = []

    def note(tag):
        return lambda t, hook: seen.append((tag, hook.name))
    with m.hooks([("blocks.0.hook_resid_pre", note("orig")), ("blocks.1.hook_mlp_out", note("orig"))]):
        m(toks)
    assert layer._forward_pre_hooks and layer._forward_hooks                  # registered by the first use
    assert seen == [("orig", "blocks.0.hook_resid_pre"), ("orig", "blocks.1.hook_mlp_out")]
    late = copy.deepcopy(m)                                                   # copied after registration
    for twin, tag in ((early, "early"), (late, "late")):
        seen.clear()
        with m.hooks([("blocks.0.hook_resid_pre", note("orig"))]):
            twin(toks)                                                        # the original's hooks: not here
        assert seen == []
        with twin.hooks([("blocks.0.hook_resid_pre", note(tag))]):
            twin(toks)
            m(toks)                                                           # nor the copy's in the original
        assert seen == [(tag, "blocks.0.hook_resid_pre")]
    with m.hooks([("blocks.0.hook_resid_pre", lambda t, hook: t * 0)]):       # registration is idempotent
        zeroed = m(toks)
    assert torch.allclose(early(toks), late(toks)) and not torch.allclose(zeroed, m(toks))
    assert len(layer._forward_pre_hooks) == 1


def test_loading_the_same_hf_model_twice_keeps_both_wrappers_working():
    """``hs.load(hf)`` on a model that is already loaded (a notebook cell run again) shares the first
    wrapper's state and module hooks: both record, both serve hooks, and each hook runs once (before,
    the first wrapper silently recorded nothing and lost its module-served hooks)."""
    m1 = hs.load("tiny-llama")
    m2 = hs.load(m1.model)
    assert m2.state is m1.state
    toks = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    for m in (m1, m2):
        with m.record(hs.Stats(argmax=True)) as rec:
            m(toks)
        assert rec.stack("argmax").shape == (m.cfg.n_layers, 1, m.cfg.n_heads, 6)
        seen = []
        with m.hooks([("blocks.0.hook_resid_pre", lambda t, hook: seen.append(hook.name)),
                      ("blocks.0.attn.hook_z", lambda z, hook: seen.append(hook.name))]):
            m(toks)
        assert sorted(seen) == ["blocks.0.attn.hook_z", "blocks.0.hook_resid_pre"]   # once each
    assert len(m1.layers[0]._forward_pre_hooks) == 1


def test_contexts_refuse_a_model_switched_off_the_headscope_attention():
    """After ``set_attn_implementation("sdpa")`` on the wrapped HF model, its attention no longer runs
    through headscope: a record, edit or hooks block then raises with the fix instead of ignoring
    every statistic and edit; switching back makes them work again."""
    m = hs.load("tiny-llama")
    toks = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    clean = m(toks)
    m.model.set_attn_implementation("sdpa")
    for ctx in (lambda: m.record(hs.Stats(argmax=True)), lambda: m.edit([hs.Ablate(layer=0, head=0)]),
                lambda: m.hooks([("blocks.0.attn.hook_z", lambda z, hook: z)])):
        with pytest.raises(RuntimeError, match="set_attn_implementation"):
            with ctx():
                m(toks)
    m.model.set_attn_implementation("headscope")
    with m.edit([hs.Ablate(layer=0, head=0)]):
        assert not torch.allclose(m(toks), clean)
