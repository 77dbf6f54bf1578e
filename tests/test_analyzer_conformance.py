"""Every registered analyzer follows the protocol (heads/base.py), in the manner of scikit-learn's
``parametrize_with_checks``: one parametrised test per entry of ``ANALYZERS``, on tiny-llama with a
small BPE tokenizer (vocabulary 128, trained here on the shipped texts, no chat template), each
analyzer built with ``quick()`` plus small overrides. Checked: shape [n_layers, n_heads], finite
scores, metadata (method, paper, JSON-able params and info, model info), a complete result (no
attribute added after construction), save/load round trip, determinism (same settings twice ->
the same scores). Base models without a chat template get the plain template of Zhou et al. 2025
and the result says so."""
import json

import pytest
import torch

import headscope as hs
from headscope.heads import ANALYZERS, HeadScores
from headscope.heads.common import PLAIN_TEMPLATE

pytestmark = pytest.mark.filterwarnings("ignore:retrieval. none of the")   # a random model fails the ROUGE gate

# tiny settings per analyzer, on top of quick(); an analyzer not listed here runs with quick() alone
TINY = {
    "sinks": dict(n_samples=3, n_tokens=24),
    "hidden_sinks": dict(n_samples=2, n_tokens=24),
    "induction": dict(block_len=12),
    "echo": dict(block_len=12),
    "previous_token": dict(n_samples=2, n_tokens=24),
    "duplicate_token": dict(n_samples=2, n_tokens=24),
    "retrieval": dict(lengths=(128,), depths=(50.0,), max_new_tokens=4),
    "streaming": dict(length=48, sink=4, recent=8),
    "duo": dict(steps=2, sink=4, recent=8, length_min=200, length_max=220, num_passkeys=1, passkey_length=2,
                n_samples=2),
    "ships": dict(n_queries=2),
    "sahara": dict(n_queries=3, candidates=2),
    "preplan": dict(max_new_tokens=14, fai_window=(2, 6), n_select_layers=1),
}


def _texts():
    from headscope.heads.data import (load_haystack, load_needles, load_reasoning_prompts, load_requests,
                                      natural_text_passages)
    return (natural_text_passages() + [load_haystack()] + load_requests("harmful") + load_requests("harmless")
            + load_reasoning_prompts() + [f"{n['needle']} {n['question']}" for n in load_needles()])


def tiny_tokenizer(chat_template: str | None = None):
    """A 128-token BPE (Metaspace, as SentencePiece) trained on the shipped texts: fits tiny-llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_texts(), trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"],
                                                          limit_alphabet=100, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def base_model():
    """tiny-llama with a tokenizer that has no chat template (a base model)."""
    m = hs.load("tiny-llama")
    m.tokenizer = tiny_tokenizer()
    assert len(m.tokenizer) <= m.cfg.vocab_size and not getattr(m.tokenizer, "chat_template", None)
    return m


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny models: per-op overhead dominates
    yield
    torch.set_num_threads(n)


def tiny(name):
    return ANALYZERS[name].quick(**TINY.get(name, {}))


@pytest.mark.parametrize("name", sorted(ANALYZERS))
def test_analyzer_conformance(name, base_model, tmp_path):
    cls = ANALYZERS[name]
    m = base_model
    assert cls.name == name and cls.paper and cls.description
    assert isinstance(cls.paper_config(), cls) and isinstance(cls.quick(), cls)
    assert "data" in (cls.score.__doc__ or "")                    # score documents its data type
    an = tiny(name)
    r = an.score(m, progress=False)
    # shape, values
    assert isinstance(r, HeadScores)
    assert r.shape == (m.cfg.n_layers, m.cfg.n_heads)
    assert torch.isfinite(r.scores).all()
    # metadata
    assert r.method == name and r.paper == cls.paper and r.description == cls.description
    assert r.model["name"] == "tiny-llama" and r.model["n_layers"] == m.cfg.n_layers
    assert r.model["n_heads"] == m.cfg.n_heads
    json.dumps(r.params, allow_nan=False)
    json.dumps(r.model, allow_nan=False)
    for k, v in an.params().items():
        assert k in r.params
    assert r.dataset and r.seconds >= 0
    # complete at construction: nothing but the dataclass fields on the instance
    assert set(vars(r)) == set(HeadScores.__dataclass_fields__)
    # save / load round trip
    path = r.save(tmp_path / name)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    back = HeadScores.load(path)
    assert torch.equal(back.scores, r.scores)
    assert set(back.extra) == set(r.extra)
    for k, v in r.extra.items():
        torch.testing.assert_close(back.extra[k], torch.as_tensor(v), rtol=0, atol=0, equal_nan=True, msg=k)
    for f in ("method", "paper", "dataset", "description", "threshold", "created", "seconds"):
        assert getattr(back, f) == getattr(r, f), f
    from headscope.heads.scores import dumps
    assert dumps(back.params) == dumps(r.params) and dumps(back.info) == dumps(r.info)
    assert back.model == json.loads(json.dumps(r.model))
    # determinism: the same settings give the same scores
    r2 = tiny(name).score(m, progress=False)
    assert torch.equal(r2.scores, r.scores)


def test_registry_is_complete():
    """Every analyzer file's analyzers are registered (a new one is then checked above)."""
    assert {"sinks", "hidden_sinks", "induction", "echo", "previous_token", "duplicate_token", "retrieval",
            "streaming", "duo", "ships", "sahara", "preplan"} <= set(ANALYZERS)


