import math

import pytest
from sacrebleu import corpus_bleu

from tunesmith.errors import DataError
from tunesmith.evaluation.metrics import (
    INVALID,
    bleu,
    bleu_from_statistics,
    bleu_statistics,
    classification_metrics,
    exact_match,
    generation_metrics,
    parse_label,
    perplexity,
    rouge_l_scores,
    token_accuracy_scores,
)

HYP, REF = "the cat sat on the mat", "the cat is on the mat"
LABELS = ["spam", "ham"]


def test_bleu_by_hand():
    # 1..4-gram matches 5/6, 3/5, 1/4, 0/3; sacrebleu's exp smoothing turns the 0/3 into
    # 1/(2*3); same length, so no brevity penalty
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu([HYP], [REF]) == pytest.approx(expected, abs=1e-6)
    assert bleu([REF], [REF]) == pytest.approx(100.0)


def test_bleu_brevity_penalty_by_hand():
    # hypothesis of 4 words for a reference of 6: all n-grams match, BP = exp(1 - 6/4)
    assert bleu(["the cat is on"], [REF]) == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-6)


def test_bleu_from_summed_statistics_is_corpus_bleu():
    hyps = [HYP, "a dog barks", "it is raining today", "hello"]
    refs = [REF, "the dog barks loudly", "it rains today", "hello there"]
    stats = bleu_statistics(hyps, refs)
    assert stats.shape == (4, 10)
    assert bleu_from_statistics(stats.sum(0)) == pytest.approx(
        corpus_bleu(hyps, [refs]).score, abs=1e-9)


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words on both sides
    assert rouge_l_scores([HYP], [REF])[0] == pytest.approx(5 / 6)
    # LCS "a c": precision 2/4, recall 2/3 -> F1 = 4/7
    assert rouge_l_scores(["a b c d"], ["a c e"])[0] == pytest.approx(4 / 7)


def test_token_accuracy_by_hand():
    scores = token_accuracy_scores(["Paris is big.", "a b", "", "x y z"],
                                   ["paris is large", "a b c", "", "y z"])
    assert scores.tolist() == pytest.approx([2 / 3, 2 / 3, 1.0, 0.0])


def test_generation_metrics_together():
    m = generation_metrics(["Paris.", "rome is nice"], ["paris", "Madrid is nice"])
    assert m["n"] == 2
    assert m["exact_match"] == 0.5
    assert m["token_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["rouge_l"] == pytest.approx((1 + 2 / 3) / 2)
    # case-sensitive like sacrebleu: "Paris" does not match "paris", and no 4-gram matches
    assert m["bleu"] == pytest.approx(corpus_bleu(["Paris.", "rome is nice"],
                                                  [["paris", "Madrid is nice"]]).score)


def test_empty_references_are_a_data_error():
    with pytest.raises(DataError, match="no reference answers"):
        generation_metrics([], [])
    with pytest.raises(DataError, match="empty"):
        generation_metrics(["a", "b"], ["a", "  "])
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        bleu(["a", "b"], ["a"])


def test_exact_match_keeps_its_old_behaviour():
    assert exact_match([], []) == {"n": 0, "exact_match": 0.0}


def test_perplexity():
    assert perplexity(3 * math.log(2), 3) == pytest.approx(2.0)
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(DataError, match="at least one scored token"):
        perplexity(1.0, 0)


@pytest.mark.parametrize("reply, label", [
    ("spam", "spam"), ("Ham.", "ham"), ("SPAM!", "spam"), ("spam - it offers a prize", "spam"),
    ("The spam message is a scam", "spam"), ("hamster", INVALID), ("spam or ham", INVALID),
    ("", INVALID), ("I'm sorry for your loss", INVALID),
])
def test_parse_label(reply, label):
    assert parse_label(reply, LABELS) == label


def test_classification_metrics_by_hand():
    expected = ["spam", "spam", "ham", "ham", "ham"]
    predicted = ["spam", INVALID, "ham", "spam", "ham"]
    m = classification_metrics(predicted, expected, LABELS, positive="spam")
    assert m["accuracy"] == pytest.approx(3 / 5)
    # spam: precision 1/2, recall 1/2 -> F1 1/2; ham: precision 2/2, recall 2/3 -> F1 0.8
    assert m["f1_spam"] == pytest.approx(0.5)
    assert m["per_class"]["ham"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx(0.65)
    assert m["invalid_rate"] == pytest.approx(0.2)


def test_exact_match():
    assert exact_match(["Paris.", "rome"], ["paris", "Madrid"])["exact_match"] == 0.5
