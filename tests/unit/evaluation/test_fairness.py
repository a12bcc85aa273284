import pytest

from tunesmith.errors import DataError
from tunesmith.evaluation.fairness import group_metrics


def test_per_group_metrics_by_hand():
    expected = ["spam", "ham", "spam", "ham", "spam", "ham", "ham"]
    predicted = ["spam", "ham", "ham", "ham", "spam", "spam", "spam"]
    groups = ["en", "en", "en", "en", "fr", "fr", "fr"]
    r = group_metrics(predicted, expected, groups, positive="spam", min_count=4)
    # en: 3 of 4 right; spam precision 1/1, recall 1/2 -> F1 2/3
    # fr: 1 of 3 right; spam precision 1/3, recall 1/1 -> F1 1/2
    assert r.by_group["en"] == {"accuracy": pytest.approx(0.75), "f1_spam": pytest.approx(2 / 3)}
    assert r.by_group["fr"] == {"accuracy": pytest.approx(1 / 3), "f1_spam": pytest.approx(0.5)}
    assert r.counts == {"en": 4, "fr": 3}
    assert r.gaps["accuracy"] == pytest.approx(0.75 - 1 / 3)
    assert r.gaps["f1_spam"] == pytest.approx(2 / 3 - 0.5)
    assert r.worst_group["accuracy"] == "fr" and r.best_group["accuracy"] == "en"
    assert r.small_groups == ["fr"]


def test_accuracy_only_without_a_positive_label():
    r = group_metrics(["a", "b"], ["a", "a"], ["x", "y"], min_count=1)
    assert r.metrics == ["accuracy"] and r.gaps == {"accuracy": 1.0}


def test_bad_group_input():
    with pytest.raises(DataError, match="one group value per test item"):
        group_metrics(["a"], ["a"], ["x", "y"])
    with pytest.raises(DataError, match="no group value"):
        group_metrics(["a", "a"], ["a", "a"], ["x", ""])
