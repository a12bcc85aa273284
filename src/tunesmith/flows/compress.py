"""``compress``: prune, quantise or distil a finished run's tuned model, and measure what it
cost.

    from tunesmith.flows.compress import compress
    result = compress("runs/sms-spam", prune=0.5, method="wanda", steps=100)
    result = compress("runs/sms-spam", distil=True, layers=15)
    print(result.entry["comparison"]["accuracy"])

The steps: check the settings; open the run; build the compressed model in a temporary
directory beside its destination (pruned: input norms from the run's own training examples,
prune, and with ``steps`` fine-tune on the run's training split with the pruned weights held
at zero; int8: quantise as it loads; distilled: a student of some of the tuned model's
layers trained on KL to it plus the task loss, ``flows.distill``), save it; load it back from
disk; compare it with the tuned model (``flows.compress_compare``: the run's own evaluation on
the run's test split, general-text perplexity, latency per item, generation speed); rename
the directory into place (``<run>/compressed/<kind>/``); record the entry in
``<run>/compressed/compression.json`` (and its .md, .html and plot). Anything that fails
before the rename leaves nothing behind.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from tunesmith.compress import quantize as quantization
from tunesmith.compress.prune import (
    check_pattern,
    check_settings,
    input_norms,
    prunable_linears,
)
from tunesmith.compress.prune import prune as prune_model
from tunesmith.data.chat import ChatExample
from tunesmith.data.encode import encode_chat
from tunesmith.data.split import sample
from tunesmith.errors import ConfigError
from tunesmith.flows import compress_report
from tunesmith.flows.compress_compare import compare
from tunesmith.flows.distill import distil as distil_student
from tunesmith.flows.finished import FinishedRun, open_run
from tunesmith.flows.retrain import retrain
from tunesmith.flows.steps import training_encoder
from tunesmith.models.classifier import load_trained_classifier
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.models.student import decoder_layers, keep_layers
from tunesmith.training.distill import check_distillation
from tunesmith.training.sparsity import hold_zeros

log = logging.getLogger("tunesmith")

QUANTIZATIONS = ("int8",)
# Optimiser steps a student trains for unless told otherwise.
DISTIL_STEPS = 200


@dataclass(frozen=True)
class Plan:
    """What to do: prune to ``sparsity`` with ``method`` and ``pattern`` (then, with
    ``steps``, a recovery fine-tune with the mask held), ``quantize``, or distil into a
    student of ``layers`` layers trained for ``steps`` steps."""

    sparsity: float | None
    method: str
    pattern: str
    quantize: str | None
    layers: int | None = None
    steps: int = 0
    learning_rate: float | None = None
    temperature: float = 2.0
    distil_weight: float = 0.5

    @property
    def kind(self) -> str:
        """The output's name: ``wanda-50-unstructured`` (``-ft`` after a recovery
        fine-tune), ``magnitude-50-2of4``, ``int8``, ``distil-15``."""
        if self.quantize:
            return self.quantize
        if self.layers is not None:
            return f"distil-{self.layers}"
        pct = f"{self.sparsity * 100:g}".replace(".", "p")
        return f"{self.method}-{pct}-{self.pattern.replace(':', 'of')}" + (
            "-ft" if self.steps else "")

    def settings(self) -> dict[str, Any]:
        if self.quantize:
            return {"quantize": self.quantize}
        training = {"steps": self.steps, "learning_rate": self.learning_rate}
        if self.layers is not None:
            return {"distil": True, "layers": self.layers, "temperature": self.temperature,
                    "weight": self.distil_weight, **training}
        return {"prune": self.sparsity, "method": self.method, "pattern": self.pattern,
                **(training if self.steps else {})}


def plan(prune: float | None, method: str, pattern: str, quantize: str | None, *,
         distil: bool = False, layers: int | None = None, steps: int | None = None,
         learning_rate: float | None = None, temperature: float = 2.0,
         distil_weight: float = 0.5) -> Plan:
    """The settings checked, every problem at once (``ConfigError``)."""
    chosen = [name for name, on in (("--prune", prune is not None),
                                    ("--quantize", quantize is not None),
                                    ("--distil", distil)) if on]
    if len(chosen) != 1:
        raise ConfigError("give one of: a sparsity to prune to (--prune 0.5), a quantisation "
                          "(--quantize int8) or a student to distil (--distil --layers N)"
                          + (f"; not {' and '.join(chosen)} together" if chosen else ""))
    problems = []
    if steps is not None and steps < (1 if distil else 0):
        problems.append(f"steps {steps}: give " + ("1 or more" if distil else
                                                   "0 (no recovery fine-tune) or more"))
    if learning_rate is not None and not 0 < learning_rate < 1:
        problems.append(f"learning rate {learning_rate}: give a small positive number, e.g. "
                        "5e-5")
    if distil:
        if layers is None:
            problems.append("--distil needs --layers N: how many of the tuned model's layers "
                            "the student keeps")
        elif layers < 1:
            problems.append(f"--layers {layers}: give 1 or more (fewer than the model has)")
        try:
            check_distillation(temperature, distil_weight)
        except ConfigError as e:
            problems += e.problems
    elif layers is not None:
        problems.append("--layers is the student's depth; it goes with --distil")
    if quantize is not None and steps:
        problems.append("--steps trains a pruned model or a student; int8 quantisation has no "
                        "training step")
    if prune is not None:
        try:
            check_settings(prune, method, pattern)
        except ConfigError as e:
            problems += e.problems or [str(e)]
    elif quantize is not None and quantize not in QUANTIZATIONS:
        problems.append(f"quantisation {quantize!r}: this version offers "
                        f"{', '.join(QUANTIZATIONS)} (weight-only)")
    if problems:
        raise ConfigError("cannot compress with these settings", problems)
    return Plan(prune, method, pattern, quantize, layers if distil else None,
                steps if steps is not None else (DISTIL_STEPS if distil else 0),
                learning_rate, temperature, distil_weight)


@dataclass
class CompressResult:
    """Where the compressed model is, and its entry in the run's compression report."""

    output_dir: Path
    kind: str
    entry: dict[str, Any]
    report: Path  # <run>/compressed/compression.json
    seconds: float


