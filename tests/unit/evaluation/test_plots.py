from tunesmith.evaluation.calibration import reliability_bins
from tunesmith.evaluation.metrics import confusion
from tunesmith.evaluation.plots import (
    plot_confusion_matrix,
    plot_loss_curves,
    plot_reliability,
    plot_token_lengths,
)

PNG = b"\x89PNG"


def test_every_plot_is_a_png(tmp_path):
    import numpy as np

    records = [{"kind": "train", "step": s, "train_loss": 1 / s} for s in range(1, 6)]
    records += [{"kind": "eval", "step": 5, "valid_loss": 0.4, "best_step": 5}]
    c = confusion(["a", "b", "<invalid>"], ["a", "a", "b"], ["a", "b"])
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    bins = reliability_bins(probs, np.array([0, 0]), n_bins=5)
    paths = [
        plot_loss_curves(records, tmp_path / "loss.png", best_step=5),
        plot_confusion_matrix(c, tmp_path / "cm.png"),
        plot_reliability(bins, tmp_path / "rel.png", after=bins.to_dict()),
        plot_token_lengths({"train": [10, 20, 30], "test": [15]}, tmp_path / "len.png",
                           max_length=25),
    ]
    assert all(p.read_bytes()[:4] == PNG for p in paths)


def test_confusion_counts():
    c = confusion(["a", "b", "<invalid>", "a"], ["a", "a", "b", "b"], ["a", "b"])
    assert c == {"rows": ["a", "b"], "columns": ["a", "b", "<invalid>"],
                 "matrix": [[1, 1, 0], [1, 0, 1]]}


def test_loss_curves_still_importable_from_report():
    from tunesmith.evaluation.report import plot_loss_curves as from_report

    assert from_report is plot_loss_curves
