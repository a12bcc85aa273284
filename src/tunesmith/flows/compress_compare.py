"""The comparison ``compress`` makes: a compressed model beside the tuned one on the run's
test split (the run's own evaluation and the paired bootstrap), general-text perplexity,
latency per item and generation speed, as one entry of the run's compression report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import Progress

from tunesmith.compress import measure
from tunesmith.config import EvalConfig
from tunesmith.data.chat import ChatExample
from tunesmith.data.encode import encode_prompt
from tunesmith.evaluation.classifier import class_probabilities
from tunesmith.evaluation.generate import generate
from tunesmith.evaluation.scoring import label_probabilities
from tunesmith.evaluation.task import label_token_budget, resolve_mode
from tunesmith.flows import assess
from tunesmith.flows.finished import FinishedRun
from tunesmith.flows.steps import advance_task
from tunesmith.models.generation import GenerationParams
from tunesmith.models.generation import generate as generate_ids

# Generation speed: this many new tokens for each of the first GENERATION_PROMPTS timed items.
GENERATION_TOKENS = 32
GENERATION_PROMPTS = 16


def compare(done: FinishedRun, kind: str, models: dict[str, tuple[Any, Path]], tokenizer: Any,
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
    timings = measure.time_items(runs, prompts, on_item=lambda: progress.advance(task))
    generation = None
    if not head and prompts:  # a classification head generates nothing
        picked = prompts[:GENERATION_PROMPTS]
        say(f"generation speed: {GENERATION_TOKENS} new tokens for each of {len(picked)} "
            "test prompts")
        task = progress.add_task("generation speed", total=len(picked))
        generation = measure.generation_speeds(
            {name: _generate_fixed(m, tokenizer) for name, (m, _) in models.items()}, picked,
            on_item=lambda: progress.advance(task))
    rows = {name: _row(name, model, path, evals[name].metrics, ev.positive_label,
                       None if general is None else general.base_perplexity
                       if name == "tuned" else general.tuned_perplexity, timings[name])
            for name, (model, path) in models.items()}
    for name in rows:
        rows[name]["generation"] = None if generation is None else generation[name]
    return {"test_items": len(test), "positive_label": ev.positive_label,
            "eval_mode": evals["tuned"].predictions.mode,
            "primary_metric": "accuracy" if labels else "exact_match",
            "tuned": rows["tuned"], "compressed": rows[kind], "comparison": comparison,
            "kl_from_tuned": None if general is None else general.kl_mean,
            # tuned / compressed time per item, same session: above 1 is faster
            "speed_p50": _ratio(rows, kind, "p50_ms"),
            "speed_cpu_p50": _ratio(rows, kind, "cpu_p50_ms")}


def _ratio(rows: dict[str, dict[str, Any]], kind: str, key: str) -> float | None:
    tuned, other = rows["tuned"]["latency"][key], rows[kind]["latency"][key]
    return tuned / other if tuned and other else None


def _row(name: str, model: Any, path: Path, metrics: dict[str, Any], positive: str | None,
         perplexity: float | None, timings: measure.Timings) -> dict[str, Any]:
    """One model's line of the report."""
    params, nonzero = measure.parameter_counts(model)
    return {"model": name, "path": str(path), "parameters": params,
            "nonzero_parameters": nonzero, "size_bytes": measure.weights_size(path),
            "accuracy": metrics.get("accuracy", metrics.get("exact_match")),
            "f1_positive": metrics.get(f"f1_{positive}") if positive else None,
            "perplexity": perplexity, "latency": measure.latency_summary(timings),
            "metrics": metrics}


def _one_item(model: Any, tokenizer: Any, ev: EvalConfig, labels: list[str] | None,
              head: bool) -> Callable[[Sequence[dict]], Any]:
    """Answer one test prompt the way the evaluation does, at batch size 1."""
    if head:
        return lambda prompt: class_probabilities(model, tokenizer, [prompt], batch_size=1)
    if resolve_mode(ev.mode, ev.task) == "score":
        assert labels is not None
        return lambda prompt: label_probabilities(model, tokenizer, [prompt], labels,
                                                  batch_size=1)
    budget = ev.max_new_tokens
    if budget == "auto":  # as assess.evaluate_lm sets it
        budget = label_token_budget(tokenizer, labels) if labels else 128
    return lambda prompt: generate(model, tokenizer, [prompt], max_new_tokens=int(budget),
                                   batch_size=1)


def _generate_fixed(model: Any, tokenizer: Any) -> Callable[[Sequence[dict]], int]:
    """Greedy generation of exactly GENERATION_TOKENS new tokens for one prompt (the end
    token held back), so every model is timed on the same amount of work."""
    params = GenerationParams(max_new_tokens=GENERATION_TOKENS,
                              min_new_tokens=GENERATION_TOKENS)
    return lambda prompt: generate_ids(model, tokenizer, [encode_prompt(tokenizer, prompt)],
                                       params, batch_size=1)[0].completion_tokens
