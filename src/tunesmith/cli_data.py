"""`tunesmith data ...`: data preparation commands (thin: parse, call tunesmith.prepare, print)."""

from __future__ import annotations

import typer

data_app = typer.Typer(no_args_is_help=True, help="Check, convert, clean and split data.")
