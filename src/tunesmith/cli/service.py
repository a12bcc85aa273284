"""`tunesmith serve`, `tunesmith worker`, `tunesmith keys`: the HTTP service's commands.

Each command parses its options, resolves the home directory (the one place the environment
is read) and calls one function of ``tunesmith.service``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tunesmith.cli.common import friendly

DataDir = typer.Option(None, "--data-dir", help="Uploaded files, runs and the SQLite database. "
                       "Default: $TUNESMITH_HOME/service.")
DatabaseUrl = typer.Option(None, "--database-url", help="SQLAlchemy URL of the job store, e.g. "
                           "postgresql+psycopg://user:pw@host/db. Default: SQLite in --data-dir.")
Energy = typer.Option(True, "--energy/--no-energy", help="Measure each job's energy and "
                      "emissions (codecarbon, offline).")
EnergyCountry = typer.Option(None, "--energy-country", help="Where the machines draw their "
                             "power (ISO 3166-1 alpha-3, e.g. FRA): the grid's CO2e per kWh. "
                             "Default: USA.")
EnergyRegion = typer.Option(None, "--energy-region", help="A finer grid region of that "
                            "country (e.g. california).")


def _settings(data_dir: Path | None, database_url: str | None, **values: Any) -> Any:
    from tunesmith.models.resolve import default_home
    from tunesmith.service import ServiceSettings, default_data_dir

    home = default_home()
    return ServiceSettings(data_dir=data_dir or default_data_dir(home), home=home,
                           database_url=database_url, **values)


def _store(data_dir: Path | None, database_url: str | None) -> Any:
    from tunesmith.models.resolve import default_home
    from tunesmith.service import Store, store_url

    return Store(store_url(default_home(), data_dir=data_dir, database_url=database_url))


def serve_cmd(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0: any free one)."),
    data_dir: Path | None = DataDir,
    database_url: str | None = DatabaseUrl,
    no_worker: bool = typer.Option(False, "--no-worker",
                                   help="Serve only; train with `tunesmith worker`."),
    model: list[str] = typer.Option(
        [], "--model", help="A base model to offer, NAME=REF (repeatable). REF: a bundled "
        "name, a model directory, a .gguf file or a cached Hub id. Default: "
        "smollm2-135m-instruct."),
    max_upload_mb: float = typer.Option(512, min=0.001, help="Largest file upload, in MB."),
    audit_log: bool = typer.Option(False, "--audit-log", help="Store redacted chat requests "
                                   "and responses (needed for /v1/feedback)."),
    cache_budget_mb: float = typer.Option(4096, min=0,
                                          help="Memory for loaded chat models, in MB."),
    lease_seconds: float = typer.Option(60, min=3, help="A job whose worker is silent this long "
                                        "is resumed by another worker (its lease, renewed each "
                                        "second)."),
    threads: int | None = typer.Option(None, min=1, help="Torch threads per process."),
    max_batch: int = typer.Option(8, min=1, help="Chat requests to one model generated "
                                  "together (1: one at a time)."),
    batch_window_ms: float = typer.Option(10, min=0, max=60_000,
                                          help="How long a batch waits for more requests "
                                          "before it starts, in ms."),
    prompt_cache_mb: float = typer.Option(512, min=0, help="Memory for the prompts' opening "
                                          "tokens kept across chat requests (prompt caching), "
                                          "in MB; 0: off."),
    energy: bool = Energy,
    energy_country: str | None = EnergyCountry,
    energy_region: str | None = EnergyRegion,
) -> None:
    """Serve OpenAI's fine-tuning, files, models and chat APIs over HTTP."""
    from tunesmith.service import serve
    from tunesmith.service.settings import MB, energy_section, parse_model_options

    extra = {"base_models": parse_model_options(model)} if model else {}
    settings = _settings(data_dir, database_url, max_upload_bytes=int(max_upload_mb * MB),
                         audit_log=audit_log, cache_budget_bytes=int(cache_budget_mb * MB),
                         lease_seconds=lease_seconds, torch_threads=threads,
                         max_batch=max_batch, batch_window_ms=batch_window_ms,
                         prompt_cache_bytes=int(prompt_cache_mb * MB),
                         energy=energy_section(enabled=energy, country=energy_country,
                                               region=energy_region), **extra)
    serve(settings, host=host, port=port, worker=not no_worker)


def worker_cmd(
    data_dir: Path | None = DataDir,
    database_url: str | None = DatabaseUrl,
    lease_seconds: float = typer.Option(60, min=3, help="Lease on a running job (see serve)."),
    threads: int | None = typer.Option(None, min=1, help="Torch threads for training."),
    energy: bool = Energy,
    energy_country: str | None = EnergyCountry,
    energy_region: str | None = EnergyRegion,
) -> None:
    """Train queued fine-tuning jobs (one at a time) until Ctrl-C or SIGTERM."""
    from tunesmith.service import run_worker
    from tunesmith.service.settings import energy_section

    run_worker(_settings(data_dir, database_url, lease_seconds=lease_seconds,
                         torch_threads=threads,
                         energy=energy_section(enabled=energy, country=energy_country,
                                               region=energy_region)))


def keys_create(
    org: str = typer.Option(..., "--org", help="The organisation the key acts for."),
    name: str | None = typer.Option(None, "--name", help="A label to recognise it by."),
    data_dir: Path | None = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Create an API key and print it (once: only its hash is stored)."""
    from tunesmith.service import create_key

    key, info = create_key(_store(data_dir, database_url), org, name=name)
    typer.echo(key)
    typer.echo(f"created {info.id} for org {info.org}; the key is shown only now", err=True)


def keys_list(
    org: str | None = typer.Option(None, "--org", help="Only this organisation's keys."),
    data_dir: Path | None = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """List API keys (id, org, prefix, state); the keys themselves are not stored."""
    from tunesmith.service import list_keys

    for k in list_keys(_store(data_dir, database_url), org):
        state = "revoked" if k.revoked_at else "active"
        typer.echo(f"{k.id}  {k.org}  {k.prefix}...  {state}  {k.name or ''}".rstrip())


def keys_revoke(
    key_id: str = typer.Argument(..., help="The key's id (see `tunesmith keys list`)."),
    data_dir: Path | None = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Revoke an API key: requests with it answer 401 from now on."""
    from tunesmith.service import revoke_key

    info = revoke_key(_store(data_dir, database_url), key_id)
    typer.echo(f"revoked {info.id} ({info.org})")


def register(app: typer.Typer) -> None:
    """Add the service commands to the main CLI."""
    app.command("serve")(friendly(serve_cmd))
    app.command("worker")(friendly(worker_cmd))
    keys_app = typer.Typer(no_args_is_help=True, help="API keys of the HTTP service.")
    keys_app.command("create")(friendly(keys_create))
    keys_app.command("list")(friendly(keys_list))
    keys_app.command("revoke")(friendly(keys_revoke))
    app.add_typer(keys_app, name="keys")
