"""The service's settings: resolved once at the edge (the CLI) and passed down as one value."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import DEFAULT_MODEL
from tunesmith.errors import ConfigError

MB = 1024 * 1024
MAX_WINDOW_MS = 60_000.0
"""The longest a batch may wait for more requests: a minute is already far past any use."""
# A base model's name becomes part of fine-tuned model names (ft:{base}:{org}:...): no ':' or '/'.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the HTTP service and its workers need to know."""

    data_dir: Path
    """Uploaded files, run directories and (by default) the SQLite database."""
    home: Path
    """The tunesmith home: where bundled and GGUF base models are imported."""
    database_url: str | None = None
    """SQLAlchemy URL; empty: a SQLite file in ``data_dir``. PostgreSQL for several machines."""
    base_models: dict[str, str] = field(default_factory=lambda: {DEFAULT_MODEL: DEFAULT_MODEL})
    """Base models offered, name -> reference (bundled name, model directory, .gguf, Hub id)."""
    max_upload_bytes: int = 512 * MB
    audit_log: bool = False
    """Store (redacted) chat requests and responses; needed for POST /v1/feedback."""
    cache_budget_bytes: int = 4096 * MB
    """Memory the loaded chat models may take together; the least recently used go first."""
    max_batch: int = 8
    """Chat requests to one model generated together in one batch (1: one at a time)."""
    batch_window_ms: float = 10.0
    """How long a batch waits for more requests before it starts."""
    prompt_cache_bytes: int = 512 * MB
    """Memory for the keys and values of prompts' opening tokens, kept across chat requests
    to every model (``service.prompt_cache``); 0: none kept."""
    lease_seconds: float = 60.0
    """A running job whose worker is silent this long is taken over by another worker."""
    poll_seconds: float = 1.0
    """How often an idle worker looks for work and a busy one checks on its job."""
    torch_threads: int | None = None
    """Threads torch may use in the training processes; empty: torch's default."""
    max_eval_examples: int = 50
    """Held-out examples a job's model is evaluated on after training (generation is slow)."""
    energy: dict[str, Any] = field(default_factory=dict)
    """The ``energy:`` section of every job's run (``enabled``, ``country_iso_code``,
    ``region``...: where the machines draw their power); empty: the run defaults."""

    def __post_init__(self) -> None:
        """Refuse values no service can run with, naming the setting (the CLI's option is its
        name with dashes) and what it takes."""
        bounds = {"max_upload_bytes": (1, None), "cache_budget_bytes": (0, None),
                  "max_batch": (1, 4096), "batch_window_ms": (0, MAX_WINDOW_MS),
                  "prompt_cache_bytes": (0, None), "lease_seconds": (0.001, None),
                  "poll_seconds": (0.001, None), "torch_threads": (1, 4096),
                  "max_eval_examples": (1, None)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if value is None and name == "torch_threads":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or value != value or value < low or (high is not None and value > high):
                span = f"at least {low}" if high is None else f"from {low} to {high}"
                raise ConfigError(f"service setting {name}: {value!r} is out of range; give a "
                                  f"number {span}")
        if self.lease_seconds <= 2 * self.poll_seconds:
            # a worker renews its lease every poll: a shorter lease lapses between renewals and
            # another worker would take over a job that is still running
            raise ConfigError(f"service setting lease_seconds: {self.lease_seconds} must be more "
                              f"than twice poll_seconds ({self.poll_seconds}); give at least "
                              f"{2 * self.poll_seconds + 1:g}")

    @property
    def url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"


def sqlite_url(data_dir: Path) -> str:
    """The default database: one SQLite file in the service's data directory."""
    return f"sqlite:///{Path(data_dir).resolve() / 'tunesmith.db'}"


def default_data_dir(home: Path) -> Path:
    return home / "service"


def store_url(home: Path, *, data_dir: Path | None = None, database_url: str | None = None
              ) -> str:
    """The job store a command works on: ``database_url``, else SQLite in the data dir."""
    return database_url or sqlite_url(data_dir or default_data_dir(home))


def parse_model_options(options: list[str]) -> dict[str, str]:
    """``NAME=REF`` pairs (``--model``) into a mapping; a bare REF is named after itself."""
    models: dict[str, str] = {}
    for option in options:
        name, sep, ref = option.partition("=")
        if not sep:
            name, ref = Path(option).name.removesuffix(".gguf"), option
        name, ref = name.strip(), ref.strip()
        if not _NAME.match(name) or not ref:
            raise ConfigError(f"--model {option!r}: expected NAME=REF where NAME is letters, "
                              "digits, '.', '_' or '-' (no ':' or '/'), e.g. "
                              "--model smollm2=smollm2-135m-instruct")
        models[name] = ref
    return models


def valid_name(name: str) -> bool:
    """Whether ``name`` may be an org name or a base model name."""
    return bool(_NAME.match(name))


def energy_section(*, enabled: bool = True, country: str | None = None,
                   region: str | None = None) -> dict[str, Any]:
    """The ``energy:`` section every job's run gets, checked now (a wrong country fails the
    service's start, not every job): only what was given, the run defaults for the rest."""
    from pydantic import ValidationError

    from tunesmith.config import EnergyConfig
    from tunesmith.config.load import format_validation_error

    section: dict[str, Any] = {"enabled": enabled}
    if country is not None:
        section["country_iso_code"] = country
    if region is not None:
        section["region"] = region
    try:
        EnergyConfig(**section)
    except ValidationError as err:
        raise ConfigError("the energy settings are invalid",
                          format_validation_error(err, EnergyConfig)) from err
    return section
