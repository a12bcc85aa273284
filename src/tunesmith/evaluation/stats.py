"""Paired bootstrap: how sure are we that the tuned model beats the base on this test set?

Base and tuned answer the *same* test items, so the items are resampled once per bootstrap
draw and both models are scored on that draw (a paired bootstrap, Koehn 2004); the spread of
the difference is then narrower and fairer than two independent intervals.

Every metric is written as a function of *summed per-item statistics*: accuracy sums 0/1
correctness, F1 sums per-class true/false positives and false negatives, BLEU sums n-gram
counts. A resample is then a matrix of draw counts (how often each item was drawn) times the
per-item statistics, which is one vectorised product for all resamples, and F1-type or corpus
metrics are recomputed exactly per resample rather than averaged per item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tunesmith.errors import DataError
from tunesmith.evaluation.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    check_references,
    exact_match_scores,
    rouge_l_scores,
    token_accuracy_scores,
)

# sums [B, d] of per-item statistics over each resample, and the item count -> metric [B]
Statistic = Callable[[np.ndarray, int], np.ndarray]

_CHUNK = 250  # resamples per matrix product: bounds memory at 250 x n draw counts


@dataclass(frozen=True)
class Comparison:
    """Base vs tuned on one metric: the difference, its bootstrap CI, the error reduction.

    ``p_not_better`` is the share of resamples in which tuned did not beat base: a one-sided
    bootstrap estimate of how likely the improvement is an accident of this test set.
    """

    metric: str
    base: float
    tuned: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    p_not_better: float
    relative_error_reduction: float | None
    n: int
    n_resamples: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def relative_error_reduction(base: float, tuned: float, *, perfect: float = 1.0) -> float | None:
    """(err_base - err_tuned) / err_base with err = perfect - score; None if base is perfect."""
    err_base, err_tuned = perfect - base, perfect - tuned
    if err_base <= 0:
        return None
    return (err_base - err_tuned) / err_base


def resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n] how often each item is drawn in each resample (each row sums to n)."""
    draws = rng.integers(0, n, size=(n_resamples, n))
    offsets = (np.arange(n_resamples) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n
                       ).reshape(n_resamples, n)


def mean_statistic(sums: np.ndarray, n: int) -> np.ndarray:
    """The mean of a per-item score (accuracy from 0/1 correctness, mean ROUGE-L, ...)."""
    return sums[:, 0] / n


def _as_2d(x: np.ndarray | Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return a[:, None] if a.ndim == 1 else a


def paired_bootstrap(base: np.ndarray | Sequence[float], tuned: np.ndarray | Sequence[float],
                     *, statistic: Statistic = mean_statistic, metric: str = "score",
                     n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                     perfect: float = 1.0) -> Comparison:
    """Difference tuned - base of a metric, with a percentile bootstrap confidence interval.

    ``base`` and ``tuned`` hold per-item statistics of the same items in the same order:
    shape [n] (a score per item, e.g. 0/1 correct) or [n, d] (e.g. ``confusion_statistics``);
    ``statistic`` turns their sums over a resample into the metric. ``perfect`` is the best
    possible value, for the relative error reduction (1 for accuracy, 100 for BLEU).
    """
    b, t = _as_2d(base), _as_2d(tuned)
    if b.shape != t.shape:
        raise DataError(f"base has statistics of shape {b.shape} but tuned {t.shape}; score "
                        "both models on the same test items")
    n = b.shape[0]
    if n == 0:
        raise DataError("the paired bootstrap needs at least one test item; the test set is "
                        "empty")
    if not 0 < confidence < 1:
        raise DataError(f"confidence must be between 0 and 1, not {confidence}")
    base_value = float(statistic(b.sum(0, keepdims=True), n)[0])
    tuned_value = float(statistic(t.sum(0, keepdims=True), n)[0])
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_resamples, _CHUNK):
        counts = resample_counts(n, min(_CHUNK, n_resamples - start), rng).astype(float)
        diffs.append(statistic(counts @ t, n) - statistic(counts @ b, n))
    d = np.concatenate(diffs)
    alpha = 1 - confidence
    low, high = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    return Comparison(
        metric=metric, base=base_value, tuned=tuned_value, difference=tuned_value - base_value,
        ci_low=float(low), ci_high=float(high), confidence=confidence,
        p_not_better=float(np.mean(d <= 0)),
        relative_error_reduction=relative_error_reduction(base_value, tuned_value,
                                                          perfect=perfect),
        n=n, n_resamples=n_resamples, seed=seed)


