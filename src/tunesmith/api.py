"""The public Python API: the flows a user calls. Each reads as the steps of fine-tuning.

    from tunesmith import run
    result = run("examples/sms_spam/config.yaml")
    print(result.tuned["accuracy"])
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import Progress

from tunesmith import assess
from tunesmith.config import (
    DataConfig,
    EvalConfig,
    ResolvedHyperparameters,
    RunConfig,
    dump_config,
    load_config,
    resolve_hyperparameters,
)
from tunesmith.data.encode import Encoded
from tunesmith.data.split import Splits, sample
from tunesmith.errors import DataError, ModelError
from tunesmith.evaluation.task import check_labels
from tunesmith.models.classifier import load_classifier, load_trained_classifier
from tunesmith.models.load import load, load_tokenizer, save_merged
from tunesmith.models.resolve import default_home, resolve_model
from tunesmith.steps import (
    attach_log_file,
    base_dtype,
    classification_labels,
    classifier_objective,
    encode_examples,
    load_splits,
    loop_settings,
    prepare_model_for_training,
    prepare_run_dir,
    read_examples,
    training_encoder,
    write_splits,
)
from tunesmith.training.callbacks import MetricsLog, ProgressBar, read_metrics
from tunesmith.training.loop import TrainResult, train

log = logging.getLogger("tunesmith")


@dataclass
class RunResult:
    """What a finished run produced: where it is, and the base and tuned test metrics."""

    run_dir: Path
    base: dict[str, Any] | None
    tuned: dict[str, Any]
    hyperparameters: ResolvedHyperparameters
    best_step: int | None
    seconds: float
    results: dict[str, Any] = field(default_factory=dict)  # everything in metrics.json


# ----------------------------------------------------------------------------- steps


def run(config: RunConfig | str | Path, *, overwrite: bool = False, resume: bool = False,
        home: Path | None = None, console: Console | None = None, show_progress: bool = True,
        callbacks: Sequence[Any] = ()) -> RunResult:
    """Validate and split the data, fine-tune the base model, evaluate base vs tuned, report.

    ``resume=True`` continues the run in the run directory from its last checkpoint (or starts
    it); ``callbacks`` receive the training events (see ``tunesmith.training.callbacks``).
    """
    started = time.perf_counter()
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    console = console or Console(stderr=True)
    home = home or default_home()
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume)
    handler = attach_log_file(run_dir)
    try:
        return _run(cfg, run_dir, home, console, show_progress, started, resume=resume,
                    extra_callbacks=list(callbacks))
    finally:
        log.removeHandler(handler)
        handler.close()


@dataclass
class _Prepared:
    """What the data phase hands to training: encoded rows and the resolved hyperparameters."""

    train: list[Encoded]
    valid: list[Encoded]
    rejects: list[dict[str, Any]]
    hp: ResolvedHyperparameters


def _prepare(cfg: RunConfig, run_dir: Path, tokenizer: Any, splits: Splits,
             labels: list[str] | None, progress: Progress, say: Callable[[str], None],
             rejects: list[dict[str, Any]]) -> _Prepared:
    """Encode, leaving out what cannot be trained on; resolve 'auto'; write config.yaml.

    ``rejects`` (rows the data phase left out) and the rows left out here go to rejects.jsonl.
    """
    encode = training_encoder(tokenizer, cfg, labels)
    train_enc, more = encode_examples(encode, splits.train, max_length=cfg.data.max_length,
                                      split="train", progress=progress)
    rejects = rejects + more
    # the validation loss runs every eval_every steps: a capped sample keeps that cheap
    valid_for_loss = sample(splits.validation, cfg.data.max_validation_examples,
                            seed=cfg.train.seed,
                            labels=[e.label for e in splits.validation] if labels else None)
    valid_enc, more = encode_examples(encode, valid_for_loss,
                                      max_length=cfg.data.max_length, split="validation",
                                      progress=progress)
    rejects += more
    if rejects:
        with (run_dir / "rejects.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rejects)
        say(f"left out {len(rejects)} example(s); reasons in {run_dir / 'rejects.jsonl'}")
    if not train_enc:
        raise DataError("no training example fits data.max_length; raise it",
                        path=cfg.data.train_file)
    hp = resolve_hyperparameters(cfg.train, len(train_enc))
    resolved = dump_config(cfg)
    resolved["resolved"] = hp.model_dump()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    say(f"hyperparameters: {hp.epochs} epoch(s), batch {hp.batch_size}, "
        f"lr {hp.learning_rate:.2e}, {hp.total_steps} steps")
    return _Prepared(train_enc, valid_enc, rejects, hp)


def _advance(progress: Progress, title: str, total: int) -> Callable[[int], None]:
    task = progress.add_task(title, total=total)
    return lambda n: progress.advance(task, n)


def _base_eval(cfg: RunConfig, run_dir: Path, model: Any, tokenizer: Any, test: list,
               labels: list[str] | None, progress: Progress, resume: bool
               ) -> assess.ModelEval | None:
    """The base model on the test set, before any training (kept on disk for --resume)."""
    if not cfg.eval.compare_base:
        return None
    path = run_dir / "base_eval.json"
    found = assess.load_model_eval(path) if resume else None
    if found is None:
        found = assess.evaluate_lm(model, tokenizer, test, cfg.eval, labels,
                                   _advance(progress, "evaluating base", len(test)),
                                   score_labels=False)
        assess.save_model_eval(path, found)
    log.info("base model on the test set: %s", json.dumps(found.metrics))
    return found


def _fine_tune(cfg: RunConfig, run_dir: Path, model: Any, model_dir: Path, tokenizer: Any,
               prepared: _Prepared, labels: list[str] | None, callbacks: list[Any],
               resume: bool) -> tuple[Any, TrainResult]:
    """Train adapters (or all weights, or a classification head); save adapter and merged."""
    classifier = cfg.train.head == "classifier"
    if classifier:
        del model  # the causal LM; the classifier is loaded from the same weights
        model = load_classifier(model_dir, labels, pad_token_id=tokenizer.pad_token_id,
                                dtype=base_dtype(cfg))
    model = prepare_model_for_training(model, cfg)
    result = train(
        model, prepared.train, prepared.valid, settings=loop_settings(cfg, prepared.hp),
        pad_id=tokenizer.pad_token_id, checkpoint_dir=run_dir / "checkpoints",
        callbacks=callbacks, resume=resume,
        make_loss=classifier_objective(cfg, prepared.train, len(labels)) if classifier else None)
    if cfg.train.method == "lora":
        model.save_pretrained(run_dir / "adapter")
    return save_merged(model, tokenizer, run_dir / "merged"), result


def _run(cfg: RunConfig, run_dir: Path, home: Path, console: Console, show_progress: bool,
         started: float, *, resume: bool, extra_callbacks: list[Any]) -> RunResult:
    def say(msg: str) -> None:
        log.info(msg)
        console.print(msg)

    ev, head = cfg.eval, cfg.train.head == "classifier"
    # 1. data: read, validate, clean, split
    data_rejects: list[dict[str, Any]] = []
    splits = load_splits(cfg, data_rejects)
    labels = classification_labels(cfg, splits)
    say(f"data: {len(splits.train)} train, {len(splits.validation)} validation, "
        f"{len(splits.test)} test examples")
    write_splits(run_dir / "data", splits)

    # 2. the base model
    model_dir = resolve_model(cfg.model.base, home=home)
    say(f"base model: {cfg.model.base} ({model_dir})")
    dtype = base_dtype(cfg)
    model, tokenizer = load(model_dir, dtype=dtype)

    with Progress(console=console, disable=not show_progress) as progress:
        # 3. encode and resolve the hyperparameters
        prepared = _prepare(cfg, run_dir, tokenizer, splits, labels, progress, say,
                            data_rejects)
        # 4. the base model on the test set and on general text, before any training
        base = _base_eval(cfg, run_dir, model, tokenizer, splits.test, labels, progress, resume)
        snapshot = assess.forgetting_snapshot(model, tokenizer, ev) \
            if ev.forgetting and not head else None

    # 5. fine-tune, save the adapter and the merged model
    model, result = _fine_tune(
        cfg, run_dir, model, model_dir, tokenizer, prepared, labels,
        [MetricsLog(run_dir / "metrics.jsonl"), ProgressBar(console, enabled=show_progress),
         *extra_callbacks], resume)
    say(f"training: best validation loss {result.state.best_valid_loss:.4f} at step "
        f"{result.state.best_step}" + (" (stopped early)" if result.state.stopped_early else ""))

    # 6. evaluate what was saved: test set, calibration, forgetting
    with Progress(console=console, disable=not show_progress) as progress:
        advance = _advance(progress, "evaluating tuned", len(splits.test))
        tuned = assess.evaluate_head(model, tokenizer, splits.test, ev, labels, advance) \
            if head else assess.evaluate_lm(model, tokenizer, splits.test, ev, labels, advance)
        log.info("tuned model on the test set: %s", json.dumps(tuned.metrics))
        cal = None
        if labels and ev.calibration and splits.validation:
            valid_lp = assess.validation_log_probs(model, tokenizer, splits.validation, labels,
                                                   head=head, batch_size=ev.batch_size)
            cal = assess.calibration(valid_lp, splits.validation, tuned, splits.test, labels,
                                     run_dir / "merged")
        forgetting = assess.compare_snapshots(
            snapshot, assess.forgetting_snapshot(model, tokenizer, ev),
            max_perplexity_ratio=ev.max_perplexity_ratio, max_kl=ev.max_kl
        ).to_dict() if snapshot is not None else None
    if forgetting and forgetting["warning"]:
        console.print(f"warning: {forgetting['warning']}", style="yellow")

    # 7. report
    seconds = time.perf_counter() - started
    records = read_metrics(run_dir / "metrics.jsonl")
    stats, lengths = assess.length_stats(tokenizer, {"train": splits.train,
                                                     "test": splits.test})
    results = assess.assemble(
        name=cfg.name or run_dir.name, model=cfg.model.base, ev=ev, labels=labels,
        data_counts={"train": len(prepared.train), "validation": len(splits.validation),
                     "validation loss sample": len(prepared.valid),
                     "test": len(splits.test), "left out": len(prepared.rejects)},
        token_lengths=stats, hyperparameters=prepared.hp.model_dump(),
        training={"best_step": result.state.best_step,
                  "best_valid_loss": result.state.best_valid_loss,
                  "stopped_early": result.state.stopped_early,
                  "tokens_seen": result.state.tokens_seen, "precision": result.precision,
                  "seconds": round(seconds, 1)},
        test=splits.test, base=base, tuned=tuned, calibration_result=cal,
        forgetting=forgetting, records=records)
    assess.write_run_results(run_dir, results, records, lengths, cfg.data.max_length)
    say(f"run directory: {run_dir}")
    return RunResult(run_dir=run_dir, base=base.metrics if base else None, tuned=tuned.metrics,
                     hyperparameters=prepared.hp, best_step=result.state.best_step,
                     seconds=seconds, results=results)


def _run_config(run_dir: Path) -> RunConfig | None:
    """The configuration a run directory was trained with, if it is one."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    from tunesmith.config import parse_config

    resolved = yaml.safe_load(path.read_text())
    resolved.pop("resolved", None)
    return parse_config(resolved, source=str(path))


