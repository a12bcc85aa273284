"""``evaluate``: a model (a run or any reference) on a test file, against its base."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from tunesmith.config import DataConfig, EvalConfig
from tunesmith.evaluation.task import check_labels
from tunesmith.flows import assess
from tunesmith.flows.steps import advance_task, read_examples, run_config
from tunesmith.models.classifier import load_trained_classifier
from tunesmith.models.load import load, load_tokenizer
from tunesmith.models.resolve import default_home, resolve_model

log = logging.getLogger("tunesmith")


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
    run_cfg = run_config(Path(model)) if Path(model).is_dir() else None
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
                                           advance_task(progress, "evaluating base", len(test)),
                                           score_labels=False)
            del b_model
        path = resolve_model(model, home=home)
        advance = advance_task(progress, "evaluating model", len(test))
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
