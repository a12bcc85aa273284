"""The fine-tuning step of a run: a configuration's loop settings and objective, the loop, and
the adapter and merged model it leaves.

``fine_tune`` is what ``tunesmith run`` calls between encoding the data and assessing the
result; a trial, a federated client or a test calls it alone, with its own objective,
wrappers and callbacks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import ResolvedHyperparameters, RunConfig
from tunesmith.data.encode import Encoded, encode_prompt
from tunesmith.errors import ConfigError
from tunesmith.evaluation.forgetting import (
    GENERAL_PROMPTS_FILE,
    general_text_dir,
    read_general_prompts,
)
from tunesmith.flows.preference import preference_objective, with_references
from tunesmith.flows.steps import base_dtype, prepare_model_for_training
from tunesmith.models.classifier import load_classifier
from tunesmith.models.load import load_model, onto_stored_base, save_merged
from tunesmith.training.head_scale import ScaledHeadInput, public_feature_rms
from tunesmith.training.loop import TrainResult, train
from tunesmith.training.objectives import ClassifierObjective
from tunesmith.training.privacy import Privacy, PrivacySettings, plan_privacy
from tunesmith.training.setup import LoopSettings, Wrapper

# The name fragment of a classification head's parameters (transformers calls it "score").
HEAD_PARAMETERS = "score."
# Stops that end a run normally; any other reason (a callback's) leaves it unfinished.
FINISHED = ("completed", "early_stopping")


def loop_settings(cfg: RunConfig, hp: ResolvedHyperparameters, *, restore_best: bool = True
                  ) -> LoopSettings:
    """The loop's settings for a run: every field from the configuration and resolved values."""
    t = cfg.train
    return LoopSettings(
        learning_rate=hp.learning_rate, epochs=hp.epochs, batch_size=hp.batch_size,
        total_steps=hp.total_steps, warmup_steps=hp.warmup_steps, eval_every=hp.eval_every,
        # under DP each example is clipped (train.privacy.max_grad_norm) before the noise; a
        # clip of the batch gradient would also log its non-private norm
        weight_decay=t.weight_decay, max_grad_norm=None if t.privacy else t.max_grad_norm,
        early_stopping_patience=t.early_stopping_patience, keep_checkpoints=t.keep_checkpoints,
        best_metric=t.best_metric, optimizer=t.optimizer,
        micro_batch_size=t.micro_batch_size, schedule=t.schedule, layer_lr_decay=t.layer_lr_decay,
        packing=t.packing, pack_capacity=cfg.data.max_length,
        group_by_length=t.group_by_length, precision=t.precision,
        gradient_checkpointing=t.gradient_checkpointing, seed=t.seed,
        eval_batch_size=cfg.eval.batch_size, restore_best=restore_best,
        lr_overrides=(() if hp.head_learning_rate is None
                      else ((HEAD_PARAMETERS, hp.head_learning_rate),)))


def classifier_objective(cfg: RunConfig, train_rows: Sequence[Encoded], n_labels: int,
                         pad_id: int) -> Callable[[Any, str], ClassifierObjective]:
    """The classification-head loss, with inverse-frequency class weights when configured."""
    weights = None
    if cfg.train.class_weights == "balanced":
        counts = torch.bincount(torch.tensor([max(e.labels) for e in train_rows]),
                                minlength=n_labels).float()
        weights = counts.sum() / (n_labels * counts.clamp(min=1))
    return lambda model, precision: ClassifierObjective(
        model, pad_id=pad_id, precision=precision, class_weights=weights,
        packing=cfg.train.packing, pack_capacity=cfg.data.max_length)


def privacy_for(cfg: RunConfig, hp: ResolvedHyperparameters, n_examples: int) -> Privacy | None:
    """DP-SGD for a run with ``train.privacy`` (checked against the data), else None."""
    p = cfg.train.privacy
    if p is None:
        return None
    settings = PrivacySettings(
        target_epsilon=p.target_epsilon, noise_multiplier=p.noise_multiplier,
        delta=None if p.delta == "auto" else float(p.delta), max_grad_norm=p.max_grad_norm,
        accountant=p.accountant, physical_batch_size=p.physical_batch_size)
    plan = plan_privacy(settings, n_examples=n_examples, batch_size=hp.batch_size,
                        steps=hp.total_steps, epochs=hp.epochs)
    return Privacy(plan, seed=cfg.train.seed)


def scaled_head_input(cfg: RunConfig, model: Any, tokenizer: Any) -> ScaledHeadInput | None:
    """A new classification head trains on its input scaled by public prompts' feature RMS
    (``training.head_scale``) with ``train.head_input_scale`` 'public', or 'auto' under DP;
    None where it does not."""
    mode = cfg.train.head_input_scale
    if mode == "none" or (mode == "auto" and cfg.train.privacy is None):
        return None
    return ScaledHeadInput(model, public_scale(model, tokenizer))


