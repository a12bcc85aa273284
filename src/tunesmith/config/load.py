"""The whole run configuration, and reading it from YAML with every problem reported at once."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from tunesmith.config.energy import EnergyConfig
from tunesmith.config.federated import FederatedConfig
from tunesmith.config.search import TuneConfig
from tunesmith.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    _Section,
)
from tunesmith.errors import ConfigError


class RunConfig(_Section):
    name: str | None = Field(None, description="Run name. Empty: the config file's name.")
    output_dir: Path | None = Field(
        None, description="Run directory. Empty: runs/<name> under the current directory.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    data: DataConfig = Field(..., description="Where the data is and how it is split.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="How to train.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="How to evaluate.")
    energy: EnergyConfig = Field(
        default_factory=EnergyConfig, description="Energy and CO2e of training and evaluation.")
    tune: TuneConfig | None = Field(
        None, description="Hyperparameter search run by `tunesmith tune` (`run` ignores it).")
    federated: FederatedConfig | None = Field(
        None, description="Federated fine-tuning run by `tunesmith federated` (`run` ignores "
        "it).")

    @model_validator(mode="after")
    def _head_needs_classification(self) -> RunConfig:
        if self.train.head == "classifier" and self.eval.task != "classification":
            raise ValueError("train.head 'classifier' needs eval.task: classification")
        if self.train.head == "classifier" and self.train.objective != "sft":
            raise ValueError(f"train.objective '{self.train.objective}' trains on answers in "
                             "text; use train.head: lm")
        objective = self.tune.objective if self.tune else "valid_loss"
        task = {"exact_match": "generation"}.get(objective, "classification")
        if objective != "valid_loss" and self.eval.task != task:
            raise ValueError(f"tune.objective '{objective}' needs eval.task: {task}")
        if objective == "positive_f1" and not self.eval.positive_label:
            raise ValueError("tune.objective 'positive_f1' needs eval.positive_label")
        if self.federated is not None and self.train.method == "full" \
                and self.federated.ffa_lora:
            raise ValueError("federated.ffa_lora freezes LoRA A matrices; it needs "
                             "train.method: lora")
        if self.federated is not None and self.train.head != "lm":
            raise ValueError("federated training averages a causal LM's adapters (or weights); "
                             "train.head: classifier is not supported there; use train.head: "
                             "lm")
        if self.data.label_issues != "off" and (self.eval.task != "classification"
                                                or self.train.objective != "sft"):
            raise ValueError(f"data.label_issues '{self.data.label_issues}' is for "
                             "classification data (eval.task: classification, train.objective: "
                             "sft); set it to 'off'")
        return self



# ----------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc`` (for 'did you mean' suggestions)."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        current = field.annotation if field is not None else None
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
    return list(current.model_fields)


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per wrong field, saying what to change."""
    by_field: dict[str, list[str]] = {}
    for e in err.errors():
        # drop the union-branch markers pydantic puts in the location ("int", "literal[...]")
        branch = any(isinstance(p, str) and (p in {"int", "float", "list[str]"}
                                             or p.startswith("literal[")) for p in e["loc"])
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (
            p in {"int", "float", "list[str]", "[key]"} or p.startswith("literal["))))
        dotted = ".".join(str(p) for p in loc) or "<top>"
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            close = difflib.get_close_matches(key, _known_keys(model, loc), n=1)
            text = "unknown key" + (f"; did you mean '{close[0]}'?" if close else "; remove it")
        elif e["type"] == "missing":
            text = "required, add it"
        elif e["type"] == "value_error":  # our own validators: the message says it all
            text = str(e["msg"]).removeprefix("Value error, ")
        else:
            text = f"{e['msg']} (got {e.get('input')!r})"
        by_field.setdefault(dotted, []).append(("or" if branch else ";", text))
    # a union such as int | 'auto' fails once per branch: one line with both
    lines = []
    for k, found in by_field.items():
        line = f"{k}: {found[0][1]}"
        for sep, text in dict.fromkeys(found[1:]):
            line += f" {sep} {text}" if sep == "or" else f"; {text}"
        lines.append(line)
    return lines


def parse_config(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> RunConfig:
    """Validate a mapping into a RunConfig; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, train, eval)")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: the configuration is invalid",
                          format_validation_error(err, RunConfig)) from err
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: RunConfig, base_dir: Path) -> RunConfig:
    def fix(section: BaseModel, *names: str) -> Any:
        paths = {n: getattr(section, n) for n in names}
        return section.model_copy(update={n: p if p is None or p.is_absolute() else base_dir / p
                                          for n, p in paths.items()})

    data = fix(cfg.data, "train_file", "validation_file", "test_file", "group_reference")
    evaluation = fix(cfg.eval, "forgetting_text", "forgetting_prompts")
    federated = cfg.federated
    if federated is not None:
        clients = federated.clients and [p if p.is_absolute() else base_dir / p
                                         for p in federated.clients]
        federated = fix(federated, "eval_file").model_copy(update={"clients": clients})
    model = cfg.model
    candidate = base_dir / cfg.model.base
    if not Path(cfg.model.base).is_absolute() and candidate.exists():
        model = cfg.model.model_copy(update={"base": str(candidate)})
    return cfg.model_copy(update={"data": data, "model": model, "eval": evaluation,
                                  "federated": federated})


def load_config(path: Path | str) -> RunConfig:
    """Read a YAML run configuration. Data paths are relative to the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; create one with `tunesmith config init`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", err)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from err
    if data is None:
        raise ConfigError(f"{path}: the file is empty; create one with `tunesmith config init`")
    cfg = parse_config(data, source=str(path), base_dir=path.parent.resolve())
    if cfg.name is None:
        cfg = cfg.model_copy(update={"name": path.stem})
    return cfg


def dump_config(cfg: RunConfig) -> dict[str, Any]:
    """A plain mapping of the configuration, ready for YAML."""
    return cfg.model_dump(mode="json")

