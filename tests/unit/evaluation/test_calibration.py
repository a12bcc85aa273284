import json

import numpy as np
import pytest

from tunesmith.errors import DataError, ModelError
from tunesmith.evaluation.calibration import (
    CALIBRATION_FILE,
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    load_calibration,
    reliability_bins,
    save_calibration,
)


def test_ece_by_hand():
    # two items at confidence 0.85 (one right), two at 0.65 (both right); 10 bins:
    # 2/4 * |0.5 - 0.85| + 2/4 * |1.0 - 0.65| = 0.175 + 0.175
    probs = np.array([[0.85, 0.15], [0.15, 0.85], [0.65, 0.35], [0.35, 0.65]])
    expected = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, expected, n_bins=10) == pytest.approx(0.35)
    bins = reliability_bins(probs, expected, n_bins=10)
    assert bins.count == [0, 0, 0, 0, 0, 0, 2, 0, 2, 0]
    assert bins.accuracy[8] == 0.5 and bins.confidence[6] == pytest.approx(0.65)
    assert bins.accuracy[0] is None  # empty bins hold no number (metrics.json has no NaN)


def test_a_confidence_on_a_bin_edge_goes_in_the_bin_it_closes():
    probs = np.array([[0.7, 0.3], [0.3, 0.7], [0.6, 0.4], [1.0, 0.0]])
    assert reliability_bins(probs, np.zeros(4, dtype=int), n_bins=10).count == [
        0, 0, 0, 0, 0, 1, 2, 0, 0, 1]


def test_ece_of_a_sure_and_right_model_is_zero():
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def toy(n, sharpness, seed):
    """Labels drawn from softmax(z): z is calibrated, sharpness * z over- or under-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 3))
    p = apply_temperature(z, 1.0)
    y = np.array([rng.choice(3, p=row) for row in p])
    return sharpness * z, y


def test_temperature_scaling_fixes_an_over_confident_classifier():
    valid_logits, valid_y = toy(3000, 4.0, seed=0)
    test_logits, test_y = toy(3000, 4.0, seed=1)
    result = calibrate(valid_logits, valid_y, test_logits, test_y)
    assert result.temperature == pytest.approx(4.0, rel=0.15)
    assert result.ece_before > 0.1
    assert result.ece_after < result.ece_before / 3
    assert result.nll_after < result.nll_before
    assert not result.at_bound
    json.dumps(result.to_dict())  # goes into metrics.json as it is


def test_an_under_confident_classifier_gets_sharpened():
    logits, y = toy(3000, 0.25, seed=2)
    assert fit_temperature(logits, y) == pytest.approx(0.25, rel=0.15)


def test_a_label_the_model_cannot_say_does_not_break_the_fit():
    logits = np.array([[0.0, -np.inf], [-0.1, -3.0], [-2.0, -0.2], [-0.3, -1.0]])
    t = fit_temperature(logits, np.array([0, 0, 1, 1]))
    assert 0.05 <= t <= 20


def test_save_and_load_beside_a_model(tmp_path):
    path = save_calibration(tmp_path, 2.5, labels=["spam", "ham"], details={"n_fit": 40})
    assert path.name == CALIBRATION_FILE
    loaded = load_calibration(tmp_path)
    assert loaded["temperature"] == 2.5 and loaded["labels"] == ["spam", "ham"]
    assert loaded["n_fit"] == 40
    assert load_calibration(tmp_path / "nowhere") is None


def test_bad_calibration_files(tmp_path):
    with pytest.raises(DataError, match="positive"):
        save_calibration(tmp_path, -1.0)
    (tmp_path / CALIBRATION_FILE).write_text('{"temperature": "warm"}')
    with pytest.raises(ModelError, match="not a calibration file"):
        load_calibration(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text('{"temperature": 0}')
    with pytest.raises(ModelError, match="not a positive number"):
        load_calibration(tmp_path)


def test_shapes_are_checked():
    with pytest.raises(DataError, match="scores"):
        expected_calibration_error(np.ones((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="class indices"):
        expected_calibration_error(np.ones((2, 2)) / 2, np.array([0, 2]))


def test_a_validation_set_without_errors_leaves_the_temperature_at_one():
    from tunesmith.evaluation.calibration import calibrate

    valid = np.array([[4.0, 0.0], [0.0, 4.0], [3.0, 0.0], [0.0, 5.0]])
    test = np.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    result = calibrate(valid, np.array([0, 1, 0, 1]), test, np.array([0, 1, 1]), n_bins=5)
    assert result.temperature == 1.0 and result.note and "correctly" in result.note
    assert result.ece_after == result.ece_before  # nothing was changed
