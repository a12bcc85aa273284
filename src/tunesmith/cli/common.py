"""What every command group shares: the consoles, the --debug flag, the error handler."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)
state = {"debug": False}


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn tunesmith errors into one clear message and exit code 2 (traceback with --debug)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tunesmith.errors import TunesmithError

        if not state["debug"]:
            from tunesmith.flows.logs import keep_library_output_off_screen

            keep_library_output_off_screen()
        try:
            return fn(*args, **kwargs)
        except TunesmithError as e:
            if state["debug"]:
                raise
            err.print(f"error: {e}", style="red", highlight=False, markup=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; checkpoints written so far are intact", style="yellow")
            raise typer.Exit(130) from None

    return wrapper


def comparison_table(base: dict | None, tuned: dict) -> Table:
    from tunesmith.evaluation.report import comparison_rows

    table = Table(title=f"test set ({tuned['n']} examples): base vs tuned")
    for col in ("metric", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, b, t, d in comparison_rows(base, tuned):
        table.add_row(key, "-" if b is None else f"{b:.3f}", f"{t:.3f}",
                      "-" if d is None else f"{d:+.3f}")
    return table


