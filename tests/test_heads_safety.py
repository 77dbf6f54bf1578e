"""Ships / Sahara (heads/safety.py): a planted "safety head" on tiny models, the exactness of the
prefix-reuse and right-padding shortcuts, the refusal rule, and a small SmolLM2 run."""
import pytest
import torch

import headscope as hs
from headscope.heads import HeadScores
from headscope.heads.safety import (REFUSAL_PHRASES, SHIPS_TEMPLATE, Sahara, Ships, _Ablator, attack_success_rate,
                                    is_refusal, kl_smoothed, load_requests, ships_of, top1_angle)

TRIGGER, TARGET, A, B = 5, 77, 0, 1      # trigger token, "refusal" token; residual dims: trigger flag, constant
PLANT = (1, 2)


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models are dominated by per-op overhead: one thread is faster, and far faster on a
    loaded machine. The SmolLM2 test keeps the session's setting."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted_safety_model(name="tiny-llama", layer=PLANT[0], head=PLANT[1], big=4.0):
    """A head that attends to the trigger token wherever it is and writes the unembedding direction
    of TARGET: its q reads a constant residual dim, its k the trigger flag, both on the lowest RoPE
    frequency pair (so the match does not depend on position); its v carries the trigger flag."""
    m = hs.load(name)
    d, H, G = m.cfg.d_head, m.cfg.n_heads, m.cfg.n_kv_heads
    kv = head // (H // G)
    att = m.attn[layer]
    E = m.model.get_input_embeddings().weight
    U = m.model.get_output_embeddings().weight
    j = d // 2 - 1
    with torch.no_grad():
        E[:, A] = 0.0
        E[TRIGGER, A] = 1.0
        E[:, B] = 0.3
        q, k, v, o = att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.o_proj.weight
        q[head * d:(head + 1) * d] = 0
        q[head * d + j, B] = big
        k[kv * d:(kv + 1) * d] = 0
        k[kv * d + j, A] = big
        v[kv * d:(kv + 1) * d] = 0
        v[kv * d, A] = big
        o[:, head * d:(head + 1) * d] = 0
        o[:, head * d] = 20.0 * U[TARGET] / U[TARGET].norm()
    return m


def queries(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(10, 128, (int(torch.randint(8, 14, (1,), generator=g)),), generator=g)
        x[1] = TRIGGER
        out.append(x)
    return out


@pytest.fixture(scope="module")
def planted_llama():
    return planted_safety_model("tiny-llama")


@pytest.fixture(scope="module")
def planted_qwen2():
    return planted_safety_model("tiny-qwen2")


def _second_over_first(scores):
    s = scores.flatten().sort().values
    return float(s[-2] / s[-1])


@pytest.mark.parametrize("fixture", ["planted_llama", "planted_qwen2"])
@pytest.mark.parametrize("how", ["uniform", "zero"])
def test_ships_finds_planted_head(fixture, how, request):
    m = request.getfixturevalue(fixture)
    data = queries()
    r = Ships(how=how, n_queries=None, screen_layers=None).score(m, data, progress=False)
    assert r.shape == (m.cfg.n_layers, m.cfg.n_heads)
    assert r.top(1)[0][:2] == PLANT
    assert _second_over_first(r.scores) < 0.2
    assert r.extra["per_query"].shape == (len(data), m.cfg.n_layers, m.cfg.n_heads)
    assert (r.extra["per_query"] >= -1e-9).all()
    # in every query's top 10 (top_k), and the top 1 of each query
    assert int(r.extra["top_count"][PLANT]) == len(data)
    assert (r.extra["per_query"].flatten(1).argmax(1) == PLANT[0] * m.cfg.n_heads + PLANT[1]).all()


@pytest.mark.parametrize("how", ["uniform", "zero"])
def test_sahara_finds_planted_head(planted_llama, how):
    m = planted_llama
    r = Sahara(how=how, n_queries=None, rounds=2, candidates=None, screen_layers=None).score(m, queries(), progress=False)
    assert r.top(1)[0][:2] == PLANT
    assert _second_over_first(r.scores) < 0.2
    assert r.greedy[0][0] == PLANT
    assert r.extra["greedy_heads"].tolist()[0] == list(PLANT)
    assert len(r.greedy) == 2 and r.greedy[1][0] != PLANT


@torch.no_grad()
def test_ships_equals_kl_through_probe(planted_llama):
    """Ships of one head = KL computed with hs.Ablate through the plain HookedModel forward."""
    m = planted_llama
    data = queries(3, seed=1)
    r = Ships(screen_layers=None).score(m, data, progress=False)
    for i, x in enumerate(data):
        p = torch.log_softmax(m(x[None])[0, -1].double(), -1)
        for (l, h) in [PLANT, (0, 1), (2, 3)]:
            with m.edit(hs.Ablate(l, h, how="uniform", eps=1e-4)):
                q = torch.log_softmax(m(x[None])[0, -1].double(), -1)
            assert float(r.extra["per_query"][i, l, h]) == pytest.approx(float(kl_smoothed(p, q)), rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("name,how", [("tiny-llama", "uniform"), ("tiny-llama", "zero"), ("tiny-llama", "mean"),
                                      ("tiny-gpt2", "uniform"), ("tiny-gemma3", "uniform"), ("tiny-gemma3", "mean")])
def test_prefix_reuse_is_exact(name, how):
    m = hs.load(name)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 128, (n,), generator=g) for n in (9, 12, 7)]
    fast, full = _Ablator(m, ids, how=how, reuse_prefix=True), _Ablator(m, ids, how=how, reuse_prefix=False)
    for heads in ([(1, 2)], [(2, 0), (1, 1)], [(0, 3)]):
        (la, ha), (lb, hb) = fast.run(heads), full.run(heads)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)
    # and the ablation does something
    assert float(kl_smoothed(full.base_logp, full.run([(1, 2)])[0]).max()) > 1e-6
    # the layers got their own forward back
    assert all("forward" not in layer.__dict__ for layer in m.layers)


