"""The evaluation library end to end on the tiny model, the way the run flow calls it."""

import json

import numpy as np

from tests.helpers import review_rows
from tunesmith.evaluation.analysis import most_confident_errors, prompt_text
from tunesmith.evaluation.calibration import calibrate, load_calibration, save_calibration
from tunesmith.evaluation.checks import check_model_tokenizer
from tunesmith.evaluation.metrics import classification_metrics, confusion
from tunesmith.evaluation.report import make_plots, read_results, write_reports, write_results
from tunesmith.evaluation.scoring import label_probabilities
from tunesmith.evaluation.stats import compare_classification

LABELS = ["good", "bad"]


def test_classification_evaluation_end_to_end(trained_reviewer, tiny_model, tokenizer, tmp_path):
    tuned_model, valid_rows = trained_reviewer
    test_rows = review_rows(24)[16:]
    expected = [r["messages"][-1]["content"] for r in test_rows]
    prompts = [r["messages"][:-1] for r in test_rows]
    check_model_tokenizer(tuned_model, tokenizer)

    base = label_probabilities(tiny_model, tokenizer, prompts, LABELS)
    tuned = label_probabilities(tuned_model, tokenizer, prompts, LABELS)
    valid = label_probabilities(tuned_model, tokenizer, [r["messages"][:-1] for r in valid_rows],
                                LABELS)
    valid_y = np.array([LABELS.index(r["messages"][-1]["content"]) for r in valid_rows])
    test_y = np.array([LABELS.index(e) for e in expected])
    cal = calibrate(valid.log_probs, valid_y, tuned.log_probs, test_y, n_bins=5)
    (tmp_path / "merged").mkdir()
    save_calibration(tmp_path / "merged", cal.temperature, labels=LABELS)

    results = {
        "name": "tiny", "model": "tiny-llama", "task": "classification", "labels": LABELS,
        "positive_label": "bad", "data_counts": {"train": 16, "validation": 16, "test": 8},
        "hyperparameters": {"learning_rate": 5e-3, "steps": 15},
        "base": classification_metrics(base.predicted, expected, LABELS, "bad"),
        "tuned": classification_metrics(tuned.predicted, expected, LABELS, "bad"),
        "comparison": {k: c.to_dict() for k, c in compare_classification(
            base.predicted, tuned.predicted, expected, LABELS, positive="bad").items()},
        "confusion": {"base": confusion(base.predicted, expected, LABELS),
                      "tuned": confusion(tuned.predicted, expected, LABELS)},
        "calibration": cal.to_dict(),
        "confident_errors": most_confident_errors(
            tuned.probs, LABELS, expected, [prompt_text(p) for p in prompts], n=5),
    }
    results["plots"] = make_plots(tmp_path, results, records=[])
    write_results(tmp_path / "metrics.json", results)
    md, html = write_reports(tmp_path, results)

    assert load_calibration(tmp_path / "merged")["temperature"] == cal.temperature
    stored = read_results(tmp_path)
    assert stored["calibration"]["ece_after"] == cal.ece_after
    assert json.dumps(stored)  # plain JSON all the way down
    page = html.read_text()
    assert f"{results['tuned']['accuracy']:.4f}" in page and f"{cal.ece_before:.4f}" in page
    assert page.count("data:image/png;base64,") == 3  # base + tuned confusion, reliability
    assert f"| accuracy | {results['base']['accuracy']:.4f} | " in md.read_text()
