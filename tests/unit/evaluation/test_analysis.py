import numpy as np
import pytest

from tunesmith.errors import DataError
from tunesmith.evaluation.analysis import most_confident_errors, prompt_text
from tunesmith.evaluation.metrics import INVALID

LABELS = ["good", "bad"]
PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.05, 0.95], [0.7, 0.3]])
EXPECTED = ["good", "good", "bad", "good", "good"]
INPUTS = ["a", "b", "c", "d", "e"]


def test_most_confident_wrong_first():
    errs = most_confident_errors(PROBS, LABELS, EXPECTED, INPUTS, n=2)
    assert [e["index"] for e in errs] == [3, 1]
    assert errs[0] == {"index": 3, "input": "d", "expected": "good", "predicted": "bad",
                       "confidence": pytest.approx(0.95), "p_expected": pytest.approx(0.05)}


def test_generated_answers_can_be_ranked_and_invalid_ones_are_left_out():
    predicted = ["bad", INVALID, "good", "good", "good"]
    errs = most_confident_errors(PROBS, LABELS, EXPECTED, INPUTS, predicted=predicted)
    assert [(e["index"], e["confidence"]) for e in errs] == [(2, 0.6), (0, pytest.approx(0.1))]


def test_shapes_must_match():
    with pytest.raises(DataError, match="must match"):
        most_confident_errors(PROBS, LABELS, EXPECTED[:3], INPUTS)


def test_prompt_text_is_the_last_user_turn_shortened():
    msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "one\n two " * 50}]
    text = prompt_text(msgs, limit=20)
    assert text.startswith("one two one") and len(text) == 20 and text.endswith("…")
