"""The measuring half of a run: evaluate base and tuned model, and what the fine-tune cost.

Used by ``tunesmith.flows.run`` and ``tunesmith.flows.evaluate``; the pieces live in
``tunesmith.evaluation``. Each function takes what it needs and returns a plain value.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import EvalConfig
from tunesmith.data.chat import ChatExample
from tunesmith.data.encode import encode_chat
from tunesmith.evaluation.analysis import most_confident_errors, prompt_text
from tunesmith.evaluation.calibration import CalibrationResult, calibrate, save_calibration
from tunesmith.evaluation.classifier import class_probabilities, evaluate_classifier
from tunesmith.evaluation.fairness import group_metrics
from tunesmith.evaluation.forgetting import (
    GENERAL_PROMPTS_FILE,
    GENERAL_TEXT_FILE,
    GeneralSnapshot,
    compare_snapshots,
    general_snapshot,
    general_text_dir,
    read_general_prompts,
)
from tunesmith.evaluation.metrics import confusion
from tunesmith.evaluation.overfitting import overfitting_check, training_metrics
from tunesmith.evaluation.plots import plot_token_lengths
from tunesmith.evaluation.report import make_plots, write_reports, write_results
from tunesmith.evaluation.scoring import label_probabilities
from tunesmith.evaluation.stats import compare_classification, compare_generation
from tunesmith.evaluation.task import Predictions, evaluate_examples, label_token_budget
from tunesmith.flows.steps import write_json

Advance = Callable[[int], None]


@dataclass
class ModelEval:
    """One model on the test set: task metrics, its answers, and label log-probabilities."""

    metrics: dict[str, Any]
    predictions: Predictions
    log_probs: np.ndarray | None = None  # [n, labels], classification only


def save_model_eval(path: Path, result: ModelEval) -> None:
    """Keep an evaluation on disk (the base model's, so a resumed run need not redo it)."""
    p = result.predictions
    write_json(path, {  # whole or not at all: a run killed while writing resumes cleanly
        "metrics": result.metrics, "replies": p.replies, "predicted": p.predicted,
        "expected": p.expected, "mode": p.mode,
        "log_probs": None if result.log_probs is None else result.log_probs.tolist()})


def load_model_eval(path: Path) -> ModelEval | None:
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    # files from before eval.mode existed hold generated answers
    predictions = Predictions(d["replies"], d["predicted"], d["expected"],
                              d.get("mode", "generate"))
    return ModelEval(d["metrics"], predictions,
                     None if d["log_probs"] is None else np.array(d["log_probs"]))


def evaluate_lm(model: Any, tokenizer: Any, test: Sequence[ChatExample], ev: EvalConfig,
                labels: list[str] | None, advance: Advance | None = None, *,
                score_labels: bool = True) -> ModelEval:
    """Answer each test item as ``ev.mode`` says and score the answers; for classification also
    the label log-probabilities. Score mode has them already; in generate mode they cost a
    second pass, made only with ``score_labels`` (they feed calibration and error analysis,
    which look at the tuned model only, so the base model skips them)."""
    budget = ev.max_new_tokens
    if budget == "auto":
        budget = label_token_budget(tokenizer, labels) if labels else 128
    metrics, predictions = evaluate_examples(
        model, tokenizer, test, task=ev.task, labels=labels, positive=ev.positive_label,
        max_new_tokens=int(budget), batch_size=ev.batch_size, mode=ev.mode, on_batch=advance)
    log_probs = None
    if predictions.scores is not None:
        log_probs = predictions.scores.log_probs
    elif score_labels and labels and (ev.calibration or ev.confident_errors):
        log_probs = label_probabilities(model, tokenizer, [ex.prompt for ex in test], labels,
                                        batch_size=ev.batch_size).log_probs
    return ModelEval(metrics, predictions, log_probs)


def evaluate_head(model: Any, tokenizer: Any, test: Sequence[ChatExample], ev: EvalConfig,
                  labels: list[str], advance: Advance | None = None) -> ModelEval:
    """A classification head on the test set."""
    metrics, predictions, probs = evaluate_classifier(
        model, tokenizer, test, labels=labels, positive=ev.positive_label,
        batch_size=ev.batch_size, on_batch=advance)
    return ModelEval(metrics, predictions, np.log(probs.clamp_min(1e-12).numpy()))


def validation_log_probs(model: Any, tokenizer: Any, valid: Sequence[ChatExample],
                         labels: list[str], *, head: bool, batch_size: int) -> np.ndarray:
    prompts = [ex.prompt for ex in valid]
    if head:
        probs = class_probabilities(model, tokenizer, prompts, batch_size=batch_size)
        return np.log(probs.clamp_min(1e-12).numpy())
    return label_probabilities(model, tokenizer, prompts, labels,
                               batch_size=batch_size).log_probs


def calibration(valid_log_probs: np.ndarray, valid: Sequence[ChatExample], tuned: ModelEval,
                test: Sequence[ChatExample], labels: list[str], model_dir: Path
                ) -> CalibrationResult:
    """Fit a temperature on validation, report ECE before/after on test, save it with the model."""
    index = {lab: i for i, lab in enumerate(labels)}
    result = calibrate(valid_log_probs, np.array([index[ex.label] for ex in valid]),
                       tuned.log_probs, np.array([index[ex.label] for ex in test]))
    save_calibration(model_dir, result.temperature, labels=labels,
                     details={"ece_before": result.ece_before, "ece_after": result.ece_after})
    return result


def forgetting_snapshot(model: Any, tokenizer: Any, ev: EvalConfig) -> GeneralSnapshot:
    """General-text perplexity and next-token distributions on general prompts."""
    folder = general_text_dir() if ev.forgetting_text is None or \
        ev.forgetting_prompts is None else None
    text_path = ev.forgetting_text or folder / GENERAL_TEXT_FILE
    prompts_path = ev.forgetting_prompts or folder / GENERAL_PROMPTS_FILE
    return general_snapshot(model, tokenizer, text=Path(text_path).read_text(encoding="utf-8"),
                            prompts=read_general_prompts(Path(prompts_path)),
                            max_tokens=ev.forgetting_max_tokens, batch_size=ev.batch_size)


def length_stats(tokenizer: Any, splits: dict[str, Sequence[ChatExample]]
                 ) -> tuple[dict[str, dict[str, float]], dict[str, list[int]]]:
    lengths = {name: [len(encode_chat(tokenizer, ex.messages)) for ex in items]
               for name, items in splits.items() if items}
    stats = {name: {"min": int(np.min(v)), "mean": float(np.mean(v)),
                    "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                    "max": int(np.max(v))} for name, v in lengths.items()}
    return stats, lengths


def comparison(ev: EvalConfig, labels: list[str] | None, base: ModelEval, tuned: ModelEval
               ) -> dict[str, Any]:
    expected = tuned.predictions.expected
    if labels:
        found = compare_classification(base.predictions.predicted, tuned.predictions.predicted,
                                       expected, labels, positive=ev.positive_label,
                                       n_resamples=ev.bootstrap_resamples)
    else:
        found = compare_generation(base.predictions.predicted, tuned.predictions.predicted,
                                   expected, n_resamples=ev.bootstrap_resamples)
    return {k: c.to_dict() for k, c in found.items()}


def fairness(ev: EvalConfig, test: Sequence[ChatExample], base: ModelEval | None,
             tuned: ModelEval) -> dict[str, Any] | None:
    if not ev.group_field:
        return None
    groups = [str(ex.extra.get(ev.group_field, "<missing>")) for ex in test]

    def per(m: ModelEval) -> dict[str, Any]:
        return group_metrics(m.predictions.predicted, m.predictions.expected, groups,
                             positive=ev.positive_label).to_dict()

    return {"group_field": ev.group_field, "base": per(base) if base else None,
            "tuned": per(tuned)}


def errors_and_samples(test: Sequence[ChatExample], tuned: ModelEval, labels: list[str] | None,
                       n_errors: int) -> tuple[list[dict], list[dict]]:
    """The most confident wrong answers, and sample answers with the wrong ones first."""
    inputs = [prompt_text(ex.prompt) for ex in test]
    p = tuned.predictions
    errors = []
    if labels and tuned.log_probs is not None and n_errors:
        probs = np.exp(tuned.log_probs - tuned.log_probs.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        errors = most_confident_errors(probs, labels, p.expected, inputs,
                                       predicted=p.predicted, n=n_errors)
    order = sorted(range(len(test)), key=lambda i: p.predicted[i] == p.expected[i])
    samples = [{"input": inputs[i], "expected": p.expected[i], "predicted": p.predicted[i],
                "reply": p.replies[i]} for i in order[:10]]
    return errors, samples


def write_run_results(run_dir: Path, results: dict[str, Any], records: Sequence[dict],
                      lengths: dict[str, list[int]], max_length: int) -> None:
    """metrics.json, the plots, report.md and the self-contained report.html."""
    plots = make_plots(run_dir, results, records)
    if lengths:
        plot_token_lengths(lengths, run_dir / "token_lengths.png", max_length=max_length)
        plots["token_lengths"] = "token_lengths.png"
    results["plots"] = plots
    write_results(run_dir / "metrics.json", results)
    write_reports(run_dir, results)


def assemble(*, name: str, model: str, ev: EvalConfig, labels: list[str] | None,
             data_counts: dict[str, int], token_lengths: dict, hyperparameters: dict,
             training: dict, test: Sequence[ChatExample], base: ModelEval | None,
             tuned: ModelEval, calibration_result: CalibrationResult | None,
             forgetting: dict | None, records: Sequence[dict]) -> dict[str, Any]:
    """The results dict (the schema of ``evaluation.report``): every number the report shows."""
    errors, samples = errors_and_samples(test, tuned, labels, ev.confident_errors)
    results: dict[str, Any] = {
        "name": name, "model": model, "task": ev.task, "labels": labels,
        "positive_label": ev.positive_label, "data_counts": data_counts,
        "token_lengths": token_lengths, "hyperparameters": hyperparameters,
        "training": training, "base": base.metrics if base else None, "tuned": tuned.metrics,
        "comparison": comparison(ev, labels, base, tuned) if base else None,
        "calibration": calibration_result.to_dict() if calibration_result else None,
        "forgetting": forgetting, "fairness": fairness(ev, test, base, tuned),
        "confident_errors": errors, "samples": samples,
        # how each model's test answers were obtained: score, generate or head
        "eval_mode": {"base": base.predictions.mode if base else None,
                      "tuned": tuned.predictions.mode},
    }
    if labels:
        results["confusion"] = {
            "base": confusion(base.predictions.predicted, base.predictions.expected, labels)
            if base else None,
            "tuned": confusion(tuned.predictions.predicted, tuned.predictions.expected, labels)}
    if records:
        results["overfitting"] = overfitting_check(records).to_dict()
        results["training_metrics"] = training_metrics(records)
    return results


__all__ = ["ModelEval", "assemble", "calibration", "compare_snapshots", "evaluate_head",
           "evaluate_lm", "forgetting_snapshot", "length_stats", "load_model_eval",
           "save_model_eval", "validation_log_probs", "write_run_results"]