def public_scale(model: Any, tokenizer: Any) -> torch.Tensor:
    """The head input's feature RMS over the general prompts shipped with tunesmith."""
    prompts = read_general_prompts(general_text_dir() / GENERAL_PROMPTS_FILE)
    return public_feature_rms(model, [encode_prompt(tokenizer, m) for m in prompts])


def write_privacy_card(summary: dict[str, Any], *directories: Path) -> None:
    """``privacy.json`` beside the weights it describes."""
    text = json.dumps(summary, indent=2) + "\n"
    for directory in directories:
        if directory.is_dir():
            (directory / "privacy.json").write_text(text, encoding="utf-8")


@dataclass
class FineTuned:
    """The trained model (merged, ready to evaluate) and what the loop reported."""

    model: Any
    result: TrainResult
    privacy: dict[str, Any] | None = None  # (epsilon, delta) spent and the mechanism, under DP

    @property
    def finished(self) -> bool:
        return self.result.stop_reason in FINISHED


def fine_tune(cfg: RunConfig, run_dir: Path, model: Any, model_dir: Path, tokenizer: Any, *,
              train_rows: Sequence[Any], valid_rows: Sequence[Any],
              hp: ResolvedHyperparameters, labels: list[str] | None,
              callbacks: Sequence[Any] = (), resume: bool = False,
              make_objective: Callable[[Any, str], Any] | None = None,
              wrappers: Sequence[Wrapper] = (), restore_best: bool = True,
              save: bool = True, privacy: Privacy | None = None, main: bool = True
              ) -> FineTuned:
    """Train adapters (or all weights, or a classification head); save adapter and merged.

    ``make_objective`` replaces the configured objective (LM loss, or the classifier's);
    ``wrappers`` may replace any part before the loop starts. With ``train.privacy`` the run
    trains under ``privacy`` (``privacy_for``'s plan; made here when not given). A run
    stopped by a callback (not by early stopping) saves its checkpoint but no adapter or
    merged model; with ``save=False`` (a search trial) nothing but checkpoints is written,
    and the returned model is the trained one, adapters unmerged. ``main=False`` (a process
    other than a distributed run's main one, under torchrun) trains alike but writes nothing:
    the loop's main process writes the checkpoints, ``run``'s main process the rest.
    """
    classifier = cfg.train.head == "classifier"

    def load_base(dtype: str) -> Any:
        """The base as this run trains it: the causal LM, or with a new classification head."""
        if classifier:
            return load_classifier(model_dir, labels, pad_token_id=tokenizer.pad_token_id,
                                   dtype=dtype, seed=cfg.train.seed)
        return load_model(model_dir, dtype=dtype)

    if classifier:
        if not labels:
            raise ConfigError("train.head: classifier needs the classification labels")
        del model  # the causal LM; the classifier is loaded from the same weights
        model = load_base(base_dtype(cfg))
        make_objective = make_objective or classifier_objective(
            cfg, train_rows, len(labels), tokenizer.pad_token_id)
    elif cfg.train.objective != "sft":
        # the reference is the model as loaded, before any adapter or update
        rows = with_references(cfg, run_dir, model, {"train": train_rows, "validation":
                                                     valid_rows}, pad_id=tokenizer.pad_token_id,
                               batch_size=cfg.eval.batch_size, write=main)
        train_rows, valid_rows = rows["train"], rows["validation"]
        make_objective = make_objective or preference_objective(cfg, hp, tokenizer.pad_token_id)
    privacy = privacy or privacy_for(cfg, hp, len(train_rows))
    if privacy is not None:
        wrappers = [*wrappers, privacy.wrap]
    model = prepare_model_for_training(model, cfg)
    scaled = scaled_head_input(cfg, model, tokenizer) if classifier else None
    result = train(model, train_rows, valid_rows,
                   settings=loop_settings(cfg, hp, restore_best=restore_best),
                   pad_id=tokenizer.pad_token_id, checkpoint_dir=run_dir / "checkpoints",
                   callbacks=callbacks, resume=resume, make_objective=make_objective,
                   wrappers=wrappers)
    if scaled is not None:  # the best step's head is restored by now: back to a plain head
        scaled.fold()
    done = FineTuned(model, result, privacy.summary() if privacy is not None else None)
    if not done.finished or not save or not main:
        return done
    if cfg.train.method == "lora":
        model.save_pretrained(run_dir / "adapter")
        model = onto_stored_base(model, model_dir, load_base)
    done.model = save_merged(model, tokenizer, run_dir / "merged")
    if done.privacy is not None:
        write_privacy_card(done.privacy, run_dir / "adapter", run_dir / "merged")
    return done
