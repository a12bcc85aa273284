"""``compress``: prune or quantise a finished run's tuned model, and measure what it cost.

    from tunesmith.flows.compress import compress
    result = compress("runs/sms-spam", prune=0.5, method="wanda")
    print(result.entry["comparison"]["accuracy"])

The steps: check the settings; open the run; build the compressed model in a temporary
directory beside its destination (pruned: input norms from the run's own training examples,
prune, save; int8: quantise as it loads, save); load it back from disk; evaluate it and the
tuned model with the run's own evaluation on the run's test split, general-text perplexity
and per-item latency; rename the directory into place (``<run>/compressed/<kind>/``); record
the entry in ``<run>/compressed/compression.json`` and ``compression.md``. Anything that fails
before the rename leaves nothing behind.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from tunesmith.compress import measure
from tunesmith.compress import quantize as quantization
from tunesmith.compress.prune import check_pattern, check_settings, input_norms, prunable_linears
from tunesmith.compress.prune import prune as prune_model
from tunesmith.config import EvalConfig
from tunesmith.data.chat import ChatExample
from tunesmith.data.encode import encode_chat
from tunesmith.data.split import sample
from tunesmith.errors import ConfigError
from tunesmith.evaluation.classifier import class_probabilities
from tunesmith.evaluation.generate import generate
from tunesmith.evaluation.task import label_token_budget
from tunesmith.flows import assess, compress_report
from tunesmith.flows.finished import FinishedRun, open_run
from tunesmith.flows.steps import advance_task, training_encoder
from tunesmith.models.classifier import load_trained_classifier
from tunesmith.models.load import load_model, load_tokenizer

log = logging.getLogger("tunesmith")

QUANTIZATIONS = ("int8",)


@dataclass(frozen=True)
class Plan:
    """What to do: prune to ``sparsity`` with ``method`` and ``pattern``, or ``quantize``."""

    sparsity: float | None
    method: str
    pattern: str
    quantize: str | None

    @property
    def kind(self) -> str:
        """The output's name: ``wanda-50-unstructured``, ``magnitude-50-2of4``, ``int8``."""
        if self.quantize:
            return self.quantize
        pct = f"{self.sparsity * 100:g}".replace(".", "p")
        return f"{self.method}-{pct}-{self.pattern.replace(':', 'of')}"

    def settings(self) -> dict[str, Any]:
        if self.quantize:
            return {"quantize": self.quantize}
        return {"prune": self.sparsity, "method": self.method, "pattern": self.pattern}


