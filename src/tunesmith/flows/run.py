"""``run``: data -> base model -> fine-tune -> evaluate -> report, as one flow.

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

from tunesmith.config import (
    ResolvedHyperparameters,
    RunConfig,
    dump_config,
    load_config,
    resolve_hyperparameters,
)
from tunesmith.data.encode import Encoded
from tunesmith.data.records import as_chat, example_label
from tunesmith.data.rejects import Rejected, write_rejects
from tunesmith.data.split import Splits, sample
from tunesmith.errors import DataError
from tunesmith.evaluation.checks import training_warnings
from tunesmith.flows import assess, preference
from tunesmith.flows.data_checks import check_data
from tunesmith.flows.energy import EnergyMeter
from tunesmith.flows.finetune import fine_tune, privacy_for
from tunesmith.flows.logs import attach_log_file, detach_log_file
from tunesmith.flows.steps import (
    advance_task,
    base_dtype,
    check_system_role,
    classification_labels,
    encode_examples,
    load_splits,
    prepare_run_dir,
    training_encoder,
    write_splits,
)
from tunesmith.models.load import check_quantization, load
from tunesmith.models.resolve import default_home, resolve_model
from tunesmith.training.callbacks import MetricsLog, ProgressBar, read_metrics
from tunesmith.training.privacy import Privacy
from tunesmith.training.processes import processes, wait_for_main

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
    stopped: str | None = None  # a callback's reason, when one stopped training before the end
    # False in the other processes of a distributed run (torchrun): they train, and leave the
    # evaluation, the merged model and the report (``tuned`` stays empty) to the main process
    main_process: bool = True


# ----------------------------------------------------------------------------- steps


def run(config: RunConfig | str | Path, *, overwrite: bool = False, resume: bool = False,
        home: Path | None = None, console: Console | None = None, show_progress: bool = True,
        callbacks: Sequence[Any] = ()) -> RunResult:
    """Validate and split the data, fine-tune the base model, evaluate base vs tuned, report.

    ``resume=True`` continues the run in the run directory from its last checkpoint (or starts
    it); ``callbacks`` receive the training events (see ``tunesmith.training.callbacks``).

    Under torchrun (one or more nodes) every process runs this flow and trains its share of
    each batch; only the main process (global rank 0) writes the run directory, evaluates and
    reports. The others return when it is done, with ``main_process=False``.
    """
    started = time.perf_counter()
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    console = console or Console(stderr=True)
    home = home or default_home()
    group = processes()  # under torchrun, this joins the run's other processes
    main_done = wait_for_main(group)
    # an unknown or broken base model fails here, before any data is read or a run dir made
    model_dir = resolve_model(cfg.model.base, home=home)
    check_quantization(cfg.train.quantize_base)  # QLoRA where no GPU is: before anything
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume, group=group)
    main = group.is_main_process  # of the whole run, not of each node: one writer
    handler = attach_log_file(run_dir) if main else None
    try:
        result = _run(cfg, run_dir, model_dir, console, show_progress and main, started,
                      resume=resume, extra_callbacks=list(callbacks), main=main)
    finally:
        if handler is not None:
            detach_log_file(handler)
    main_done()  # the others wait here while the main process evaluates and reports
    return result


@dataclass
class Prepared:
    """What the data phase hands to training: encoded rows and the resolved hyperparameters."""

    train: list[Encoded]
    valid: list[Encoded]
    rejects: list[Rejected]
    hp: ResolvedHyperparameters
    privacy: Privacy | None = None  # DP planned against the encoded data (train.privacy)


@dataclass
class Headless:
    """What a training without a screen needs (a tuning trial, a federated client's round):
    the base model and its tokenizer, the splits, the labels and the prepared data."""

    model: Any
    model_dir: Path
    tokenizer: Any
    splits: Splits
    labels: list[str] | None
    prepared: Prepared


def prepare_headless(cfg: RunConfig, out_dir: Path, home: Path, *,
                     carve_test: bool = True) -> Headless:
    """Resolve and load the base model, read and split the data (no test split) and prepare it
    as ``run`` does, logging instead of drawing progress. ``carve_test``: see ``load_splits``."""
    model_dir = resolve_model(cfg.model.base, home=home)
    check_quantization(cfg.train.quantize_base)
    rejects: list[Rejected] = []
    splits = load_splits(cfg, rejects, with_test=False, carve_test=carve_test)
    labels = classification_labels(cfg, splits)
    model, tokenizer = load(model_dir, dtype=base_dtype(cfg), quantize=cfg.train.quantize_base)
    with Progress(disable=True) as progress:
        prepared = prepare_training(cfg, out_dir, tokenizer, splits, labels, progress,
                                    log.info, rejects)
    return Headless(model, model_dir, tokenizer, splits, labels, prepared)


def prepare_training(cfg: RunConfig, run_dir: Path, tokenizer: Any, splits: Splits,
                     labels: list[str] | None, progress: Progress, say: Callable[[str], None],
                     rejects: list[Rejected], *, write: bool = True) -> Prepared:
    """Encode, leaving out what cannot be trained on; resolve 'auto'; write config.yaml.

    ``rejects`` (rows the data phase left out) and the rows left out here go to rejects.jsonl.
    ``write=False`` (a process other than a distributed run's main one) writes neither.
    """
    encode = training_encoder(tokenizer, cfg, labels)
    train_enc, more = encode_examples(encode, splits.train, max_length=cfg.data.max_length,
                                      split="train", progress=progress)
    rejects = rejects + more
    # the validation loss runs every eval_every steps: a capped sample keeps that cheap
    valid_for_loss = sample(splits.validation, cfg.data.max_validation_examples,
                            seed=cfg.train.seed,
                            labels=[example_label(e) for e in splits.validation]
                            if labels else None)
    valid_enc, more = encode_examples(encode, valid_for_loss,
                                      max_length=cfg.data.max_length, split="validation",
                                      progress=progress)
    rejects += more
    written = write_rejects(run_dir / "rejects.jsonl", rejects) if write else None
    if written:
        say(f"left out {len(rejects)} example(s); reasons in {written}")
    if not train_enc:
        raise DataError("no training example fits data.max_length; raise it",
                        path=cfg.data.train_file)
    hp = resolve_hyperparameters(cfg.train, len(train_enc))
    privacy = privacy_for(cfg, hp, len(train_enc))  # DP that cannot work fails here, not later
    if write:
        resolved = dump_config(cfg)
        resolved["resolved"] = hp.model_dump()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    say(f"hyperparameters: {hp.epochs} epoch(s), batch {hp.batch_size}, "
        f"lr {hp.learning_rate:.2e}, {hp.total_steps} steps")
    return Prepared(train_enc, valid_enc, rejects, hp, privacy)


def base_eval(cfg: RunConfig, run_dir: Path, model: Any, tokenizer: Any, test: list,
              labels: list[str] | None, progress: Progress, resume: bool, *, write: bool = True
              ) -> assess.ModelEval | None:
    """The base model on the test set, before any training (kept on disk for --resume, by the
    process that ``write``s the run directory)."""
    if not cfg.eval.compare_base:
        return None
    path = run_dir / "base_eval.json"
    found = assess.load_model_eval(path) if resume else None
    if found is None:
        found = assess.evaluate_lm(model, tokenizer, test, cfg.eval, labels,
                                   advance_task(progress, "evaluating base", len(test)),
                                   score_labels=False)
        if write:
            assess.save_model_eval(path, found)
    log.info("base model on the test set: %s", json.dumps(found.metrics))
    return found


def _run(cfg: RunConfig, run_dir: Path, model_dir: Path, console: Console, show_progress: bool,
         started: float, *, resume: bool, extra_callbacks: list[Any], main: bool = True
         ) -> RunResult:
    # Every process of a distributed run computes the same steps up to training (its data
    # decides what is trained on; a process waiting alone for the base evaluation of another
    # could run into the collective timeout); only the main one (``main``) writes.
    def say(msg: str) -> None:
        log.info(msg)
        console.print(msg)

    ev, head = cfg.eval, cfg.train.head == "classifier"
    meter = EnergyMeter(cfg.energy)  # kWh and CO2e of training and evaluation
    # 1. data: read, validate, clean, split
    data_rejects: list[Rejected] = []
    splits = load_splits(cfg, data_rejects)
    labels = classification_labels(cfg, splits)
    # pairs are evaluated on their task as the chat example of their preferred answer
    test = [as_chat(e) for e in splits.test]
    valid_chat = [as_chat(e) for e in splits.validation]
    say(f"data: {len(splits.train)} train, {len(splits.validation)} validation, "
        f"{len(splits.test)} test examples")

    # 2. the base model
    say(f"base model: {cfg.model.base} ({model_dir})")
    dtype = base_dtype(cfg)
    model, tokenizer = load(model_dir, dtype=dtype, quantize=cfg.train.quantize_base)
    folded = check_system_role(tokenizer, cfg.data, splits)
    if folded:
        say(folded)

    # 2b. the data's own checks: bias per group field, suspected wrong labels (as configured)
    with Progress(console=console, disable=not show_progress) as progress:
        checks = check_data(cfg, run_dir, splits, model, tokenizer, advance=advance_task(
            progress, "checking labels", len(splits.train))
            if cfg.data.label_issues != "off" else None, write=main)
    splits, data_rejects = checks.splits, data_rejects + checks.rejects
    found = checks.results.get("label_issues")
    if found:
        say(f"label check: {found['found']} suspected wrong label(s) in the training split "
            f"({found['action']}); see {run_dir / found['file']}")
    for text in checks.warnings:
        log.warning(text)
        console.print(f"warning: {text}", style="yellow")
    if main:
        write_splits(run_dir / "data", splits)

    with Progress(console=console, disable=not show_progress) as progress:
        # 3. encode and resolve the hyperparameters
        prepared = prepare_training(cfg, run_dir, tokenizer, splits, labels, progress, say,
                                    data_rejects, write=main)
        # 4. the base model on the test set and on general text, before any training
        with meter.phase("evaluation"):
            base = base_eval(cfg, run_dir, model, tokenizer, test, labels, progress, resume,
                             write=main)
            held = preference.held_out(cfg, run_dir, model, tokenizer, splits, prepared.hp,
                                       write=main) if preference.is_preference(cfg) else None
            snapshot = assess.forgetting_snapshot(model, tokenizer, ev) \
                if ev.forgetting and not head else None

    # 5. fine-tune, save the adapter and the merged model
    with meter.phase("training"):
        tuned_run = fine_tune(
            cfg, run_dir, model, model_dir, tokenizer, train_rows=prepared.train,
            valid_rows=prepared.valid, hp=prepared.hp, labels=labels, resume=resume,
            privacy=prepared.privacy, main=main,
            callbacks=[*([MetricsLog(run_dir / "metrics.jsonl"),
                          ProgressBar(console, enabled=show_progress)] if main else []),
                       *extra_callbacks])
    model, result = tuned_run.model, tuned_run.result
    if not main:
        # the main process evaluates, merges and reports alone: nothing after this point is a
        # collective, so it never waits for the others (they wait for it, in ``run``)
        return RunResult(run_dir=run_dir, base=None, tuned={}, hyperparameters=prepared.hp,
                         best_step=result.state.best_step,
                         seconds=time.perf_counter() - started, main_process=False,
                         stopped=None if tuned_run.finished else result.stop_reason)
    if not tuned_run.finished:
        say(f"training stopped at step {result.state.step} ({result.stop_reason}); "
            "checkpoints kept, --resume continues")
        return RunResult(run_dir=run_dir, base=base.metrics if base else None, tuned={},
                         hyperparameters=prepared.hp, best_step=result.state.best_step,
                         seconds=time.perf_counter() - started, stopped=result.stop_reason)
    by = cfg.train.best_metric
    chosen = "" if by == "loss" else f"{by} {result.state.best_score:.4f}, "
    say(f"training: best validation {chosen}loss {result.state.best_valid_loss:.4f} at step "
        f"{result.state.best_step}" + (" (stopped early)" if result.state.stopped_early else ""))

    # 6. evaluate what was saved: test set, calibration, forgetting
    with meter.phase("evaluation"), Progress(console=console,
                                             disable=not show_progress) as progress:
        advance = advance_task(progress, "evaluating tuned", len(test))
        tuned = assess.evaluate_head(model, tokenizer, test, ev, labels, advance) \
            if head else assess.evaluate_lm(model, tokenizer, test, ev, labels, advance)
        log.info("tuned model on the test set: %s", json.dumps(tuned.metrics))
        # per-example predictions, for comparing runs on the same test items (tune --final)
        assess.save_model_eval(run_dir / "tuned_eval.json", tuned)
        cal = None
        if labels and ev.calibration and valid_chat:
            valid_lp = assess.validation_log_probs(model, tokenizer, valid_chat, labels,
                                                   head=head, batch_size=ev.batch_size)
            cal = assess.calibration(valid_lp, valid_chat, tuned, test, labels,
                                     run_dir / "merged")
        forgetting = assess.compare_snapshots(
            snapshot, assess.forgetting_snapshot(model, tokenizer, ev),
            max_perplexity_ratio=ev.max_perplexity_ratio, max_kl=ev.max_kl
        ).to_dict() if snapshot is not None else None
    if forgetting and forgetting["warning"]:
        console.print(f"warning: {forgetting['warning']}", style="yellow")
    warnings = training_warnings(best_step=result.state.best_step, last_step=result.state.step,
                                 predicted=tuned.predictions.predicted if labels else None,
                                 labels=labels)
    for text in warnings:
        log.warning(text)
        console.print(f"warning: {text}", style="yellow")

    # 7. report
    seconds = time.perf_counter() - started
    records = read_metrics(run_dir / "metrics.jsonl")
    stats, lengths = assess.length_stats(tokenizer, {"train": splits.train,
                                                     "test": test})
    results = assess.assemble(
        name=cfg.name or run_dir.name, model=cfg.model.base, ev=ev, labels=labels,
        data_counts={"train": len(prepared.train), "validation": len(splits.validation),
                     "validation loss sample": len(prepared.valid),
                     "test": len(test), "left out": len(prepared.rejects)},
        token_lengths=stats, hyperparameters=prepared.hp.model_dump(),
        training={"best_step": result.state.best_step,
                  "best_valid_loss": result.state.best_valid_loss,
                  "best_metric": cfg.train.best_metric,
                  "stopped_early": result.state.stopped_early,
                  "tokens_seen": result.state.tokens_seen, "precision": result.precision,
                  "device": result.device, "seconds": round(seconds, 1), "warnings": warnings},
        test=test, base=base, tuned=tuned, calibration_result=cal,
        forgetting=forgetting, records=records)
    if tuned_run.privacy is not None:
        results["privacy"] = tuned_run.privacy
    if held is not None:
        results["preference"] = preference.preference_results(cfg, prepared.hp, held, model,
                                                              tokenizer)
    results.update(checks.results)
    results["data_warnings"] = checks.warnings
    results["energy"] = meter.results()
    assess.write_run_results(run_dir, results, records, lengths, cfg.data.max_length)
    say(f"run directory: {run_dir}")
    return RunResult(run_dir=run_dir, base=base.metrics if base else None, tuned=tuned.metrics,
                     hyperparameters=prepared.hp, best_step=result.state.best_step,
                     seconds=seconds, results=results)