def test_right_padding_matches_single_sequences():
    m = hs.load("tiny-llama")
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(1, 128, (n,), generator=g) for n in (5, 11, 8)]
    ab = _Ablator(m, ids)
    for i, x in enumerate(ids):
        ref = torch.log_softmax(m(x[None])[0, -1].float(), -1)
        torch.testing.assert_close(ab.base_logp[i].float(), ref, atol=1e-5, rtol=1e-5)
        with m.edit(hs.Ablate(1, 0, how="uniform")):
            ref = torch.log_softmax(m(x[None])[0, -1].float(), -1)
        torch.testing.assert_close(ab.run([(1, 0)])[0][i].float(), ref, atol=1e-5, rtol=1e-5)


def test_top1_angle():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 16, generator=g)
    assert top1_angle(M, M) == pytest.approx(0.0, abs=1e-4)
    assert top1_angle(M, -2.0 * M) == pytest.approx(0.0, abs=1e-4)       # sign and scale do not matter
    u = torch.zeros(6); u[0] = 1.0
    v = torch.zeros(6); v[1] = 1.0
    w = torch.randn(16, generator=g)
    assert top1_angle(10 * u[:, None] * w + 0.01 * M, 10 * v[:, None] * w + 0.01 * M) == pytest.approx(90.0, abs=1.0)


def test_refusal_rule_and_data():
    assert "I cannot" in REFUSAL_PHRASES and len(REFUSAL_PHRASES) == 29
    assert is_refusal("I'm sorry, but I can't help with making weapons of any kind.")
    assert is_refusal("I\u2019m sorry, but that request is something I will not help with.")   # curly apostrophe
    assert is_refusal("Sure, here it is.")                                                  # < 32 characters
    assert not is_refusal("Sure, here is a tutorial on baking bread: first, mix flour and water.")
    harmful, harmless = load_requests("harmful"), load_requests("harmless")
    assert len(harmful) == 50 and len(harmless) == 50 and not set(harmful) & set(harmless)
    with pytest.raises(ValueError):
        load_requests("other")