# ----------------------------------------------------------------------------- classification


def confusion_statistics(predicted: Sequence[str], expected: Sequence[str],
                         labels: Sequence[str]) -> np.ndarray:
    """Per-item [n, 3k] indicators: true positive, false positive, false negative per label.

    An ``<invalid>`` prediction is a false negative of the expected label and a false positive
    of none, as in ``classification_metrics``.
    """
    pred = np.asarray(predicted, dtype=object)[:, None]
    exp = np.asarray(expected, dtype=object)[:, None]
    lab = np.asarray(list(labels), dtype=object)[None, :]
    tp = (pred == lab) & (exp == lab)
    fp = (pred == lab) & (exp != lab)
    fn = (pred != lab) & (exp == lab)
    return np.concatenate([tp, fp, fn], axis=1).astype(float)


def _f1(sums: np.ndarray, k: int) -> np.ndarray:
    tp, fp, fn = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:]
    denom = 2 * tp + fp + fn
    # a class never expected nor predicted scores 0, like scikit-learn's zero_division=0
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1_statistic(k: int) -> Statistic:
    """Macro F1 over the k labels of ``confusion_statistics`` sums."""
    return lambda sums, n: _f1(sums, k).mean(axis=1)


def f1_statistic(label_index: int, k: int) -> Statistic:
    """F1 of one label (the positive class) from ``confusion_statistics`` sums."""
    return lambda sums, n: _f1(sums, k)[:, label_index]


def compare_classification(base_predicted: Sequence[str], tuned_predicted: Sequence[str],
                           expected: Sequence[str], labels: Sequence[str], *,
                           positive: str | None = None, n_resamples: int = 1000, seed: int = 0,
                           confidence: float = 0.95) -> dict[str, Comparison]:
    """Accuracy, macro F1 and (given ``positive``) its F1: base vs tuned with bootstrap CIs."""
    check_references(base_predicted, expected)
    check_references(tuned_predicted, expected)
    if positive is not None and positive not in labels:
        raise DataError(f"the positive label '{positive}' is not one of the labels "
                        f"{list(labels)}; set eval.positive_label to one of them")
    labels = list(labels)
    k = len(labels)
    kw = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence}
    exp = np.asarray(expected, dtype=object)
    out = {"accuracy": paired_bootstrap(
        np.asarray(base_predicted, dtype=object) == exp,
        np.asarray(tuned_predicted, dtype=object) == exp, metric="accuracy", **kw)}
    b = confusion_statistics(base_predicted, expected, labels)
    t = confusion_statistics(tuned_predicted, expected, labels)
    out["macro_f1"] = paired_bootstrap(b, t, statistic=macro_f1_statistic(k),
                                       metric="macro_f1", **kw)
    if positive is not None:
        out[f"f1_{positive}"] = paired_bootstrap(
            b, t, statistic=f1_statistic(labels.index(positive), k), metric=f"f1_{positive}",
            **kw)
    return out


# ----------------------------------------------------------------------------- generation


def bleu_statistic(sums: np.ndarray, n: int) -> np.ndarray:
    """Corpus BLEU of each resample from summed ``bleu_statistics``."""
    return np.asarray([bleu_from_statistics(row) for row in sums])


def compare_generation(base_predicted: Sequence[str], tuned_predicted: Sequence[str],
                       expected: Sequence[str], *, n_resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, Comparison]:
    """Exact match, BLEU, ROUGE-L and token accuracy: base vs tuned with bootstrap CIs."""
    check_references(tuned_predicted, expected)
    check_references(base_predicted, expected)
    kw = {"n_resamples": n_resamples, "seed": seed, "confidence": confidence}
    out = {"exact_match": paired_bootstrap(exact_match_scores(base_predicted, expected),
                                           exact_match_scores(tuned_predicted, expected),
                                           metric="exact_match", **kw),
           "bleu": paired_bootstrap(bleu_statistics(base_predicted, expected),
                                    bleu_statistics(tuned_predicted, expected),
                                    statistic=bleu_statistic, metric="bleu", perfect=100.0, **kw)}
    for name, fn in (("rouge_l", rouge_l_scores), ("token_accuracy", token_accuracy_scores)):
        out[name] = paired_bootstrap(fn(base_predicted, expected), fn(tuned_predicted, expected),
                                     metric=name, **kw)
    return out
