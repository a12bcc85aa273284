"""Which step is best: the lowest validation loss, or a classifier's best validation metric."""

import math

import pytest

from tunesmith.training.checkpoint import TrainState
from tunesmith.training.policies import EarlyStopping, Evaluation


class ScriptedLoop:
    """A loop whose evaluations return the scripted metrics, one per call, in order."""

    def __init__(self, script):
        self.state, self.script, self.seen, self.stopped = TrainState(), list(script), [], None
        outer = self

        class Control:
            def stop(self, reason):
                outer.stopped = reason

        self.control, self.total_steps = Control(), len(script) - 1

    def evaluate(self, data, *, batch_size):
        return self.script.pop(0)

    def emit(self, event, metrics):
        self.seen.append(metrics)
        for c in self.callbacks:
            getattr(c, event, lambda *a: None)(self, metrics)


def run(script, metric, patience=None):
    loop = ScriptedLoop(script)
    evaluation = Evaluation([object()], every=1, batch_size=1, metric=metric)
    loop.callbacks = [EarlyStopping(patience)]
    evaluation.on_train_begin(loop)
    for step in range(1, len(script)):
        if loop.stopped:
            break
        loop.state.step = step
        evaluation.on_step(loop, {})
    return loop


# step:              0     1     2     3     4
LOSS = [0.90, 0.20, 0.60, 0.45, 0.30]
F1 = [0.45, 0.80, 0.95, 0.95, 0.90]


def scripted():
    return [{"valid_loss": v, "valid_macro_f1": f} for v, f in zip(LOSS, F1, strict=True)]


def test_loss_picks_the_lowest_validation_loss():
    loop = run(scripted(), "loss")
    assert loop.state.best_step == 1 and loop.state.best_valid_loss == 0.20
    assert loop.state.best_score == 0.20
    assert [m["best_step"] for m in loop.seen] == [0, 1, 1, 1, 1]


def test_macro_f1_picks_the_highest_and_a_tie_goes_to_the_lower_loss():
    loop = run(scripted(), "macro_f1")
    # steps 2 and 3 tie on F1; step 3 has the lower loss
    assert loop.state.best_step == 3
    assert loop.state.best_score == 0.95 and loop.state.best_valid_loss == 0.45
    assert [m["best_step"] for m in loop.seen] == [0, 1, 2, 3, 3]


def test_early_stopping_waits_on_the_chosen_metric():
    # by loss, steps 2-4 are no better than step 1: patience 3 stops at step 4...
    loop = run([*scripted(), {"valid_loss": 0.9, "valid_macro_f1": 0.1}], "loss", patience=3)
    assert loop.stopped == "early_stopping" and loop.state.stopped_early
    assert loop.state.step == 4 < loop.total_steps
    # ...unless step 4 is the run's last: that is the end of the run, not an early stop
    loop = run(scripted(), "loss", patience=3)
    assert loop.stopped is None and not loop.state.stopped_early and loop.state.step == 4
    # by F1, step 2 and 3 improve: three evaluations without a better one never come
    assert run(scripted(), "macro_f1", patience=3).stopped is None


def test_a_metric_the_objective_does_not_report_is_named():
    with pytest.raises(ValueError, match="valid_macro_f1.*valid_loss"):
        run([{"valid_loss": 1.0}], "macro_f1")


def test_a_nan_evaluation_never_becomes_best_after_the_first():
    script = [{"valid_loss": math.nan, "valid_macro_f1": 0.5},
              {"valid_loss": 0.5, "valid_macro_f1": 0.6},
              {"valid_loss": math.nan, "valid_macro_f1": 0.9}]
    loop = run(script, "macro_f1")
    assert loop.state.best_step == 1  # step 0's NaN loss is beaten; step 2's NaN is not best


def test_a_checkpoint_from_before_best_score_resumes_on_its_loss():
    loop = ScriptedLoop([{"valid_loss": 0.5}])
    loop.callbacks = []
    loop.state = TrainState(step=4, best_valid_loss=0.3, best_step=2)  # no best_score saved
    Evaluation([object()], every=1, batch_size=1).on_step(loop, {})
    assert loop.state.best_step == 2 and loop.state.evals_without_improvement == 1