def test_errors(planted_llama):
    m = planted_llama
    with pytest.raises(ValueError, match="no queries"):
        Ships().score(m, [], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        Sahara().score(m, queries(1), progress=False)
    with pytest.raises(ValueError, match="how"):
        Ships(how="scale").score(m, queries(2), progress=False)
    with pytest.raises(IndexError):
        Ships(layers=(7,)).score(m, queries(2), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        Ships().score(m, ["a harmful request"], progress=False)
    with pytest.raises(ValueError, match="allows at most"):
        Ships().score(m, [torch.ones(600, dtype=torch.long)], progress=False)
    # a system prompt has a place only in the chat template: refused, not dropped
    with pytest.raises(ValueError, match="system=.*template='chat'"):
        Ships(system="Be brief.").score(m, queries(2), progress=False)
    with pytest.raises(ValueError, match="no chat template"):
        Ships(system="Be brief.", template="chat").score(m, queries(2), progress=False)
    # the same for the ASR check, which used to drop it on a model without a chat template
    with pytest.raises(ValueError, match="no chat template"):
        attack_success_rate(m, ["a harmful request"], system="Be brief.", max_new_tokens=1)
    with pytest.raises(ValueError, match="system=.*template='chat'"):
        attack_success_rate(m, ["a harmful request"], template=None, system="Be brief.", max_new_tokens=1)


@pytest.mark.parametrize("how", ["uniform", "zero"])
def test_layer_screen_keeps_planted_layer(planted_llama, how, tmp_path):
    m = planted_llama
    r = Ships(how=how, n_queries=None, screen_layers=1).score(m, queries(), progress=False)
    assert r.extra["scored_layers"][:, 0].tolist() == [False, True, False]
    assert (r.scores[0] == 0).all() and (r.scores[2] == 0).all() and r.top(1)[0][:2] == PLANT
    assert int(r.extra["layer_screen"].argmax()) == PLANT[0]
    s = Sahara(how=how, n_queries=None, screen_layers=1, rounds=1).score(m, queries(), progress=False)
    assert s.extra["scored_layers"][:, 0].tolist() == [False, True, False] and s.greedy[0][0] == PLANT
    back = HeadScores.load(s.save(tmp_path / "sahara"))
    assert back.extra["greedy_heads"].tolist()[0] == list(PLANT) and back.method == "sahara"
    assert Ships.paper_config().screen_layers is None and Sahara.paper_config().candidates is None
    # the reference's get_ships feeds the raw request (SHIPS.main, use_tem=False): no template
    assert Ships.paper_config().template is None and Ships().template is None


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_ships_and_asr(smollm2):
    m = smollm2
    r = Ships(n_queries=2, layers=(15, 29), template="chat").score(m, progress=False)
    assert r.shape == (30, 9) and r.scores[[15, 29]].min() >= 0 and r.scores.max() > 1e-4
    assert (r.scores[:15] == 0).all() and r.extra["scored_layers"][[15, 29]].all()
    (l, h, s) = r.top(1)[0]
    # the same KL through the ordinary left-padded HookedModel path
    qs = r.queries
    texts = [m.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in qs]
    enc = m.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    p = torch.log_softmax(m(enc["input_ids"], attention_mask=enc["attention_mask"])[:, -1].double(), -1)
    with m.edit(hs.Ablate(l, h, how="uniform", eps=1e-4)):
        q = torch.log_softmax(m(enc["input_ids"], attention_mask=enc["attention_mask"])[:, -1].double(), -1)
    assert float(kl_smoothed(p, q).mean()) == pytest.approx(s, rel=2e-2, abs=1e-5)
    res = attack_success_rate(m, n=2, max_new_tokens=8, heads=[(l, h)])
    assert len(res["answers"]) == 2 and 0.0 <= res["asr"] <= 1.0
    assert all(isinstance(a, str) and a for a in res["answers"])


@pytest.mark.slow
@torch.no_grad()
def test_ships_default_prompt_is_the_raw_request(smollm2):
    """Zhou et al.'s reference (SafetyHeadAttribution ``SHIPS.main``) feeds ``get_ships`` the raw
    request, tokenized with the tokenizer's defaults (``tokenizer(input_text)``); ``use_tem=True``
    formats "## Query:{} \\n## Answer:" (a space before the newline). Ships' default used to be the
    chat template."""
    m, tok = smollm2, smollm2.tokenizer
    qs = load_requests("harmful")[:2]
    kw = dict(n_queries=2, layers=(29,))
    raw = Ships(**kw).score(m, progress=False)
    ids = [torch.tensor(tok(q)["input_ids"]) for q in qs]
    assert torch.equal(raw.scores, Ships(**kw).score(m, ids, progress=False).scores)
    assert raw.params["template_used"] == "none" and raw.scores[29].max() > 1e-4
    chat = Ships(**kw, template="chat").score(m, progress=False)
    assert not torch.allclose(chat.scores, raw.scores)
    assert SHIPS_TEMPLATE == "## Query:{q} \n## Answer:"
    tem = Ships(**kw, template=SHIPS_TEMPLATE).score(m, progress=False)
    ids = [torch.tensor(tok(f"## Query:{q} \n## Answer:")["input_ids"]) for q in qs]
    assert torch.equal(tem.scores, Ships(**kw).score(m, ids, progress=False).scores)
    # ships_of follows the same default
    torch.testing.assert_close(ships_of(m, [(29, 0), (29, 4)], n=2).mean(0), raw.scores[29, [0, 4]])


def _experiment(name):
    """An experiments/NAME.py script as a module (experiments/ is not part of the package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refusal_tuning_split_and_finetune():
    """The refusal test bed (experiments/refusal_tuning.py, split in heads/data.py): a seeded split
    with disjoint halves, and fine-tuning that lowers the answer-token loss (prompt tokens carry no loss)."""
    from headscope.heads.data import split_requests
    finetune = _experiment("refusal_tuning").finetune
    s = split_requests(seed=0, n_train=25)
    assert s == split_requests(seed=0, n_train=25) and s != split_requests(seed=1, n_train=25)
    for kind in ("harmful", "harmless"):
        assert len(s[f"{kind}_train"]) == 25 and not set(s[f"{kind}_train"]) & set(s[f"{kind}_test"])
    with pytest.raises(ValueError, match="n_train"):
        split_requests(n_train=0)
    m = hs.load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 128, (12,), generator=g), 8) for _ in range(4)]

    def answer_loss():
        with torch.no_grad():
            total = 0.0
            for ids, start in examples:
                logp = torch.log_softmax(m.model(input_ids=ids[None]).logits[0, :-1].float(), -1)
                total += -logp[start - 1:].gather(1, ids[start:, None]).mean().item()
            return total / len(examples)

    before = answer_loss()
    losses = finetune(m, examples, epochs=8, lr=3e-3, batch_size=2, progress=False)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert answer_loss() < 0.5 * before
    assert not m.model.training