@pytest.mark.parametrize("name", ["ships", "sahara", "preplan", "retrieval"])
def test_template_recorded_base_and_chat(name, base_model):
    """Issue 8: a base model (no chat template) runs with the paper's plain template
    "## Query:{q}\\n## Answer:" (retrieval: the plain prompt) and the result says which; the same
    analyzer on a chat tokenizer says "chat". Ships feeds the raw request on both, as its reference
    (``get_ships``), and says "none"."""
    base = tiny(name).score(base_model, progress=False)
    want = {"retrieval": "plain", "ships": "none"}.get(name, PLAIN_TEMPLATE)   # Sahara: the plain template
    assert base.params["template_used"] == want
    chat = hs.load("tiny-llama")
    chat.tokenizer = tiny_tokenizer("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                                    "{% if add_generation_prompt %}<s>{% endif %}")
    r = tiny(name).score(chat, progress=False)
    assert r.params["template_used"] == {"sahara": PLAIN_TEMPLATE, "ships": "none"}.get(name, "chat")
    if name in ("ships", "sahara"):
        assert r.info["queries"] == base.info["queries"]


def test_ships_plain_template_prompt(base_model):
    """The plain template's text reaches the model: Ships(template="chat") on a base model scores prompts
    formatted "## Query:{q}\\n## Answer:" (the same scores as passing that template explicitly)."""
    from headscope.heads.safety import Ships
    auto = Ships(n_queries=2, template="chat").score(base_model, progress=False)
    explicit = Ships(n_queries=2, template=PLAIN_TEMPLATE).score(base_model, progress=False)
    assert torch.equal(auto.scores, explicit.scores)
    with pytest.raises(ValueError, match="chat template"):
        from headscope.heads.common import apply_template
        apply_template(base_model, ["x"], "chat")


def test_headscores_rejects_inf_and_writes_strict_json(tmp_path):
    """Issue 8: ±inf scores are refused with a message; non-finite metadata is written as strings,
    never as JSON's non-standard Infinity / NaN, and read back."""
    for bad in (float("inf"), float("-inf")):
        s = torch.zeros(2, 3)
        s[1, 2] = bad
        with pytest.raises(ValueError, match=r"infinite scores at \(layer, head\) \[\[1, 2\]\]"):
            HeadScores(scores=s, method="x")
    r = HeadScores(scores=torch.ones(2, 3), method="x", threshold=float("inf"),
                   params={"split_threshold": float("-inf"), "nested": [float("nan"), 1.0]})
    path = r.save(tmp_path / "x")
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = HeadScores.load(path)
    assert back.threshold == float("inf") and back.params["split_threshold"] == "-inf"
    with pytest.raises(ValueError, match="JSON-able"):
        HeadScores(scores=torch.ones(2, 3), method="x", info={"model": object()})


def test_info_is_saved_and_readable_as_attributes(tmp_path):
    r = HeadScores(scores=torch.ones(1, 2), method="x", info={"greedy": [((0, 1), 2.5)], "queries": ["q"]})
    assert r.greedy == [((0, 1), 2.5)] and r.queries == ["q"]
    with pytest.raises(AttributeError, match="no attribute or info entry 'nope'"):
        r.nope
    back = HeadScores.load(r.save(tmp_path / "x"))
    assert back.greedy == [[[0, 1], 2.5]] and back.queries == ["q"]
    p = r.save(tmp_path / "retrieval.v2")                                     # dots stay in the name
    assert p.name == "retrieval.v2.json" and (tmp_path / "retrieval.v2.safetensors").exists()
    assert HeadScores.load(tmp_path / "retrieval.v2").queries == ["q"]
