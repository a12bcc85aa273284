"""`tunesmith config init|check`: commented defaults, validation with every default shown.

The comments ``config init`` writes are the field descriptions in ``tunesmith.config``, the
one place each setting is documented.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from tunesmith.cli.common import friendly, out

if TYPE_CHECKING:
    from pydantic import BaseModel

config_app = typer.Typer(no_args_is_help=True, help="Create and check run configurations.")


@config_app.command("init")
@friendly
def config_init(
    path: Path = typer.Argument(Path("tunesmith.yaml"), help="Where to write the config."),
    train_file: str = typer.Option("train.jsonl", help="Training data path to put in it."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented default configuration."""
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


def default_config_text(train_file: str = "train.jsonl") -> str:
    """The commented default configuration written by ``tunesmith config init``."""
    from tunesmith.config import DataConfig, RunConfig, dump_config

    cfg = RunConfig(data=DataConfig(train_file=Path(train_file)))
    header = [
        "# tunesmith run configuration. Run it with: tunesmith run <this file>",
        "# Paths are relative to this file's directory.",
        "",
    ]
    return "\n".join(header + _commented(RunConfig, dump_config(cfg), 0)) + "\n"


def _commented(model: type[BaseModel], values: dict[str, Any], indent: int) -> list[str]:
    """Each field of ``model`` with its description as a comment above it; sections nest."""
    import yaml
    from pydantic import BaseModel

    lines: list[str] = []
    pad = "  " * indent
    for name, field in model.model_fields.items():
        if field.description:
            lines.append(f"{pad}# {field.description}")
        annotation = field.annotation
        value = values.get(name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(_commented(annotation, value or {}, indent + 1))
        else:
            scalar = yaml.safe_dump(value, default_flow_style=True)
            lines.append(f"{pad}{name}: {scalar.strip().removesuffix('...').strip()}")
    return lines
