"""Retrieval heads (Wu et al. 2024): planted copy heads on a tiny model, the pieces of the score,
the masking experiment, and a short real needle test on SmolLM2."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import headscope as hs
from headscope.heads import ANALYZERS
from headscope.heads.retrieval import (QUESTION, NeedleTest, Retrieval, decode, find_needle_span, load_haystack,
                                       load_needles, masking_experiment, random_heads, retrieval_step_scores,
                                       rouge1_recall, stop_ids)

EOS = 2                     # tiny-llama's generation-config EOS
COPY, OFF_BY_ONE, BOS_HEAD = (1, 2), (1, 0), (2, 1)


# ------------------------------------------------------------------------------- pieces
def test_rouge1_recall():
    assert rouge1_recall("eat a sandwich", "I would EAT a sandwich!") == 1.0
    assert rouge1_recall("eat a sandwich and sit", "eat a cake") == pytest.approx(2 / 5)
    assert rouge1_recall("a a b", "a b") == pytest.approx(2 / 3)          # clipped counts
    assert rouge1_recall("sitting in parks", "sits in the park") == 1.0     # stemmed
    assert rouge1_recall("sitting in parks", "sits in the park", stem=False) == pytest.approx(1 / 3)
    assert rouge1_recall([5, 6, 7, 8], [1, 5, 6]) == 0.5                   # token ids
    assert rouge1_recall("", "anything") == 0.0


def test_find_needle_span():
    prompt = [1, 9, 9, 4, 5, 6, 7, 8, 9, 4, 5, 6, 7]
    assert find_needle_span(prompt, [4, 5, 6, 7]) == (3, 7)                 # first window wins
    # 10 distinct answer tokens: one mismatch leaves 90%, not > 90%; 11 with one mismatch pass
    ans = list(range(20, 30))
    assert find_needle_span([0] + [99] + ans[1:] + [0], ans) == (-1, -1)
    ans11 = list(range(20, 31))
    assert find_needle_span([0, 99] + ans11[1:] + [0], ans11) == (1, 12)


def test_step_scores_count_only_copies_of_the_generated_token():
    seq = torch.tensor([0, 10, 11, 12, 13, 0, 0, 11, 12])        # span (1, 5), new = [11, 12] at 7, 8
    new = torch.tensor([11, 12])
    am = torch.tensor([[[2, 3],       # copies 11 then 12: 2 / 4
                        [1, 2],       # in span, off by one: 0
                        [0, 0],       # BOS: 0
                        [2, 0]]])     # one copy: 1 / 4
    s = retrieval_step_scores(am, seq, new, (1, 5))
    assert s.tolist() == [[0.5, 0.0, 0.0, 0.25]]


def test_shipped_data():
    text = load_haystack()
    assert 50_000 < len(text) < 300_000 and "Bennet" in text
    needles = load_needles()
    assert len(needles) >= 3
    for nd in needles:
        assert nd["answer"] in nd["needle"]
    assert "Dolores Park" in needles[0]["needle"]


def test_registered():
    assert ANALYZERS["retrieval"] is Retrieval
    assert Retrieval.threshold == 0.1
    p = Retrieval.paper_config()
    assert p.lengths is None and len(p.depths) == 10 and p.max_new_tokens == 50


def test_paper_grid_is_the_reference_grid():
    """Wu et al. 2024's reference (nightdessert/Retrieval_Head) takes context lengths
    np.round(np.linspace(1000, max, 20)) and trims each haystack + needle to length - 200
    (``final_context_length_buffer``): 800 .. max - 200 tokens, not 1000 .. max - 200."""
    import numpy as np
    from types import SimpleNamespace
    m = SimpleNamespace(cfg=SimpleNamespace(max_ctx=8192))
    want = (np.round(np.linspace(1000, 8192, 20)).astype(int) - 200).tolist()
    assert Retrieval.paper_config().grid_lengths(m) == want
    assert want[0] == 800 and want[-1] == 7992
    tiny = SimpleNamespace(cfg=SimpleNamespace(max_ctx=512))        # shorter than 1000: one length
    assert Retrieval.paper_config().grid_lengths(tiny) == [312]
    assert Retrieval(lengths=(300, 500)).grid_lengths(m) == [300, 500]


# ------------------------------------------------------------------------------- planted copy head
def _needle_tests():
    g = torch.Generator().manual_seed(0)
    answer = list(range(101, 109))                               # 8 distinct tokens
    tests, forced = [], {}
    for i, (n, depth) in enumerate([(40, 20), (60, 50)]):
        hay = torch.randint(10, 100, (n,), generator=g).tolist()
        p = int(n * depth / 100)
        q = torch.randint(10, 100, (6,), generator=g).tolist()
        prompt = torch.tensor([1] + hay[:p] + answer + hay[p:] + q)
        span = find_needle_span(prompt, answer)
        assert span == (1 + p, 1 + p + len(answer))
        tests.append(NeedleTest(prompt, span, answer, n, float(depth), 0))
        forced[tuple(prompt.tolist())] = answer + [EOS]
    # a failed test: the "model" answers garbage, so the ROUGE gate drops it
    bad = tests[0].prompt.clone()
    bad[-1] = 42
    tests.append(NeedleTest(bad, tests[0].span, answer, 40, 99.0, 0))
    forced[tuple(bad.tolist())] = [50] * 8 + [EOS]
    return tests, forced


class _Script(LogitsProcessor):
    """Row b of the batch emits scripts[b][i] at decode step i (the last entry once the script ends)."""

    def __init__(self, scripts, n_prompt):
        self.scripts, self.n = scripts, n_prompt

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.n
        out = torch.full_like(scores, -1e9)
        for b, seq in enumerate(self.scripts):
            out[b, seq[min(step, len(seq) - 1)]] = 0.0
        return out


class _Force(LogitsProcessor):
    """Makes the model emit a fixed answer per prompt (the planted 'model behaviour')."""

    def __init__(self, forced, n_prompt):
        self.forced, self.n = forced, n_prompt

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -1e9)
        for b in range(input_ids.shape[0]):
            key = tuple(input_ids[b, :self.n[b]].tolist())
            seq = self.forced[key]
            out[b, seq[min(input_ids.shape[1] - self.n[b], len(seq) - 1)]] = 0.0
        return out


def _plant(tests):
    """Score hook on layers 1 and 2: at decode step i (query position N-1+i) head COPY looks at the
    needle token being generated (span start + i), OFF_BY_ONE at the one before, BOS_HEAD at 0."""
    spans = {t.prompt.numel(): t.span for t in tests}

    def make(layer):
        def fn(s, hook):
            B, H, Q, K = s.shape
            if Q != 1:                                           # the prefill is left alone
                return None
            t = K - 1                                            # batch 1, no padding: cache index = position
            n_prompt = max(n for n in spans if n <= t + 1)
            i = t - (n_prompt - 1)                               # decode step
            a, b = spans[n_prompt]
            targets = {COPY: a + i if a + i < b else 0, OFF_BY_ONE: a + i - 1, BOS_HEAD: 0}
            s = s.clone()
            for (l, h), tgt in targets.items():
                if l == layer:
                    s[:, h, 0, :] = -1e4
                    s[:, h, 0, tgt] = 1e4
            return s
        return fn
    return [(f"blocks.{l}.attn.hook_attn_scores", make(l)) for l in (1, 2)]


@pytest.fixture(scope="module")
def planted():
    m = hs.load("tiny-llama")
    tests, forced = _needle_tests()
    lens = {tuple(t.prompt.tolist()): t.prompt.numel() for t in tests}

    class F(_Force):
        def __call__(self, input_ids, scores):
            self.n = [max(n for k, n in lens.items() if tuple(input_ids[b, :n].tolist()) == k)
                      for b in range(input_ids.shape[0])]
            return super().__call__(input_ids, scores)

    an = Retrieval(max_new_tokens=10, batch_size=1,
                   generate_kwargs={"logits_processor": LogitsProcessorList([F(forced, None)])})
    with m.hooks(_plant(tests)):
        res = an.score(m, data=tests, progress=False)
    return m, tests, an, res


def test_planted_copy_head_is_the_only_retrieval_head(planted):
    m, tests, an, res = planted
    assert res.extra["test_counted"].tolist() == [1, 1, 0]              # the garbage answer is gated out
    assert res.extra["test_recall"].tolist() == [1.0, 1.0, 0.0]
    assert res.scores[COPY] == pytest.approx(1.0)                       # every answer token copied: 8 x 1/8
    assert res.scores[OFF_BY_ONE] == 0.0 and res.scores[BOS_HEAD] == 0.0
    found = {(l, h) for l, h in torch.nonzero(res.classify()).tolist()}
    assert found == {COPY}
    assert res.top(1)[0][:2] == COPY
    assert res.extra["test_scores"].shape == (3, 3, 4)
    # the failed test: the head still looks at the needle, but no generated token equals the token there
    assert res.extra["test_scores"][2][COPY] == 0.0
    assert res.extra["grid_scores"].shape[-2:] == (3, 4)
    # no tokenizer, so no newline token: like the reference, decoding runs through EOS to the last step
    assert res.info["outputs"][0] == list(range(101, 109)) + [EOS, EOS]


def test_stop_at_eos_keeps_the_earlier_rule(planted):
    """``stop_at_eos=True`` stops at the generation config's EOS (headscope's earlier rule); the copy
    scores are the same, as the steps after EOS copy nothing here."""
    m, tests, an, res = planted
    old = Retrieval(max_new_tokens=10, batch_size=1, stop_at_eos=True, generate_kwargs=an.generate_kwargs)
    with m.hooks(_plant(tests)):
        r = old.score(m, data=tests, progress=False)
    assert r.info["outputs"][0] == list(range(101, 109)) + [EOS]
    assert torch.equal(r.scores, res.scores)
    assert r.params["stop_token_ids"] == [EOS] and res.params["stop_token_ids"] == []


def test_empty_stop_list_decodes_every_step():
    """``decode(stop_ids=[])`` decodes all steps: the generation config's EOS (tiny-llama: 2) does not
    end it either (it used to stop after the first EOS)."""
    m = hs.load("tiny-llama")
    prompt = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(4))
    always_eos = LogitsProcessorList([_Script([[EOS]], n_prompt=12)])
    new, am = decode(m, prompt, 4, stop_ids=[], record=True, logits_processor=always_eos)
    assert new.tolist() == [EOS] * 4 and am.shape == (3, 4, 4)


def test_masking_experiment_structure(planted):
    m, tests, an, res = planted
    with m.hooks(_plant(tests)):
        r = masking_experiment(m, res, k=1, n_random=2, seed=3, data=tests[:1], analyzer=an, progress=False)
    assert r["top_heads"] == [COPY]
    assert all(COPY not in d for d in r["random_heads"])
    assert r["baseline"] == 1.0 and r["top_k"] == 1.0                   # the answers are forced here
    assert r["random_heads"][0] == random_heads(3, 4, 1, [COPY], seed=3)     # seeded, reproducible
    with pytest.raises(ValueError):
        random_heads(3, 4, 12, [COPY])


def test_uniform_masking_applies_to_decode_steps():
    """Ablate(how='uniform') during decoding flattens the head: its top-1 key is then the first
    visible key (ties go to the first), on every decode step."""
    m = hs.load("tiny-llama")
    prompt = torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(1))
    new, am = decode(m, prompt, 5, stop_ids=[], record=True, edits=[hs.Ablate(1, 2, how="uniform", eps=0.0)],
                     min_new_tokens=5)
    assert am.shape == (3, 4, 5)
    assert (am[1, 2] == 0).all()
    new2, am2 = decode(m, prompt, 5, stop_ids=[], record=True, min_new_tokens=5)
    assert not (am2[1, 2] == 0).all()


def test_batched_decoding_matches_one_by_one():
    m = hs.load("tiny-llama")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (17, 31)]
    batched = decode(m, prompts, 6, stop_ids=[], record=True, min_new_tokens=6)
    for p, (new, am) in zip(prompts, batched):
        new1, am1 = decode(m, p, 6, stop_ids=[], record=True, min_new_tokens=6)
        assert torch.equal(new, new1)
        assert torch.equal(am, am1)                                     # positions, not padded indices


def test_bad_input():
    m = hs.load("tiny-llama")
    with pytest.raises(ValueError, match="no tokenizer"):
        Retrieval().score(m, progress=False)
    long = NeedleTest(torch.zeros(600, dtype=torch.long), (1, 3), [0, 0], 600, 0.0, 0)
    with pytest.raises(ValueError, match="context"):
        Retrieval().score(m, data=[long], progress=False)
    with pytest.raises(ValueError):
        masking_experiment(m, torch.zeros(3, 4), k=0, data=[long])


# ------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_needle_placement(smollm2):
    from headscope.heads.retrieval import _Builder
    b = _Builder(smollm2, "One two three. Four five six. Seven eight.", chat=None)
    assert b.chat                                                      # SmolLM2 has a chat template
    text = b.context("The needle is here.", 40, 50.0)                  # longer than the haystack: repeated
    assert text.count("One two three.") >= 3
    assert "six. The needle is here. Seven" in text or "three. The needle is here. Four" in text
    assert b.context("The needle is here.", 12, 0.0).startswith(" The needle is here.")
    assert b.context("The needle is here.", 12, 100.0).endswith("The needle is here.")
    tests = Retrieval(lengths=(60,), depths=(50.0,)).tests(smollm2)
    t = tests[0]
    span_text = smollm2.tokenizer.decode(t.prompt[t.span[0]:t.span[1]])
    assert "sandwich and sit in Dolores Park" in span_text


@pytest.mark.slow
def test_smollm2_needle(smollm2):
    an = Retrieval(lengths=(150,), depths=(50.0,), max_new_tokens=24)
    res = an.score(smollm2, progress=False)
    assert res.extra["test_recall"][0] > 0.5, res.info["outputs"]     # SmolLM2 finds the needle here
    assert res.scores.shape == (30, 9)
    assert res.scores.max() > 0.5                                      # some head copies most of it
    top_layer = res.top(1)[0][0]
    assert 10 <= top_layer <= 26                                       # middle/late layers, not the first ones
    assert float((res.scores == 0).float().mean()) > 0.5               # most heads never copy


@pytest.mark.slow
def test_span_overlap_reaches_the_needle_search(smollm2, monkeypatch):
    """``Retrieval(span_overlap=...)`` is the overlap the needle-span search uses (it used to be dropped)."""
    import headscope.heads.retrieval as R
    seen = []
    real = R.find_needle_span

    def spy(prompt_ids, answer_ids, overlap=0.9):
        seen.append(overlap)
        return real(prompt_ids, answer_ids, overlap)
    monkeypatch.setattr(R, "find_needle_span", spy)
    tests = Retrieval(lengths=(200,), depths=(50.0,), span_overlap=0.75).tests(smollm2)
    assert len(tests) == 1 and seen and set(seen) == {0.75}


@pytest.mark.slow
def test_plain_prompt_is_the_reference_text(smollm2):
    """Without a chat template the reference (Retrieval_Head ``evaluate_and_log``) tokenizes
    context + "Based on the content of the book, ..." (no newline between them) with the tokenizer's
    default special tokens. SmolLM2's tokenizer adds no BOS, so the prompt has none; headscope used to
    insert "\\n" and prepend a BOS through ``to_tokens``."""
    from headscope.heads.retrieval import _Builder
    tok = smollm2.tokenizer
    assert QUESTION == "Based on the content of the book, Question: {q}\nAnswer:"
    b = _Builder(smollm2, "One two three. Four five six.", chat=False)
    want = tok("Some context.Based on the content of the book, Question: Where?\nAnswer:")["input_ids"]
    assert b.prompt("Some context.", "Where?").tolist() == want
    assert want[0] != tok.bos_token_id
    an = Retrieval(chat=False, lengths=(60,), depths=(100.0,))
    t = an.tests(smollm2)[0]
    text = tok.decode(t.prompt)
    assert text.endswith("sunny day.Based on the content of the book, Question: "
                         "What is the best thing to do in San Francisco?\nAnswer:"), text[-160:]
    assert t.prompt.tolist() == tok(text)["input_ids"] and int(t.prompt[0]) != tok.bos_token_id
    assert an.template_used(smollm2) == "plain"


def _scripted_tests(tok, n=12):
    g = torch.Generator().manual_seed(5)
    return [NeedleTest(torch.randint(1000, 5000, (n,), generator=g), (2, 5), ans) for ans in ("Paris is nice", "Rome")]


@pytest.mark.slow
def test_decoding_stops_at_the_newline_only(smollm2):
    """The reference decodes until the newline token and otherwise all its steps, through EOS
    (Retrieval_Head ``decode``: break on the newline token only). Row 0 emits <|im_end|> (SmolLM2's
    EOS) and a blank-line token before its newline and goes on; row 1 stops at once, and waiting in
    the batch does not change row 0. ``stop_at_eos=True`` is the earlier rule (stop at EOS)."""
    tok = smollm2.tokenizer
    w = {s: tok.encode(s, add_special_tokens=False) for s in (" Paris", " is", " nice", "\n", "\n\n", "Rome")}
    assert all(len(v) == 1 for v in w.values())
    w = {s: v[0] for s, v in w.items()}
    eos, nl = tok.eos_token_id, w["\n"]
    assert stop_ids(smollm2) == [nl] and eos in stop_ids(smollm2, at_eos=True)
    scripts = [[w[" Paris"], eos, w[" is"], w["\n\n"], w[" nice"], nl, w[" is"], w[" is"]],
               [w["Rome"], nl, w[" is"]]]
    tests = _scripted_tests(tok)
    force = LogitsProcessorList([_Script(scripts, n_prompt=12)])
    got = decode(smollm2, [t.prompt for t in tests], 8, stop_ids=stop_ids(smollm2), record=True,
                 logits_processor=force)
    assert got[0][0].tolist() == scripts[0][:6] and got[1][0].tolist() == scripts[1][:2]
    assert got[0][1].shape == (30, 9, 6) and got[1][1].shape == (30, 9, 2)
    alone = decode(smollm2, tests[0].prompt, 8, record=True, logits_processor=LogitsProcessorList(
        [_Script(scripts[:1], n_prompt=12)]))
    assert torch.equal(alone[0], got[0][0]) and torch.equal(alone[1], got[0][1])
    res = Retrieval(max_new_tokens=8, batch_size=2, generate_kwargs={"logits_processor": force}).score(
        smollm2, data=tests, progress=False)
    assert res.info["outputs"] == ["Paris is\n\n nice", "Rome"]
    assert res.extra["test_recall"].tolist() == [1.0, 1.0]
    old = Retrieval(max_new_tokens=8, batch_size=2, stop_at_eos=True, generate_kwargs={"logits_processor": force})
    assert old.score(smollm2, data=tests, progress=False).info["outputs"] == ["Paris", "Rome"]
