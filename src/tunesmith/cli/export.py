"""`tunesmith export`: parse, call the export flow, print."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunesmith.cli.common import friendly, out


@friendly
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory (runs/NAME)."),
    format: str = typer.Option(..., "--format", "-f", help="gguf (one file for llama.cpp "
                               "and Ollama, with a Modelfile) or hf (a Hugging Face "
                               "directory)."),
    quantize: str | None = typer.Option(None, "--quantize", "-q", help="GGUF tensor type: "
                                        "f16 (default), q8_0, or f32."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write (default: "
                                       "runs/NAME/export/NAME-<type>.gguf, or export/hf)."),
    check: int = typer.Option(50, "--check", help="Compare the export with the merged model on "
                              "this many test items (0: skip)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a finished run as a GGUF file (llama.cpp, Ollama) or a clean Hugging Face
    directory, then check the export answers like the merged model."""
    from tunesmith.flows.export import export

    result = export(run_dir, format=format, quantize=quantize, output=output, check=check,
                    overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    out.print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.tensor_type}) in "
              f"{result.seconds:.1f} s", highlight=False)
    if result.modelfile is not None:
        out.print(f"Ollama: ollama create {result.path.stem} -f {result.modelfile}",
                  highlight=False)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)
    c = result.check
    if c and c["n"]:
        line = (f"check on {c['n']} test items: the same {c['compared']} as the merged model "
                f"on {c['same']} ({c['agreement']:.1%})")
        if c.get("accuracy"):
            line += (f"; accuracy merged {c['accuracy']['merged']:.3f}, export "
                     f"{c['accuracy']['export']:.3f}")
        if c.get("max_logit_diff") is not None:
            line += (f"; max |logit difference| {c['max_logit_diff']:.4f} on "
                     f"{c['same_tokenization']} prompts")
        out.print(line + f" ({c['seconds']:.0f} s)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
