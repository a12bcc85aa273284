"""Calibration: does a confidence of 0.9 mean right 9 times in 10?

Expected calibration error (ECE) uses the top-label confidence (the probability of the
predicted class) in ``n_bins`` equal-width bins: bin b holds confidences in (b/M, (b+1)/M]
(bin 0 also takes exactly 0), and ECE = sum over bins of (items in bin / n) * |accuracy in bin -
mean confidence in bin|. It depends on the bin count, and on small test sets it is noisy and
biased upward; compare models with the same bins on the same items.

Temperature scaling (Guo et al. 2017) divides the logits by one number T > 0 fitted on the
validation set by minimising negative log-likelihood: T > 1 softens an over-confident model, T
< 1 sharpens an under-confident one, and the predicted class never changes. Logits here can be
any per-class scores whose softmax is the model's probability, e.g. the summed label
log-probabilities of ``scoring.label_probabilities`` or a classification head's logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from tunesmith.errors import DataError, ModelError

CALIBRATION_FILE = "calibration.json"
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width confidence bin: item count, mean confidence and accuracy (None if empty)."""

    edges: list[float]
    count: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]

    def to_dict(self) -> dict:
        return asdict(self)


def _check(scores: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=float), np.asarray(expected, dtype=int)
    if s.ndim != 2 or s.shape[0] != y.shape[0] or s.shape[0] == 0:
        raise DataError(f"calibration needs [n, classes] scores and n expected class indices "
                        f"(n > 0); got scores {s.shape} and {y.shape[0]} labels")
    if y.min() < 0 or y.max() >= s.shape[1]:
        raise DataError(f"expected class indices must be in 0..{s.shape[1] - 1}; map each "
                        "expected label to its position in the label list first")
    return s, y


def reliability_bins(probs: np.ndarray, expected: np.ndarray, *, n_bins: int = 15
                     ) -> ReliabilityBins:
    """Top-label confidence vs accuracy in ``n_bins`` equal-width bins over [0, 1]."""
    p, y = _check(probs, expected)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    # against the edges themselves, so a confidence on an edge lands in the bin it closes
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    # None, not NaN, for empty bins: the bins go into metrics.json, and NaN is not JSON
    return ReliabilityBins(
        edges=edges.tolist(), count=count.tolist(),
        confidence=[float(c / k) if k else None for c, k in zip(conf_sum, count, strict=True)],
        accuracy=[float(h / k) if k else None for h, k in zip(hit_sum, count, strict=True)])


def expected_calibration_error(probs: np.ndarray, expected: np.ndarray, *,
                               n_bins: int = 15) -> float:
    """ECE of class probabilities [n, k] against expected class indices [n] (see module doc)."""
    bins = reliability_bins(probs, expected, n_bins=n_bins)
    n = sum(bins.count)
    return float(sum(c / n * abs(a - m) for c, a, m in
                     zip(bins.count, bins.accuracy, bins.confidence, strict=True) if c))


