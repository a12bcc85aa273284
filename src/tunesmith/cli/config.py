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
    objective: str = typer.Option(
        "sft", help="sft (chat examples) or a preference objective for pairs: dpo, ipo, simpo, "
        "orpo. Sets train.objective and train_file's expected format."),
) -> None:
    """Write a commented default configuration."""
    from tunesmith.errors import ConfigError

    if path.exists() and not force:
        raise ConfigError(f"{path}: exists; pass --force to overwrite it")
    path.write_text(default_config_text(train_file, objective=objective), encoding="utf-8")
    out.print(f"wrote {path}")


@config_app.command("check")
@friendly
def config_check(config: Path = typer.Argument(..., help="Run configuration (YAML).")) -> None:
    """Validate a configuration and print it with every default filled in, and the estimated
    peak memory of training it (from the base model's configuration; no weights are loaded)."""
    import yaml

    from tunesmith.config import dump_config, load_config
    from tunesmith.errors import TunesmithError
    from tunesmith.flows.memory import training_memory
    from tunesmith.models.resolve import default_home

    cfg = load_config(config)
    out.print(yaml.safe_dump(dump_config(cfg), sort_keys=False), markup=False, highlight=False)
    # as YAML comments, so the output stays a loadable configuration
    try:
        estimate = training_memory(cfg, home=default_home())
    except TunesmithError as error:
        lines = [f"estimated peak memory for training: unknown ({error})"]
    else:
        lines = [estimate.summary(), *(f"  {note}" for note in estimate.notes)]
    for line in lines:
        out.print(f"# {line}", markup=False, highlight=False, soft_wrap=True)


PAIRS_HELP = [
    "# Preference pairs, one per line, OpenAI's format:",
    '#   {"input": {"messages": [{"role": "user", "content": "..."}]},',
    '#    "preferred_output": [{"role": "assistant", "content": "..."}],',
    '#    "non_preferred_output": [{"role": "assistant", "content": "..."}]}',
    '# or TRL\'s: {"prompt": "...", "chosen": "...", "rejected": "..."} (text or messages).',
    "# Watch the reward margin and pair accuracy (metrics.jsonl, report.md), not the chosen",
    "# reward alone. A run directory may be model.base: the next round continues from it.",
]


def default_config_text(train_file: str = "train.jsonl", *, objective: str = "sft") -> str:
    """The commented default configuration written by ``tunesmith config init``."""
    from pydantic import ValidationError

    from tunesmith.config import DataConfig, RunConfig, TrainConfig, dump_config
    from tunesmith.errors import ConfigError

    try:
        train = TrainConfig(objective=objective)  # type: ignore[arg-type]
    except ValidationError:
        raise ConfigError(f"--objective {objective!r}: use one of sft, dpo, ipo, simpo, "
                          "orpo") from None
    cfg = RunConfig(data=DataConfig(train_file=Path(train_file)), train=train)
    header = [
        "# tunesmith run configuration. Run it with: tunesmith run <this file>",
        "# Paths are relative to this file's directory.",
        *(PAIRS_HELP if objective != "sft" else []),
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
