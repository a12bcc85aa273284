import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from tunesmith.errors import DataError
from tunesmith.evaluation.calibration import calibrate
from tunesmith.evaluation.fairness import group_metrics
from tunesmith.evaluation.metrics import INVALID, classification_metrics, confusion
from tunesmith.evaluation.overfitting import overfitting_check
from tunesmith.evaluation.plots import plot_token_lengths
from tunesmith.evaluation.report import (
    compare_runs,
    make_plots,
    read_results,
    write_reports,
    write_results,
)
from tunesmith.evaluation.stats import compare_classification

LABELS = ["spam", "ham"]


def make_results(run_dir, *, name="run-a", tuned_shift=0):
    rng = np.random.default_rng(0)
    expected = ["spam", "ham"] * 20
    base = ["ham"] * 40
    tuned = list(expected)
    for i in range(3 + tuned_shift):
        tuned[i] = "ham" if tuned[i] == "spam" else "spam"
    tuned[10] = INVALID
    records = [{"kind": "train", "step": s, "train_loss": 2 / s} for s in range(1, 21)]
    records += [{"kind": "eval", "step": s, "valid_loss": 1.5 - 0.05 * s, "best_step": s}
                for s in (5, 10, 15, 20)]
    z = rng.normal(0, 2, size=(40, 2))
    y = np.array([LABELS.index(e) for e in expected])
    groups = ["en", "fr"] * 20
    results = {
        "name": name, "model": "smollm2-135m-instruct", "task": "classification",
        "labels": LABELS, "positive_label": "spam",
        "data_counts": {"train": 300, "validation": 40, "test": 40, "left out": 2},
        "token_lengths": {"train": {"min": 12, "mean": 30.5, "p50": 29, "p95": 55, "max": 80}},
        "hyperparameters": {"learning_rate": 2e-4, "epochs": 3, "lora_r": 8 + tuned_shift},
        "training": {"best_step": 20, "best_valid_loss": 0.5, "stopped_early": False},
        "base": classification_metrics(base, expected, LABELS, "spam"),
        "tuned": classification_metrics(tuned, expected, LABELS, "spam"),
        "comparison": {k: c.to_dict() for k, c in compare_classification(
            base, tuned, expected, LABELS, positive="spam", n_resamples=300).items()},
        "confusion": {"base": confusion(base, expected, LABELS),
                      "tuned": confusion(tuned, expected, LABELS)},
        "calibration": calibrate(4 * z, y, 4 * z, y, n_bins=10).to_dict(),
        "forgetting": {"base_perplexity": 18.25, "tuned_perplexity": 19.5,
                       "perplexity_ratio": 19.5 / 18.25, "kl_mean": 0.0731,
                       "kl_reply_start": 0.412, "n_text_tokens": 4095, "n_prompts": 22,
                       "max_perplexity_ratio": 1.2, "max_kl": 0.5, "warning": None,
                       "flagged": False},
        "overfitting": overfitting_check(records).to_dict(),
        "fairness": {"group_field": "language",
                     "base": group_metrics(base, expected, groups, positive="spam").to_dict(),
                     "tuned": group_metrics(tuned, expected, groups, positive="spam").to_dict()},
        "confident_errors": [{"index": 1, "input": "WIN a <b>prize</b> | now",
                              "expected": "ham", "predicted": "spam", "confidence": 0.9731,
                              "p_expected": 0.0269}],
        "samples": [{"input": "hello there", "expected": "ham", "predicted": "ham",
                     "reply": "ham"}],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = make_plots(run_dir, results, records)
    plot_token_lengths({"train": [12, 30, 80]}, run_dir / "token_lengths.png")
    results["plots"]["token_lengths"] = "token_lengths.png"
    return results


class Cells(HTMLParser):
    """Table cells, image sources, and every tag of an HTML page."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self.tags, self._in = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag in ("td", "th")
        if tag == "td" or tag == "th":
            self.cells.append("")
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


@pytest.fixture
def written(tmp_path):
    run = tmp_path / "run"
    results = make_results(run)
    write_results(run / "metrics.json", results)
    md, html = write_reports(run, results)
    return run, results, md.read_text(), html.read_text()


def shown_numbers(r):
    """The numbers every report must show, formatted as the report formats them."""
    c = r["comparison"]["accuracy"]
    return [f"{r['base']['accuracy']:.4f}", f"{r['tuned']['accuracy']:.4f}",
            f"{c['difference']:+.4f}", f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
            f"{c['relative_error_reduction']:+.1%}",
            f"{r['comparison']['f1_spam']['ci_low']:+.4f}",
            f"{r['tuned']['per_class']['ham']['recall']:.4f}",
            f"{r['calibration']['ece_before']:.4f}", f"{r['calibration']['ece_after']:.4f}",
            f"{r['calibration']['temperature']:.4f}",
            "18.2500", "19.5000", "0.0731", "0.4120",
            f"{r['overfitting']['points'][-1]['gap']:.4f}",
            f"{r['fairness']['tuned']['by_group']['fr']['accuracy']:.4f}",
            f"{r['fairness']['tuned']['gaps']['accuracy']:.4f}", "0.9731", "300", "55"]


def test_markdown_holds_the_numbers(written):
    _, results, md, _ = written
    assert "| metric | base | tuned | change |" in md  # the flow test's header still matches
    b, t = results["base"]["accuracy"], results["tuned"]["accuracy"]
    assert f"| accuracy | {b:.4f} | {t:.4f} |" in md
    assert "loss_curve.png" in md and "reliability.png" in md
    for number in shown_numbers(results):
        assert number in md, number
    assert "WIN a <b>prize</b> \\| now" in md  # a pipe in user text does not break the table
    assert "Best checkpoint (kept and evaluated): step 20" in md
    for title in ("Calibration", "Forgetting", "Overfitting", "Fairness",
                  "Most confident errors", "Confusion matrices", "Per-class metrics"):
        assert f"## {title}" in md


def test_html_is_self_contained_and_holds_the_numbers(written):
    run, results, _, html = written
    page = Cells()
    page.feed(html)
    cells = " | ".join(page.cells)
    for number in shown_numbers(results):
        assert number in cells or number in html, number
    b, t = results["base"]["accuracy"], results["tuned"]["accuracy"]
    row = page.cells.index("accuracy")
    assert page.cells[row + 1:row + 3] == [f"{b:.4f}", f"{t:.4f}"]
    # every plot embedded as a PNG data URI; nothing fetched from elsewhere
    assert len(page.images) == len(results["plots"]) == 5
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not any(tag in ("script", "link", "iframe") for tag, _ in page.tags)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "<style>" in html
    # user text is escaped, never markup
    assert "WIN a &lt;b&gt;prize&lt;/b&gt; | now" in html and "<b>prize" not in html


def test_metrics_json_is_the_results_dict(written):
    run, results, _, _ = written
    stored = json.loads((run / "metrics.json").read_text())
    assert stored["schema_version"] == 1
    assert stored["tuned"] == results["tuned"]
    assert stored["comparison"]["accuracy"]["ci_low"] == results["comparison"]["accuracy"][
        "ci_low"]
    assert read_results(run)["name"] == "run-a"


def test_nan_becomes_null(tmp_path):
    results = {"name": "n", "model": "m", "task": "classification", "data_counts": {},
               "hyperparameters": {}, "tuned": {"accuracy": float("nan")}}
    write_results(tmp_path / "metrics.json", results)
    assert json.loads((tmp_path / "metrics.json").read_text())["tuned"]["accuracy"] is None


def test_a_minimal_results_dict_renders(tmp_path):
    results = {"name": "gen", "model": "m", "task": "generation", "data_counts": {"test": 2},
               "hyperparameters": {"epochs": 1, "learning_rate": 2e-5}, "base": None,
               "tuned": {"n": 2, "exact_match": 0.5, "bleu": 41.5, "rouge_l": 0.6,
                         "token_accuracy": 0.55}}
    md, html = write_reports(tmp_path, results)
    text = md.read_text()
    assert "| bleu | - | 41.5000 | - |" in text and "## Calibration" not in text
    assert "| learning_rate | 2e-05 |" in text  # not 0.0000
    assert "41.5000" in html.read_text()


def test_missing_required_keys_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"lacks \['tuned'\]"):
        write_results(tmp_path / "metrics.json", {"name": "n", "model": "m", "task": "x",
                                                  "data_counts": {}, "hyperparameters": {}})


def test_compare_runs_side_by_side(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra, rb = make_results(a, name="run-a"), make_results(b, name="run-b", tuned_shift=4)
    write_results(a / "metrics.json", ra)
    write_results(b / "metrics.json", rb)
    text = compare_runs(a, b)
    ta, tb = ra["tuned"]["accuracy"], rb["tuned"]["accuracy"]
    assert text.startswith("# Runs compared: run-a vs run-b")
    assert f"| accuracy | {ta:.4f} | {tb:.4f} | {tb - ta:+.4f} |" in text
    assert "| lora_r | 8 | 12 |" in text and "learning_rate" not in text
    assert "ECE after temperature scaling" in text


def test_compare_runs_reads_an_older_results_json(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"base": {"accuracy": 0.5},
                                                  "tuned": {"accuracy": 0.75}}))
    new = tmp_path / "new"
    write_results(new / "metrics.json", make_results(new))
    assert "| accuracy | 0.7500 |" in compare_runs(old, new)
    with pytest.raises(DataError, match="no metrics.json or results.json"):
        compare_runs(old, tmp_path / "missing")


def test_warnings_lead_the_report(tmp_path):
    results = make_results(tmp_path)
    results["forgetting"]["warning"] = "the fine-tune may have damaged general ability: X"
    worse = compare_classification(["spam", "ham"] * 10, ["ham"] * 20, ["spam", "ham"] * 10,
                                   LABELS, n_resamples=200)
    results["comparison"] = {k: c.to_dict() for k, c in worse.items()}
    md, _ = write_reports(tmp_path, results)
    text = md.read_text()
    warnings = text.split("## Warnings", 1)[1].split("## Data", 1)[0]
    assert "damaged general ability: X" in warnings
    assert "accuracy: the tuned model is worse than the base (95% interval" in warnings
    assert text.index("## Warnings") < text.index("## Data")