def evaluate(model: str, test_file: str | Path, *, base: str | None = None,
             output_dir: str | Path | None = None, eval_config: EvalConfig | None = None,
             home: Path | None = None, console: Console | None = None,
             show_progress: bool = True) -> dict[str, Any]:
    """Evaluate a model (a run directory or a model reference) on a chat JSONL test file.

    For a run directory the base model, task and labels default to the run's; the results
    (the same ``metrics.json``, ``report.md`` and ``report.html`` as a run) go to
    ``output_dir`` (default: ``<run>/eval-<test file name>``). Returns the results dict.
    """
    home = home or default_home()
    console = console or Console(stderr=True)
    run_cfg = _run_config(Path(model)) if Path(model).is_dir() else None
    ev = eval_config or (run_cfg.eval if run_cfg else EvalConfig())
    base = base if base is not None else (run_cfg.model.base if run_cfg else None)
    # the same reader as a run (any supported format, the run's column settings); a bad test
    # row always stops the evaluation, since no rejects file is kept here
    read = (run_cfg.data if run_cfg else DataConfig(train_file=Path(test_file))).model_copy(
        update={"on_error": "raise"})
    test = read_examples(Path(test_file), read, rejects=[])
    labels = None
    if ev.task == "classification":
        labels = ev.labels or sorted({ex.label for ex in test})
        check_labels(test, labels, "test")
    out = Path(output_dir) if output_dir else (
        Path(model) / f"eval-{Path(test_file).stem}" if run_cfg else Path("runs") / "eval")
    out.mkdir(parents=True, exist_ok=True)
    head = run_cfg is not None and run_cfg.train.head == "classifier"
    with Progress(console=console, disable=not show_progress) as progress:
        base_eval = None
        if base is not None and ev.compare_base:
            b_model, b_tok = load(resolve_model(base, home=home))
            base_eval = assess.evaluate_lm(b_model, b_tok, test, ev, labels,
                                           _advance(progress, "evaluating base", len(test)),
                                           score_labels=False)
            del b_model
        path = resolve_model(model, home=home)
        advance = _advance(progress, "evaluating model", len(test))
        if head:
            tuned = assess.evaluate_head(load_trained_classifier(path), load_tokenizer(path),
                                         test, ev, labels, advance)
        else:
            m, tok = load(path)
            tuned = assess.evaluate_lm(m, tok, test, ev, labels, advance)
    results = assess.assemble(
        name=f"{Path(model).name} on {Path(test_file).name}", model=base or model, ev=ev,
        labels=labels, data_counts={"test": len(test)}, token_lengths={},
        hyperparameters={}, training={}, test=test, base=base_eval, tuned=tuned,
        calibration_result=None, forgetting=None, records=[])
    assess.write_run_results(out, results, [], {}, 0)
    log.info("evaluation written to %s", out)
    results["output_dir"] = str(out)
    return results


