"""Distil a finished run's tuned model into a student with fewer layers.

The steps: make the student (``layers`` of the tuned model's blocks, evenly spaced, with
their weights); measure its KL from the tuned model on the run's validation split; train all
of its weights on the run's training split with the distillation loss (the tuned model as the
frozen teacher, ``retrain``'s loop and policies); measure the KL again. The student comes back
in memory with what was done; the caller saves it.

    from tunesmith.flows.distill import distil
    student, built = distil(done, tuned, tokenizer, folder, layers=4, steps=200)
    print(built["distil"]["held_out_kl_before"], built["distil"]["held_out_kl_after"])
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.flows.finished import FinishedRun
from tunesmith.flows.retrain import retrain, retrain_config
from tunesmith.flows.steps import encode_examples, training_encoder
from tunesmith.models.student import decoder_layers, keep_layers, make_student
from tunesmith.training.distill import check_distillation, distill_objective, held_out_kl


def distil(done: FinishedRun, tuned: Any, tokenizer: Any, folder: Path, *, layers: int,
           steps: int, temperature: float = 2.0, weight: float = 0.5,
           learning_rate: float | None = None, console: Console | None = None,
           show_progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """A student of ``layers`` blocks trained for ``steps`` steps on ``weight * T^2 *
    KL(tuned || student) + (1 - weight) * CE`` at temperature ``T``; ``metrics.jsonl`` goes to
    ``folder``. Returns the student (not saved) and ``{"distil": {...}}`` for the report: the
    kept blocks, the settings, the held-out KL (at temperature 1, per validation target token,
    per example for a classification head) before and after, and the loop's settings. The
    tuned model's weights are not changed."""
    check_distillation(temperature, weight)
    # the configuration retrain trains with (a preference run's chosen answers, as chats)
    cfg = retrain_config(done, steps=steps, learning_rate=learning_rate)
    teacher_layers = len(decoder_layers(tuned)[1])
    device = next(tuned.parameters()).device
    student = make_student(tuned, layers)  # checks layers against the depth
    pad_id = tokenizer.pad_token_id
    valid, _ = encode_examples(training_encoder(tokenizer, cfg, done.labels),
                               done.split("validation"), max_length=cfg.data.max_length,
                               split="validation")
    before = held_out_kl(tuned, student, valid, pad_id=pad_id)

    def objective(model: Any, precision: str) -> Any:
        # the loop casts the teacher it is given to bf16 in place; the caller's stays as it is
        teacher = copy.deepcopy(tuned) if precision == "bf16" else tuned
        return distill_objective(model, teacher=teacher, head=done.head, pad_id=pad_id,
                                 temperature=temperature, weight=weight, precision=precision,
                                 packing=cfg.train.packing,
                                 pack_capacity=cfg.data.max_length)

    retrained = retrain(done, student, tokenizer, folder, steps=steps,
                        learning_rate=learning_rate, make_objective=objective,
                        console=console, show_progress=show_progress)
    # the loop moves both models to its device; they go back where the tuned model was
    tuned.to(device)
    student.to(device)
    after = held_out_kl(tuned, student, valid, pad_id=pad_id)
    return student, {"distil": {
        "layers": layers, "teacher_layers": teacher_layers,
        "kept": keep_layers(teacher_layers, layers), "temperature": temperature,
        "weight": weight, "held_out_kl_before": _number(before),
        "held_out_kl_after": _number(after), **retrained.settings}}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value  # no validation targets: nothing measured
