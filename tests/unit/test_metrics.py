import pytest

from tunesmith.evaluation.metrics import INVALID, classification_metrics, exact_match, parse_label

LABELS = ["spam", "ham"]


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