def plan(prune: float | None, method: str, pattern: str, quantize: str | None) -> Plan:
    """The settings checked, every problem at once (``ConfigError``)."""
    if (prune is None) == (quantize is None):
        raise ConfigError("give either a sparsity to prune to (--prune 0.5) or a quantisation "
                          "(--quantize int8), " + ("not both" if prune is not None
                                                  else "one of them"))
    if prune is not None:
        check_settings(prune, method, pattern)
    elif quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantisation {quantize!r}: this version offers "
                          f"{', '.join(QUANTIZATIONS)} (weight-only)")
    return Plan(prune, method, pattern, quantize)


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
             output: Path | str | None = None, overwrite: bool = False,
             calibration_examples: int = 128, max_test: int | None = None,
             latency_examples: int = 64, console: Console | None = None,
             show_progress: bool = True) -> CompressResult:
    """Prune (``prune`` = sparsity, ``method`` wanda|magnitude, ``pattern`` unstructured|2:4)
    or quantise (``quantize="int8"``) the run's tuned model, save it to ``output`` (default
    ``<run>/compressed/<kind>``) and compare it with the tuned model on the run's test split
    (``max_test``: a seeded sample of that many items), general-text perplexity and the
    latency of ``latency_examples`` test items one at a time."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    todo = plan(prune, method, pattern, quantize)
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
    if todo.sparsity is not None:
        check_pattern(prunable_linears(tuned), todo.pattern)  # before anything is written
    test = _test_items(done, max_test)

    def say(msg: str) -> None:
        log.info(msg)
        console.print(msg)

    with _staged(out) as tmp:
        say(f"{todo.kind}: compressing {done.merged}")
        built = _build(todo, done, tuned, tokenizer, tmp, calibration_examples)
        compressed = _load(tmp, head=done.head)[0]  # evaluate what was saved
        with Progress(console=console, disable=not show_progress) as progress:
            entry = _measure(done, todo.kind, {"tuned": (tuned, done.merged),
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
           calibration_examples: int) -> dict[str, Any]:
    """Write the compressed model to ``folder``; returns what was done, for the report."""
    if todo.quantize:
        model = quantization.load_int8(done.merged, head=done.head)
        built = {"quantize": "int8", "scheme": "torchao Int8WeightOnlyConfig, one scale per "
                 "output row", "layers": len(quantization.quantized_layers(model))}
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
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return built


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


def _measure(done: FinishedRun, kind: str, models: dict[str, tuple[Any, Path]], tokenizer: Any,
             test: Sequence[ChatExample], latency_examples: int, progress: Progress,
             say: Callable[[str], None]) -> dict[str, Any]:
    """Both models on the test split, general text and per-item latency; the entry."""
    ev, labels, head = done.config.eval, done.labels, done.head
    evals = {}
    for name, (model, _) in models.items():
        say(f"evaluating {name} on {len(test)} test items")
        advance = advance_task(progress, f"evaluating {name}", len(test))
        evals[name] = assess.evaluate_head(model, tokenizer, test, ev, labels, advance) \
            if head else assess.evaluate_lm(model, tokenizer, test, ev, labels, advance,
                                            score_labels=False)
    # the paired bootstrap of base vs tuned, here tuned vs compressed on the same items
    found = assess.comparison(ev, labels, evals["tuned"], evals[kind])
    comparison = {metric: {"tuned": c["base"], "compressed": c["tuned"],
                           **{k: c[k] for k in ("difference", "ci_low", "ci_high",
                                                "confidence", "n", "n_resamples")}}
                  for metric, c in found.items()}
    general = None
    if not head:  # a classification head has no language-model output to score
        say("general-text perplexity of both")
        snaps = {name: assess.forgetting_snapshot(m, tokenizer, ev)
                 for name, (m, _) in models.items()}
        general = assess.compare_snapshots(snaps["tuned"], snaps[kind],
                                           max_perplexity_ratio=ev.max_perplexity_ratio,
                                           max_kl=ev.max_kl)
    prompts = [ex.prompt for ex in test[:latency_examples]]
    say(f"timing {len(prompts)} test items one at a time")
    task = progress.add_task("timing items one at a time", total=len(prompts))
    runs = {name: _one_item(m, tokenizer, ev, labels, head) for name, (m, _) in models.items()}
    seconds = measure.time_items(runs, prompts, on_item=lambda: progress.advance(task))
    rows = {name: _row(name, model, path, evals[name].metrics, ev.positive_label,
                       None if general is None else general.base_perplexity
                       if name == "tuned" else general.tuned_perplexity, seconds[name])
            for name, (model, path) in models.items()}
    return {"test_items": len(test), "positive_label": ev.positive_label,
            "primary_metric": "accuracy" if labels else "exact_match",
            "tuned": rows["tuned"], "compressed": rows[kind], "comparison": comparison,
            "kl_from_tuned": None if general is None else general.kl_mean,
            "speed_p50": rows["tuned"]["latency"]["p50_ms"] / rows[kind]["latency"]["p50_ms"]
            if prompts else None}


def _row(name: str, model: Any, path: Path, metrics: dict[str, Any], positive: str | None,
         perplexity: float | None, seconds: Sequence[float]) -> dict[str, Any]:
    """One model's line of the report."""
    params, nonzero = measure.parameter_counts(model)
    return {"model": name, "path": str(path), "parameters": params,
            "nonzero_parameters": nonzero, "size_bytes": measure.weights_size(path),
            "accuracy": metrics.get("accuracy", metrics.get("exact_match")),
            "f1_positive": metrics.get(f"f1_{positive}") if positive else None,
            "perplexity": perplexity, "latency": measure.latency_summary(seconds),
            "metrics": metrics}


def _one_item(model: Any, tokenizer: Any, ev: EvalConfig, labels: list[str] | None,
              head: bool) -> Callable[[Sequence[dict]], Any]:
    """Answer one test prompt the way the evaluation does, at batch size 1."""
    if head:
        return lambda prompt: class_probabilities(model, tokenizer, [prompt], batch_size=1)
    budget = ev.max_new_tokens
    if budget == "auto":  # as assess.evaluate_lm sets it
        budget = label_token_budget(tokenizer, labels) if labels else 128
    return lambda prompt: generate(model, tokenizer, [prompt], max_new_tokens=int(budget),
                                   batch_size=1)
