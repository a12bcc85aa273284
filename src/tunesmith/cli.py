"""The command line: parses, calls the Python API, prints. No pipeline logic lives here."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Fine-tune an open language model on your own data, on your own machine.")
config_app = typer.Typer(no_args_is_help=True, help="Create and check run configurations.")
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)
_state = {"debug": False}


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn tunesmith errors into one clear message and exit code 2 (traceback with --debug)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tunesmith.errors import TunesmithError

        try:
            return fn(*args, **kwargs)
        except TunesmithError as e:
            if _state["debug"]:
                raise
            err.print(f"error: {e}", style="red", highlight=False, markup=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; checkpoints written so far are intact", style="yellow")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")
                 ) -> None:
    _state["debug"] = debug


def _comparison_table(base: dict | None, tuned: dict) -> Table:
    from tunesmith.evaluation.report import comparison_rows

    table = Table(title=f"test set ({tuned['n']} examples): base vs tuned")
    for col in ("metric", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, b, t, d in comparison_rows(base, tuned):
        table.add_row(key, "-" if b is None else f"{b:.3f}", f"{t:.3f}",
                      "-" if d is None else f"{d:+.3f}")
    return table


@app.command("run")
@friendly
def run_cmd(
    config: Path = typer.Argument(..., help="Run configuration (YAML)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run dir."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue the run in its run dir from the last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Validate and split the data, fine-tune, evaluate base vs tuned, and write a report."""
    from tunesmith.api import run

    result = run(config, overwrite=overwrite, resume=resume, console=err, show_progress=progress)
    out.print(_comparison_table(result.base, result.tuned))
    out.print(f"run directory: {result.run_dir}  ({result.seconds:.0f} s)")
    out.print(f"chat with it: tunesmith chat {result.run_dir}")


@app.command("chat")
@friendly
def chat_cmd(
    model: str = typer.Argument(..., help="A run directory or a model reference."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Answer once and exit."),
    system: str | None = typer.Option(None, "--system", help="A system message."),
    max_new_tokens: int = typer.Option(256, help="Longest reply in tokens."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
) -> None:
    """Chat with a model; `--prompt` answers once and exits."""
    from tunesmith.api import chat, load_for_chat

    loaded = load_for_chat(model)
    history = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        reply = chat(model, history, max_new_tokens=max_new_tokens, temperature=temperature,
                     loaded=loaded)
        history.append({"role": "assistant", "content": reply})
        return reply

    if prompt is not None:
        out.print(answer(prompt), markup=False, highlight=False)
        return
    err.print("chatting; an empty line or Ctrl-D ends", style="dim")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        out.print(f"model> {answer(text)}", markup=False, highlight=False)


@app.command("eval")
@friendly
def eval_cmd(
    model: str | None = typer.Argument(None, help="A run directory or a model reference."),
    test_file: Path | None = typer.Option(None, "--test-file", "-t",
                                          help="Chat JSONL to evaluate on."),
    base: str | None = typer.Option(None, "--base", help="Compare with this model (default: "
                                    "the run's base model)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where the report goes."),
    compare: tuple[Path, Path] | None = typer.Option(None, "--compare",
                                                     help="Two run directories side by side."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Evaluate a model on a test file against its base, or compare two runs (--compare A B)."""
    from tunesmith.errors import ConfigError

    if compare:
        from tunesmith.evaluation.report import compare_runs

        out.print(compare_runs(*compare), markup=False, highlight=False)
        return
    if model is None or test_file is None:
        raise ConfigError("give a model and --test-file, or --compare RUN_A RUN_B")
    from tunesmith.api import evaluate

    results = evaluate(model, test_file, base=base, output_dir=output, console=err,
                       show_progress=progress)
    out.print(_comparison_table(results.get("base"), results["tuned"]))
    out.print(f"report: {results['output_dir']}/report.html")


@config_app.command("init")
@friendly
def config_init(
    path: Path = typer.Argument(Path("tunesmith.yaml"), help="Where to write the config."),
    train_file: str = typer.Option("train.jsonl", help="Training data path to put in it."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented default configuration."""
    from tunesmith.config import default_config_text
    from tunesmith.errors import ConfigError

    if path.exists() and not force:
        raise ConfigError(f"{path}: exists; pass --force to overwrite it")
    path.write_text(default_config_text(train_file), encoding="utf-8")
    out.print(f"wrote {path}")


@config_app.command("check")
@friendly
def config_check(config: Path = typer.Argument(..., help="Run configuration (YAML).")) -> None:
    """Validate a configuration and print it with every default filled in."""
    import yaml

    from tunesmith.config import dump_config, load_config

    out.print(yaml.safe_dump(dump_config(load_config(config)), sort_keys=False),
              markup=False, highlight=False)


def _mount_command_groups() -> None:
    from tunesmith.cli_data import data_app
    from tunesmith.cli_service import register

    app.add_typer(data_app, name="data")
    register(app)


_mount_command_groups()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
