"""Task metrics: classification (scikit-learn), generation (exact match, sacrebleu BLEU,
rouge-score ROUGE-L, token accuracy) and perplexity.

Per-item score functions (``*_scores``, ``bleu_statistics``) exist so the paired bootstrap in
``stats.py`` can resample the same numbers the corpus metrics are made of.
"""

from __future__ import annotations

import importlib
import math
import re
import unicodedata
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from tunesmith.errors import DataError

INVALID = "<invalid>"


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", text).strip(" \t\n.,;:!?\"'`*")


def parse_label(reply: str, labels: Sequence[str]) -> str:
    """The label a generated reply names.

    An exact answer, else the one label it mentions as a whole word ("The spam message is..."
    names spam). A reply naming no label, or several ("spam or ham"),
    is ``<invalid>`` and counts as wrong: the model has not answered.
    """
    normal = {_norm(lab): lab for lab in labels}
    said = _norm(reply)
    if said in normal:
        return normal[said]
    named = {lab for key, lab in normal.items()
             if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", said)}
    return named.pop() if len(named) == 1 else INVALID


def classification_metrics(predicted: Sequence[str], expected: Sequence[str],
                           labels: Sequence[str], positive: str | None = None) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1, and the share of invalid answers."""
    labels = list(labels)
    p, r, f, support = precision_recall_fscore_support(
        expected, predicted, labels=labels, zero_division=0)
    per_class = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(support[i])} for i, lab in enumerate(labels)}
    result = {
        "n": len(expected),
        "accuracy": float(accuracy_score(expected, predicted)),
        "macro_f1": float(f1_score(expected, predicted, labels=labels, average="macro",
                                   zero_division=0)),
        "invalid_rate": sum(1 for x in predicted if x == INVALID) / max(1, len(predicted)),
        "per_class": per_class,
    }
    if positive is not None:
        result[f"f1_{positive}"] = per_class[positive]["f1"]
    return result


def exact_match(predicted: Sequence[str], expected: Sequence[str]) -> dict:
    hits = sum(1 for a, b in zip(predicted, expected, strict=True) if _norm(a) == _norm(b))
    return {"n": len(expected), "exact_match": hits / max(1, len(expected))}


# ----------------------------------------------------------------------------- generation


def check_references(predicted: Sequence[str], expected: Sequence[str]) -> None:
    """Raise a ``DataError`` unless there are references, one per prediction, none blank."""
    if not expected:
        raise DataError("there are no reference answers to score against; the test set is "
                        "empty or its examples have no assistant answer")
    if len(predicted) != len(expected):
        raise DataError(f"{len(predicted)} predictions for {len(expected)} references; "
                        "generate one reply per test example")
    blank = [i for i, ref in enumerate(expected) if not ref.strip()]
    if blank:
        raise DataError(f"{len(blank)} reference answer(s) are empty (first at test item "
                        f"{blank[0]}); give every test example a non-empty final assistant "
                        "message or remove those examples")


def _optional(module: str, package: str) -> ModuleType:
    # imported on first use: classification runs never need them, and rouge-score pulls in nltk
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"generation metrics need the '{package}' package; install it with "
                          f"`pip install {package}`") from err


def _bleu_class() -> Any:
    return _optional("sacrebleu.metrics", "sacrebleu").BLEU


def _bleu_scorer() -> Any:
    # effective_order only changes sentence-level scores; the counts are the same either way
    return _bleu_class()(effective_order=True)


def bleu_statistics(predicted: Sequence[str], expected: Sequence[str]) -> np.ndarray:
    """Per-item BLEU sufficient statistics, shape [n, 10]: sys_len, ref_len, 4 counts, 4 totals.

    Summing rows and passing the sums to ``bleu_from_statistics`` gives sacrebleu's corpus BLEU,
    which is what lets the bootstrap resample BLEU without re-tokenizing.
    """
    scorer = _bleu_scorer()
    rows = []
    for hyp, ref in zip(predicted, expected, strict=True):
        s = scorer.sentence_score(hyp, [ref])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), 10)


def bleu_from_statistics(sums: np.ndarray) -> float:
    """Corpus BLEU (0-100, sacrebleu's default ``exp`` smoothing) from summed statistics."""
    sums = [int(x) for x in sums]
    return float(_bleu_class().compute_bleu(sums[2:6], sums[6:10], sums[0], sums[1],
                                            smooth_method="exp").score)


def bleu(predicted: Sequence[str], expected: Sequence[str]) -> float:
    """sacrebleu corpus BLEU on a 0-100 scale (one reference per item, 13a tokenization)."""
    check_references(predicted, expected)
    sacrebleu = _optional("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_bleu(list(predicted), [list(expected)]).score)


def rouge_l_scores(predicted: Sequence[str], expected: Sequence[str]) -> np.ndarray:
    """Per-item ROUGE-L F1 (rouge-score, no stemming), in [0, 1]."""
    rouge = _optional("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge.RougeScorer(["rougeL"], use_stemmer=False)
    return np.asarray([scorer.score(ref, hyp)["rougeL"].fmeasure
                       for hyp, ref in zip(predicted, expected, strict=True)], dtype=float)


def token_accuracy_scores(predicted: Sequence[str], expected: Sequence[str]) -> np.ndarray:
    """Per-item share of aligned positions whose word matches, after normalisation.

    Words are compared position by position; the denominator is the longer of the two, so
    missing and extra words both count against the prediction. Two empty strings score 1.
    """
    scores = []
    for hyp, ref in zip(predicted, expected, strict=True):
        h, r = _norm(hyp).split(), _norm(ref).split()
        width = max(len(h), len(r))
        # zip stops at the shorter one: the positions past it are the misses
        hits = sum(a == b for a, b in zip(h, r, strict=False))
        scores.append(1.0 if width == 0 else hits / width)
    return np.asarray(scores, dtype=float)


def exact_match_scores(predicted: Sequence[str], expected: Sequence[str]) -> np.ndarray:
    """Per-item exact match (0/1) after case, space and trailing-punctuation normalisation."""
    return np.asarray([float(_norm(a) == _norm(b))
                       for a, b in zip(predicted, expected, strict=True)], dtype=float)


def generation_metrics(predicted: Sequence[str], expected: Sequence[str]) -> dict:
    """Exact match, BLEU (0-100), ROUGE-L F1 and token accuracy of generated answers."""
    check_references(predicted, expected)
    return {
        "n": len(expected),
        "exact_match": float(exact_match_scores(predicted, expected).mean()),
        "bleu": bleu(predicted, expected),
        "rouge_l": float(rouge_l_scores(predicted, expected).mean()),
        "token_accuracy": float(token_accuracy_scores(predicted, expected).mean()),
    }


# ----------------------------------------------------------------------------- language modelling


def perplexity(loss_sum: float, n_tokens: int) -> float:
    """exp(mean token loss) from a summed natural-log loss; ``inf`` when that overflows."""
    if n_tokens <= 0:
        raise DataError("perplexity needs at least one scored token; the text is empty or "
                        "shorter than two tokens")
    mean = loss_sum / n_tokens
    return math.exp(mean) if mean < 700 else math.inf


def confusion(predicted: Sequence[str], expected: Sequence[str], labels: Sequence[str]) -> dict:
    """Confusion counts: rows are expected labels, columns predicted (plus ``<invalid>`` if any).

    Returned as plain lists (``rows``, ``columns``, ``matrix``) so it goes into metrics.json.
    """
    rows = list(labels)
    columns = rows + ([INVALID] if INVALID in predicted else [])
    col = {c: i for i, c in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in rows]
    for e, p in zip(expected, predicted, strict=True):
        if e in col and p in col:
            matrix[rows.index(e)][col[p]] += 1
    return {"rows": rows, "columns": columns, "matrix": matrix}
