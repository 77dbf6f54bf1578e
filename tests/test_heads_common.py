"""The shared helpers of heads/common.py and heads/data.py: one way to draw random heads, to batch,
to reduce over KV groups, to template prompts; the ROUGE-1 gate against rouge-score's reference."""
import pytest
import torch

import headscope as hs
from headscope.heads.common import (PLAIN_TEMPLATE, apply_template, batches, expand_kv, kv_group_max,
                                    last_token_forward, random_heads, resolve_template, template_name)


def test_random_heads_seeded_in_layers_outside_exclude():
    a = random_heads(4, 3, 5, exclude=[(1, 0), (2, 2)], seed=7)
    assert a == random_heads(4, 3, 5, exclude=[(1, 0), (2, 2)], seed=7) and a == sorted(a)
    assert len(set(a)) == 5 and not {(1, 0), (2, 2)} & set(a)
    inner = random_heads(4, 3, 6, seed=0, layers=range(1, 3))
    assert sorted(inner) == [(l, h) for l in (1, 2) for h in range(3)]            # all of layers 1-2
    with pytest.raises(ValueError, match="cannot draw 7 random heads"):
        random_heads(4, 3, 7, layers=[1, 2])


def test_batches_in_order_or_by_key():
    assert batches(list("abcde"), 2) == [[0, 1], [2, 3], [4]]
    assert batches([5, 1, 4, 2], 2, key=lambda x: x) == [[1, 3], [2, 0]]
    assert batches([], 3) == [] and batches([1, 2], 0) == [[0], [1]]


def test_kv_group_max_and_expand():
    s = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.5, 4.0, 5.0]])     # [L=2, H=4], G=2
    kv = kv_group_max(s, 2)
    assert kv.tolist() == [[3.0, 2.0], [0.5, 5.0]]
    assert expand_kv(kv, 4).tolist() == [[3.0, 3.0, 2.0, 2.0], [0.5, 0.5, 5.0, 5.0]]


def test_last_token_forward_takes_each_rows_own_position():
    """Rows of a right-padded batch ending at different positions each get the log-probs and hidden
    state of their own last token, equal to a full forward's (transformers 5.17 read a [B, 1]
    logits_to_keep as positions for every row)."""
    m = hs.load("tiny-llama")
    toks = torch.randint(0, m.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    last = torch.tensor([8, 3, 5])
    logp, hidden = last_token_forward(m, toks, last)
    with torch.no_grad():
        full = m.model(input_ids=toks, output_hidden_states=True)
    rows = torch.arange(3)
    assert logp.shape == (3, m.cfg.d_vocab) and hidden.shape == (3, m.cfg.d_model)
    torch.testing.assert_close(logp, torch.log_softmax(full.logits[rows, last].double(), -1))
    torch.testing.assert_close(hidden, full.hidden_states[-1][rows, last].float())


def test_templates_on_a_model_without_tokenizer_chat_template():
    m = hs.load("tiny-llama")                     # no tokenizer at all: "chat" cannot be honoured
    assert resolve_template(m, "chat") == PLAIN_TEMPLATE and template_name(m, None) == "none"
    assert apply_template(m, ["hi"], PLAIN_TEMPLATE) == ["## Query:hi\n## Answer:"]
    with pytest.raises(ValueError, match="'\\{q\\}'"):
        apply_template(m, ["hi"], "no placeholder")


def test_rouge1_recall_matches_rouge_score_reference():
    """The retrieval gate is rouge-score's ROUGE-1 recall with the Porter stemmer, as in
    nightdessert/Retrieval_Head (``RougeScorer(['rouge1'], use_stemmer=True)``)."""
    from rouge_score import rouge_scorer

    from headscope.heads.retrieval import rouge1_recall
    ref = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    pairs = [("eat a sandwich and sit in Dolores Park", "eating sandwiches while sitting in dolores parks"),
             ("The secret ingredient is saffron.", "the ingredients: Saffron!"),
             ("relational databases", "relation database")]
    for a, b in pairs:
        assert rouge1_recall(a, b) == pytest.approx(ref.score(a, b)["rouge1"].recall)
    assert rouge1_recall("relational", "relation") == 1.0          # Porter: both stem to "relat"
    assert rouge1_recall("x y", [1, 2]) == 0.0                     # words never match token ids
