"""eval.mode: test answers by scoring the labels or by generating, one mechanism for both."""

import html
import json

import numpy as np
import pytest

from tests.helpers import review_rows
from tunesmith.config import EvalConfig
from tunesmith.data.chat import ChatExample
from tunesmith.errors import ConfigError
from tunesmith.evaluation import task as task_module
from tunesmith.evaluation.metrics import INVALID, classification_metrics
from tunesmith.evaluation.report import write_reports, write_results
from tunesmith.evaluation.task import evaluate_examples, resolve_mode

LABELS = ["good", "bad"]


def examples(rows):
    return [ChatExample(messages=r["messages"]) for r in rows]


def test_auto_scores_classification_and_generates_generation():
    assert resolve_mode("auto", "classification") == "score"
    assert resolve_mode("auto", "generation") == "generate"
    assert resolve_mode("generate", "classification") == "generate"
    assert resolve_mode("score", "classification") == "score"
    assert EvalConfig().mode == "auto"


def test_scoring_a_generation_task_is_refused():
    with pytest.raises(ConfigError, match=r"eval\.mode 'score'.*needs eval\.task: "
                                          r"classification"):
        resolve_mode("score", "generation")
    with pytest.raises(ValueError, match=r"eval\.mode 'score'"):
        EvalConfig(task="generation", mode="score")


@pytest.fixture(scope="module")
def label_answerer(tiny_model_dir, tokenizer):
    """The tiny model trained long enough on 32 reviews to answer a label and stop."""
    from tests.helpers import train_tiny
    from tunesmith.data.encode import encode_chat
    from tunesmith.models.load import load_model

    encoded = [encode_chat(tokenizer, r["messages"]) for r in review_rows(32)]
    return train_tiny(load_model(tiny_model_dir), tokenizer, encoded, steps=30, lr=5e-3)


def test_scoring_agrees_with_generation_where_the_reply_names_a_label(label_answerer,
                                                                       tokenizer):
    model = label_answerer
    # the 32 training reviews and 32 it has not seen (it gets some of them wrong)
    test = examples(review_rows(64))
    kwargs = {"task": "classification", "labels": LABELS, "positive": "bad",
              "max_new_tokens": 4, "batch_size": 16}
    _, generated = evaluate_examples(model, tokenizer, test, mode="generate", **kwargs)
    metrics, scored = evaluate_examples(model, tokenizer, test, mode="score", **kwargs)
    answered = [i for i, p in enumerate(generated.predicted) if p != INVALID]
    assert len(answered) >= 48, generated.replies  # enough items for the test to mean something
    disagree = [(i, generated.replies[i], scored.predicted[i]) for i in answered
                if generated.predicted[i] != scored.predicted[i]]
    assert disagree == []
    # scoring answers every item with a label: nothing is invalid, by construction
    assert metrics["invalid_rate"] == 0 and set(scored.predicted) <= set(LABELS)
    assert scored.replies == scored.predicted
    assert (scored.mode, generated.mode) == ("score", "generate")
    assert scored.scores is not None and generated.scores is None
    assert scored.predicted == scored.scores.predicted


def test_score_mode_reports_progress_per_item(tiny_model, tokenizer):
    test = examples(review_rows(7))
    seen = []
    evaluate_examples(tiny_model, tokenizer, test, task="classification", labels=LABELS,
                      positive=None, max_new_tokens=4, batch_size=3, mode="score",
                      on_batch=seen.append)
    assert sum(seen) == 7 and len(seen) == 3


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_the_run_scores_the_labels_once(mode, tiny_model, tokenizer, monkeypatch):
    from tunesmith.flows import assess

    calls = []

    def counted(real):
        def wrapper(*args, **kwargs):
            calls.append(len(args[2]))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(task_module, "label_probabilities",
                        counted(task_module.label_probabilities))
    monkeypatch.setattr(assess, "label_probabilities", counted(assess.label_probabilities))
    test = examples(review_rows(6))
    ev = EvalConfig(task="classification", labels=LABELS, mode=mode, calibration=True,
                    max_new_tokens=3)
    tuned = assess.evaluate_lm(tiny_model, tokenizer, test, ev, LABELS)
    # one pass over the test prompts: score mode's answers are the calibration's scores
    assert calls == [6]
    assert tuned.log_probs is not None and tuned.log_probs.shape == (6, 2)
    assert tuned.predictions.mode == mode
    if mode == "score":
        np.testing.assert_array_equal(tuned.log_probs, tuned.predictions.scores.log_probs)
    calls.clear()
    base = assess.evaluate_lm(tiny_model, tokenizer, test, ev, LABELS, score_labels=False)
    assert calls == ([6] if mode == "score" else [])
    assert base.metrics["n"] == 6


def test_saved_evaluations_keep_their_mode(tmp_path, tiny_model, tokenizer):
    from tunesmith.flows import assess

    ev = EvalConfig(task="classification", labels=LABELS)
    found = assess.evaluate_lm(tiny_model, tokenizer, examples(review_rows(4)), ev, LABELS)
    assess.save_model_eval(tmp_path / "eval.json", found)
    assert assess.load_model_eval(tmp_path / "eval.json").predictions.mode == "score"
    # a file from before eval.mode existed holds generated answers
    old = json.loads((tmp_path / "eval.json").read_text())
    del old["mode"]
    (tmp_path / "eval.json").write_text(json.dumps(old))
    assert assess.load_model_eval(tmp_path / "eval.json").predictions.mode == "generate"


@pytest.mark.parametrize(("modes", "said"), [
    ({"base": "score", "tuned": "score"},
     ["scored label log-probabilities (base and tuned)", "invalid_rate is 0 by construction"]),
    ({"base": "generate", "tuned": "generate"},
     ["generated answers (base and tuned)", "naming none or several is invalid"]),
    ({"base": "generate", "tuned": "head"},
     ["generated answers (base); the classification head's logits (tuned)"]),
])
def test_the_report_says_how_answers_were_obtained(tmp_path, modes, said):
    expected = ["good", "bad"] * 4
    metrics = classification_metrics(expected, expected, LABELS, "bad")
    results = {"name": "r", "model": "m", "task": "classification", "labels": LABELS,
               "data_counts": {"test": 8}, "hyperparameters": {}, "base": metrics,
               "tuned": metrics, "eval_mode": modes}
    write_results(tmp_path / "metrics.json", results)
    md, page = write_reports(tmp_path, results)
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_mode"] == modes
    for text in (md.read_text(), html.unescape(page.read_text())):
        for fragment in said:
            assert fragment in text, fragment
