"""The training process's outputs: the job's result file."""

from tunesmith.service.runner import RESULT_COLUMNS, results_csv


def test_results_csv_merges_train_and_eval_by_step() -> None:
    text = results_csv([
        {"kind": "eval", "step": 0, "valid_loss": 9.0, "valid_token_accuracy": 0.0},
        {"kind": "train", "step": 1, "train_loss": 2.0, "train_token_accuracy": 0.5},
        {"kind": "train", "step": 2, "train_loss": 1.0, "train_token_accuracy": 0.75},
        {"kind": "eval", "step": 2, "valid_loss": 1.5, "valid_token_accuracy": 0.6},
    ]).decode()
    assert text.splitlines() == [",".join(RESULT_COLUMNS), "1,2.0,0.5,,", "2,1.0,0.75,1.5,0.6"]