def load_for_chat(model: str, *, home: Path | None = None) -> tuple[Any, Any]:
    """Model and tokenizer for chatting: a model reference or a finished run directory."""
    path = resolve_model(model, home=home or default_home())
    config = json.loads((path / "config.json").read_text())
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise ModelError(f"{path}: this model has a classification head; it labels text and "
                         "cannot chat. Chat with a run trained with train.head: lm")
    return load(path)


def load_checkpoint_for_chat(run_dir: Path, step: int, *, home: Path | None = None
                             ) -> tuple[Any, Any]:
    """Model and tokenizer of checkpoint ``step-N`` of a run: the base model plus its adapter."""
    from tunesmith.training.checkpoint import load_weights
    from tunesmith.training.loop import load_trainable

    cfg = _run_config(Path(run_dir))
    if cfg is None:
        raise ModelError(f"{run_dir}: not a tunesmith run directory (no config.yaml)")
    model, tokenizer = load(resolve_model(cfg.model.base, home=home or default_home()),
                            dtype=base_dtype(cfg))
    model = prepare_model_for_training(model, cfg)
    load_trainable(model, load_weights(Path(run_dir) / "checkpoints" / f"step-{step}"))
    model.eval()
    return model, tokenizer


def chat(model: str, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 256,
         temperature: float = 0.0, home: Path | None = None, loaded: tuple[Any, Any] | None = None
         ) -> str:
    """The model's reply to a conversation (``[{"role": "user", "content": ...}]``)."""
    from tunesmith.evaluation.generate import generate

    m, tok = loaded or load_for_chat(model, home=home)
    return generate(m, tok, [list(messages)], max_new_tokens=max_new_tokens,
                    temperature=temperature, batch_size=1)[0]
