"""`tunesmith run`, `chat`, `eval`: parse, call one flow, print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tunesmith.cli.common import comparison_table, err, friendly, out


@friendly
def run_cmd(
    config: Path = typer.Argument(..., help="Run configuration (YAML)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run dir."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue the run in its run dir from the last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Validate and split the data, fine-tune, evaluate base vs tuned, and write a report."""
    from tunesmith.flows import run

    result = run(config, overwrite=overwrite, resume=resume, console=err, show_progress=progress)
    if not result.main_process:  # under torchrun: the main process evaluates and reports
        return
    out.print(comparison_table(result.base, result.tuned))
    out.print(f"run directory: {result.run_dir}  ({result.seconds:.0f} s)")
    out.print(f"chat with it: tunesmith chat {result.run_dir}")


def _read_schema(path: Path) -> Any:
    """A JSON schema file's object, or a ConfigError naming the file and what is wrong."""
    import json

    from tunesmith.errors import ConfigError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the JSON schema ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the schema as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: not JSON ({err.msg})") from None


@friendly
def chat_cmd(
    model: str = typer.Argument(..., help="A run directory or a model reference."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Answer once and exit."),
    system: str | None = typer.Option(None, "--system", help="A system message."),
    max_new_tokens: int = typer.Option(256, help="Longest reply in tokens."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    json_schema: Path | None = typer.Option(None, "--json-schema", help="A JSON schema file "
                                            "every reply is held to."),
) -> None:
    """Chat with a model; `--prompt` answers once and exits."""
    from tunesmith.flows import chat, load_for_chat

    schema = None if json_schema is None else _read_schema(json_schema)
    loaded = load_for_chat(model)
    history = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        reply = chat(model, history, max_new_tokens=max_new_tokens, temperature=temperature,
                     json_schema=schema, loaded=loaded)
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
    from tunesmith.flows import evaluate

    results = evaluate(model, test_file, base=base, output_dir=output, console=err,
                       show_progress=progress)
    out.print(comparison_table(results.get("base"), results["tuned"]))
    out.print(f"report: {results['output_dir']}/report.html")


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("chat")(chat_cmd)
    app.command("eval")(eval_cmd)
