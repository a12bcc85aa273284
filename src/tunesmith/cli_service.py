"""`tunesmith serve`, `tunesmith worker`, `tunesmith keys`: the HTTP service's commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the service commands to the main CLI."""
