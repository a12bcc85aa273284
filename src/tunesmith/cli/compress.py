"""`tunesmith compress`: prune, quantise or distil a finished run's model; parse, call the
flow, print."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer

from tunesmith.cli.common import err, friendly, out


def _import_flows_quietly(fn: Callable[..., Any]) -> Callable[..., Any]:
    # With torchao installed, transformers imports it along with its model code, and torchao
    # warns about its GPU kernels on a CPU machine; the first import of the flows happens in
    # `friendly`, so it is done here, before, with those warnings held back.
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tunesmith.compress.quantize import quiet_import

        with quiet_import():
            import tunesmith.flows.compress  # noqa: F401
        return fn(*args, **kwargs)

    return wrapper


@_import_flows_quietly
@friendly
def compress_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory (runs/NAME)."),
    prune: float | None = typer.Option(None, "--prune", help="Prune each decoder linear layer "
                                       "to this sparsity, between 0 and 1 (e.g. 0.5)."),
    method: str = typer.Option("wanda", "--method", help="Pruning score: wanda (|W| x input "
                               "norm, per output row) or magnitude (|W|, per layer)."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured, or 2:4 (keep "
                                "2 of every 4 consecutive weights; needs --prune 0.5)."),
    quantize: str | None = typer.Option(None, "--quantize", help="Quantise the weights of the "
                                        "linear layers instead: int8 (weight-only, torchao)."),
    distil: bool = typer.Option(False, "--distil", help="Distil into a student that keeps "
                                "--layers of the tuned model's layers (evenly spaced, its "
                                "weights), trained on KL to the tuned model plus the task loss."),
    layers: int | None = typer.Option(None, "--layers", help="With --distil: how many layers "
                                      "the student keeps (fewer than the model has)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimiser steps on the run's "
                                     "training split: the student's (default 200), or a "
                                     "pruned model's recovery fine-tune with its mask kept "
                                     "(default 0: none)."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="For those steps "
                                               "(default: the full fine-tuning default)."),
    temperature: float = typer.Option(2.0, "--temperature", help="With --distil: softens "
                                      "both distributions in the KL term."),
    distil_weight: float = typer.Option(0.5, "--distil-weight", help="With --distil: the KL "
                                        "term's share of the loss (the task loss has the "
                                        "rest)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where the compressed "
                                       "model goes (default: RUN/compressed/KIND)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    calibration_examples: int = typer.Option(128, "--calibration-examples", help="Training "
                                             "examples whose activations Wanda scores with."),
    max_test: int | None = typer.Option(None, "--max-test", help="Evaluate on a seeded sample "
                                        "of this many test items (default: all)."),
    latency_examples: int = typer.Option(64, "--latency-items", help="Test items timed one at "
                                         "a time for the latency (0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Prune (--prune), quantise (--quantize) or distil (--distil --layers N) a run's tuned
    model and compare the result with the tuned model: accuracy with its bootstrap CI,
    perplexity, size, latency and generation speed."""
    from tunesmith.flows.compress import compress

    result = compress(run_dir, prune=prune, method=method, pattern=pattern, quantize=quantize,
                      distil=distil, layers=layers, steps=steps, learning_rate=learning_rate,
                      temperature=temperature, distil_weight=distil_weight, output=output,
                      overwrite=overwrite,
                      calibration_examples=calibration_examples, max_test=max_test,
                      latency_examples=latency_examples, console=err, show_progress=progress)
    if as_json:
        typer.echo(json.dumps({"output_dir": str(result.output_dir), "report": str(result.report),
                               **result.entry}, indent=2, default=str))
        return
    e = result.entry
    metric = e["primary_metric"]
    for row in (e["tuned"], e["compressed"]):
        p50 = row["latency"]["p50_ms"]
        out.print(f"{row['model']}: {metric} {row['accuracy']:.3f}, non-zero "
                  f"{row['nonzero_parameters']:,} of {row['parameters']:,}, "
                  f"{row['size_bytes'] / 1e6:.1f} MB"
                  + ("" if p50 is None else f", p50 {p50:.0f} ms per item"), highlight=False)
    c = e["comparison"][metric]
    out.print(f"{metric} change: {c['difference']:+.4f} (95% CI [{c['ci_low']:+.4f}, "
              f"{c['ci_high']:+.4f}], {e['test_items']} items)", highlight=False)
    out.print(f"compressed model: {result.output_dir}\nreport: {result.report}")


def register(app: typer.Typer) -> None:
    app.command("compress")(compress_cmd)