def negative_log_likelihood(logits: np.ndarray, expected: np.ndarray, *,
                            temperature: float = 1.0) -> float:
    """Mean NLL of the expected classes under softmax(logits / temperature)."""
    s, y = _check(logits, expected)
    return float(-log_softmax(s / temperature, axis=1)[np.arange(len(y)), y].mean())


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities softmax(logits / T)."""
    return np.exp(log_softmax(np.asarray(logits, dtype=float) / temperature, axis=1))


def fit_temperature(logits: np.ndarray, expected: np.ndarray, *,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T in ``bounds`` minimising validation NLL of softmax(logits / T).

    Searched over log T (bounded Brent), where the NLL is smooth and the bounds are symmetric.
    A validation set the model gets all right pushes T to the lower bound (sharper is always
    better there), so a T at a bound is a sign to use more validation data.
    """
    s, y = _check(logits, expected)
    finite = np.isfinite(s)
    if not finite.any():
        raise DataError("the validation logits are all infinite or NaN; the model's scores "
                        "cannot be calibrated")
    # a label the model cannot produce (log-prob -inf) stays all but impossible at any T
    s = np.where(finite, s, s[finite].min() - 1e4)
    res = minimize_scalar(lambda log_t: negative_log_likelihood(s, y, temperature=math.exp(log_t)),
                          bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(math.exp(res.x))


@dataclass(frozen=True)
class CalibrationResult:
    """Temperature fitted on validation, and test ECE/NLL before and after applying it."""

    temperature: float
    at_bound: bool
    n_fit: int
    n_test: int
    n_bins: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    reliability_before: ReliabilityBins
    reliability_after: ReliabilityBins
    note: str | None = None  # why T was left at 1, when it was

    def to_dict(self) -> dict:
        return asdict(self)


def _usable_temperature(valid_logits: np.ndarray, valid_expected: np.ndarray
                        ) -> tuple[float, bool, str | None]:
    """(T, at_bound, note): the fitted T, or 1 with the reason when no fit can be trusted.

    A model that gets every validation item right has nothing to be calibrated against: the
    NLL keeps falling as T -> 0, and such a T makes every later mistake a confident one.
    """
    s, y = _check(valid_logits, valid_expected)
    if (s.argmax(axis=1) == y).all():
        return 1.0, False, (f"the model answers all {len(y)} validation items correctly, so no "
                            "temperature can be estimated from them; T stays 1. A larger or "
                            "harder validation set would allow calibration")
    t = fit_temperature(s, y)
    low, high = TEMPERATURE_BOUNDS
    if t < low * 1.01 or t > high * 0.99:
        return 1.0, True, (f"the fitted temperature {t:.3g} is at its bound, so the validation "
                           "set is too small or too easy to calibrate on; T stays 1")
    return t, False, None


def calibrate(valid_logits: np.ndarray, valid_expected: np.ndarray, test_logits: np.ndarray,
              test_expected: np.ndarray, *, n_bins: int = 15) -> CalibrationResult:
    """Fit T on the validation items, then measure the test items with T = 1 and with T."""
    t, at_bound, note = _usable_temperature(valid_logits, valid_expected)
    before = apply_temperature(test_logits, 1.0)
    after = apply_temperature(test_logits, t)
    return CalibrationResult(
        temperature=t, at_bound=at_bound, note=note,
        n_fit=len(valid_expected), n_test=len(test_expected), n_bins=n_bins,
        ece_before=expected_calibration_error(before, test_expected, n_bins=n_bins),
        ece_after=expected_calibration_error(after, test_expected, n_bins=n_bins),
        nll_before=negative_log_likelihood(test_logits, test_expected),
        nll_after=negative_log_likelihood(test_logits, test_expected, temperature=t),
        reliability_before=reliability_bins(before, test_expected, n_bins=n_bins),
        reliability_after=reliability_bins(after, test_expected, n_bins=n_bins))


def save_calibration(model_dir: Path, temperature: float, *, labels: list[str] | None = None,
                     details: dict[str, Any] | None = None) -> Path:
    """Write ``calibration.json`` beside a model: the temperature, and what it was fitted on."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise DataError(f"a temperature must be a positive number, not {temperature}")
    path = Path(model_dir) / CALIBRATION_FILE
    payload = {"method": "temperature_scaling", "temperature": temperature, "labels": labels,
               **(details or {})}
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return path


def load_calibration(model_dir: Path) -> dict[str, Any] | None:
    """The saved calibration beside a model (``temperature``, ``labels``, ...), or None."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        t = float(data["temperature"])
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path}: not a calibration file ({err}); delete it or re-run the "
                         "evaluation to write it again") from err
    if not (math.isfinite(t) and t > 0):
        raise ModelError(f"{path}: temperature {t} is not a positive number; delete the file or "
                         "re-run the evaluation")
    return data