def compress(run_dir: Path | str, *, prune: float | None = None, method: str = "wanda",
             pattern: str = "unstructured", quantize: str | None = None,
             distil: bool = False, layers: int | None = None, steps: int | None = None,
             learning_rate: float | None = None, temperature: float = 2.0,
             distil_weight: float = 0.5, output: Path | str | None = None,
             overwrite: bool = False,
             calibration_examples: int = 128, max_test: int | None = None,
             latency_examples: int = 64, console: Console | None = None,
             show_progress: bool = True) -> CompressResult:
    """Prune (``prune`` = sparsity, ``method`` wanda|magnitude, ``pattern`` unstructured|2:4;
    with ``steps`` a recovery fine-tune of that many steps keeps the mask), quantise
    (``quantize="int8"``) or distil (``distil=True``: a student keeping ``layers`` of the
    tuned model's layers, trained ``steps`` steps on ``distil_weight`` x KL to the tuned model
    at ``temperature`` plus the task loss) the run's tuned model, save it to ``output`` (default
    ``<run>/compressed/<kind>``) and compare it with the tuned model on the run's test split
    (``max_test``: a seeded sample of that many items), general-text perplexity and the
    latency of ``latency_examples`` test items one at a time."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    todo = plan(prune, method, pattern, quantize, distil=distil, layers=layers, steps=steps,
                learning_rate=learning_rate, temperature=temperature,
                distil_weight=distil_weight)
    _check_counts(calibration_examples, max_test, latency_examples)
    done = open_run(run_dir)
    out = Path(output) if output else done.run_dir / "compressed" / todo.kind
    source = done.merged.resolve()
    if out.resolve() in (source, *source.parents):
        raise ConfigError(f"{out}: that would replace the tuned model it is made from; give "
                          "another output directory")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or -o another place")
    if todo.quantize and (why := quantization.int8_support()):
        raise ConfigError(f"--quantize int8 cannot run on this machine: {why}")
    tuned, tokenizer = _load(done.merged, head=done.head)
    if todo.sparsity is not None:  # before anything is written
        check_pattern(prunable_linears(tuned), todo.pattern)
    if todo.layers is not None:
        keep_layers(len(decoder_layers(tuned)[1]), todo.layers)
    test = _test_items(done, max_test)

    def say(msg: str) -> None:
        log.info(msg)
        console.print(msg)

    with _staged(out) as tmp:
        say(f"{todo.kind}: compressing {done.merged}")
        built = _build(todo, done, tuned, tokenizer, tmp, calibration_examples,
                       console=console, show_progress=show_progress)
        compressed = _load(tmp, head=done.head)[0]  # evaluate what was saved
        with Progress(console=console, disable=not show_progress) as progress:
            entry = compare(done, todo.kind, {"tuned": (tuned, done.merged),
                                                todo.kind: (compressed, tmp)},
                             tokenizer, test, latency_examples, progress, say)
    entry["compressed"]["path"] = str(out)
    entry.update(kind=todo.kind, settings=todo.settings(), compression=built,
                 output_dir=str(out), max_test=max_test,
                 created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 seconds=round(time.perf_counter() - started, 1))
    report = compress_report.record(done.run_dir / "compressed",
                                    done.config.name or done.run_dir.name, entry)
    say(f"compressed model: {out}; report: {report.with_suffix('.md')}")
    return CompressResult(out, todo.kind, entry, report, entry["seconds"])


def _check_counts(calibration_examples: int, max_test: int | None, latency_examples: int
                  ) -> None:
    problems = []
    if calibration_examples < 1:
        problems.append(f"calibration examples {calibration_examples}: give 1 or more")
    if max_test is not None and max_test < 1:
        problems.append(f"max test items {max_test}: give 1 or more (or leave it out: all)")
    if latency_examples < 0:
        problems.append(f"latency items {latency_examples}: give 0 (no timing) or more")
    if problems:
        raise ConfigError("cannot compress with these settings", problems)


def _load(path: Path, *, head: bool) -> tuple[Any, Any]:
    model = load_trained_classifier(path) if head else load_model(path)
    return model.eval(), load_tokenizer(path)


def _test_items(done: FinishedRun, max_test: int | None) -> list[ChatExample]:
    test = done.split("test")
    if not test:
        raise ConfigError(f"{done.run_dir}: the run's test split is empty; nothing to compare "
                          "the compressed model on")
    return sample(test, max_test, seed=done.config.train.seed,
                  labels=[ex.label for ex in test] if done.labels else None)


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` if the block succeeds and
    removed (with any folder made for it) if it fails."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's is 0700; the model directory is an ordinary one
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first; only while empty
            with suppress(OSError):
                folder.rmdir()
        raise
    if out.exists():  # --overwrite
        shutil.rmtree(out)
    tmp.rename(out)


def _build(todo: Plan, done: FinishedRun, tuned: Any, tokenizer: Any, folder: Path,
           calibration_examples: int, *, console: Console, show_progress: bool
           ) -> dict[str, Any]:
    """Write the compressed model to ``folder``; returns what was done, for the report."""
    if todo.quantize:
        model = quantization.load_int8(done.merged, head=done.head)
        built = {"quantize": "int8", "scheme": "torchao Int8WeightOnlyConfig, one scale per "
                 "output row", "layers": len(quantization.quantized_layers(model))}
    elif todo.layers is not None:
        model, built = distil_student(
            done, tuned, tokenizer, folder, layers=todo.layers, steps=todo.steps,
            temperature=todo.temperature, weight=todo.distil_weight,
            learning_rate=todo.learning_rate, console=console, show_progress=show_progress)
    else:
        model = copy.deepcopy(tuned)
        norms, used = None, None
        if todo.method == "wanda":
            rows = _calibration_rows(done, tokenizer, calibration_examples)
            norms = input_norms(model, rows, pad_id=tokenizer.pad_token_id)
            used = len(rows)
        built = {**prune_model(model, sparsity=todo.sparsity, method=todo.method,
                               pattern=todo.pattern, norms=norms).to_dict(),
                 "calibration_examples": used}
        if todo.steps:
            built["recovery"] = _recover(todo, done, model, tokenizer, folder,
                                         console=console, show_progress=show_progress)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return built


def _recover(todo: Plan, done: FinishedRun, model: Any, tokenizer: Any, folder: Path, *,
             console: Console, show_progress: bool) -> dict[str, Any]:
    """The pruned model fine-tuned ``todo.steps`` steps on the run's training split (all
    weights, the pruned ones held at zero); checks the sparsity survived."""
    linears = prunable_linears(model)
    masks = {f"{name}.weight": layer.weight == 0 for name, layer in linears.items()}
    done_training = retrain(done, model, tokenizer, folder, steps=todo.steps,
                            learning_rate=todo.learning_rate, wrappers=[hold_zeros(masks)],
                            console=console, show_progress=show_progress)
    moved = [name for name, layer in linears.items()
             if not bool((layer.weight[masks[f"{name}.weight"]] == 0).all())]
    if moved:  # the wrapper's promise; never expected
        raise RuntimeError(f"the recovery fine-tune changed pruned weights of {moved[:3]}")
    return done_training.settings


def _calibration_rows(done: FinishedRun, tokenizer: Any, n: int) -> list[list[int]]:
    """Token ids of ``n`` training examples (a seeded sample), encoded as the run trained on
    them, cut to the run's ``data.max_length``."""
    train = done.split("train")
    picked = sample(train, n, seed=done.config.train.seed,
                    labels=[ex.label for ex in train] if done.labels else None)
    encode = training_encoder(tokenizer, done.config, done.labels) if done.head \
        else (lambda ex: encode_chat(tokenizer, ex.messages))  # preference runs too
    rows = [encode(ex).input_ids[:done.config.data.max_length] for ex in picked]
    return [r for r in rows if r]
