import numpy as np
import pytest
from sacrebleu import corpus_bleu
from sklearn.metrics import f1_score

from tunesmith.errors import DataError
from tunesmith.evaluation.metrics import INVALID, classification_metrics
from tunesmith.evaluation.stats import (
    compare_classification,
    compare_generation,
    confusion_statistics,
    macro_f1_statistic,
    paired_bootstrap,
    relative_error_reduction,
    resample_counts,
)


def test_identical_models_differ_by_exactly_zero():
    scores = np.array([1, 0, 1, 1, 0, 1], dtype=float)
    c = paired_bootstrap(scores, scores, metric="accuracy")
    assert (c.difference, c.ci_low, c.ci_high) == (0.0, 0.0, 0.0)
    assert c.p_not_better == 1.0
    assert c.relative_error_reduction == 0.0


def test_always_better_has_a_degenerate_interval():
    c = paired_bootstrap(np.zeros(50), np.ones(50))
    assert (c.difference, c.ci_low, c.ci_high, c.p_not_better) == (1.0, 1.0, 1.0, 0.0)
    assert c.relative_error_reduction == 1.0


def test_relative_error_reduction_by_hand():
    assert relative_error_reduction(0.8, 0.9) == pytest.approx(0.5)
    assert relative_error_reduction(0.9, 0.8) == pytest.approx(-1.0)
    assert relative_error_reduction(1.0, 0.9) is None
    assert relative_error_reduction(60.0, 80.0, perfect=100.0) == pytest.approx(0.5)


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    n = 400
    base = (rng.random(n) < 0.70).astype(float)
    tuned = np.where(rng.random(n) < 0.3, 1.0, base)  # tuned fixes ~30% of base's errors
    c = paired_bootstrap(base, tuned, n_resamples=2000, seed=3)
    d = tuned - base
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert c.difference == pytest.approx(d.mean())
    assert c.ci_low < c.difference < c.ci_high
    assert (c.ci_high - c.ci_low) == pytest.approx(2 * half, rel=0.15)
    assert c.p_not_better < 0.01


def test_seeded_and_reproducible():
    rng = np.random.default_rng(0)
    a, b = rng.random(100), rng.random(100)
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    assert paired_bootstrap(a, b, seed=5).ci_low != paired_bootstrap(a, b, seed=6).ci_low


def test_resample_counts_rows_sum_to_n():
    counts = resample_counts(7, 30, np.random.default_rng(0))
    assert counts.shape == (30, 7) and (counts.sum(1) == 7).all()


def test_f1_is_recomputed_exactly_on_a_resample():
    expected = ["spam", "spam", "ham", "ham", "ham", "spam"]
    predicted = ["spam", INVALID, "ham", "spam", "ham", "ham"]
    stats = confusion_statistics(predicted, expected, ["spam", "ham"])
    counts = np.array([[2, 0, 1, 3, 0, 0]])
    sample_e = np.repeat(expected, counts[0])
    sample_p = np.repeat(predicted, counts[0])
    want = f1_score(sample_e, sample_p, labels=["spam", "ham"], average="macro", zero_division=0)
    assert macro_f1_statistic(2)(counts @ stats, 6)[0] == pytest.approx(want)


def test_compare_classification_point_estimates_are_the_metrics():
    expected = ["spam", "spam", "ham", "ham", "ham"]
    base = ["ham", "ham", "ham", "ham", "spam"]
    tuned = ["spam", INVALID, "ham", "spam", "ham"]
    out = compare_classification(base, tuned, expected, ["spam", "ham"], positive="spam")
    for name, preds in (("base", base), ("tuned", tuned)):
        m = classification_metrics(preds, expected, ["spam", "ham"], "spam")
        for key in ("accuracy", "macro_f1", "f1_spam"):
            assert getattr(out[key], name) == pytest.approx(m[key])
    assert out["accuracy"].difference == pytest.approx(0.6 - 0.4)
    assert out["accuracy"].ci_low <= out["accuracy"].difference <= out["accuracy"].ci_high


def test_compare_generation_bleu_is_corpus_bleu():
    refs = ["the cat is on the mat", "a dog barks loudly", "it rains today"]
    base = ["a cat", "dog", "rain"]
    tuned = ["the cat sat on the mat", "a dog barks", "it rains today"]
    out = compare_generation(base, tuned, refs, n_resamples=200)
    assert out["bleu"].tuned == pytest.approx(corpus_bleu(tuned, [refs]).score)
    assert out["bleu"].base == pytest.approx(corpus_bleu(base, [refs]).score)
    assert out["exact_match"].difference == pytest.approx(1 / 3)
    assert list(out) == ["exact_match", "bleu", "rouge_l", "token_accuracy"]


def test_bad_inputs():
    with pytest.raises(DataError, match="same test items"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(DataError, match="empty"):
        paired_bootstrap(np.ones(0), np.ones(0))
    with pytest.raises(DataError, match="positive label 'x'"):
        compare_classification(["a"], ["a"], ["a"], ["a", "b"], positive="x")
