"""The command line: parses, calls the Python API, prints. No pipeline logic lives here.

One module per command group; ``common`` holds the consoles and the error handler.
"""

from __future__ import annotations

import warnings

# typer < 0.21 (the range Flower pins, see the `federated` extra) re-exports two click helpers
# that click 8.2+ deprecates; the warning fires on import and would print on every command's
# screen under `python -W default`. Nothing of ours uses them.
warnings.filterwarnings("ignore", category=DeprecationWarning,
                        message=r"'click\.utils\.get_(text|binary)_stream' is deprecated")

import typer  # noqa: E402

from tunesmith.cli import (  # noqa: E402
    audit,
    compress,
    data,
    export,
    federated,
    improve,
    run,
    service,
    tune,
)
from tunesmith.cli.common import state  # noqa: E402
from tunesmith.cli.config import config_app  # noqa: E402

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Fine-tune an open language model on your own data, on your own machine.")


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")
                 ) -> None:
    state["debug"] = debug


run.register(app)
app.add_typer(config_app, name="config")
app.add_typer(data.data_app, name="data")
app.add_typer(audit.audit_app, name="audit")
service.register(app)
tune.register(app)
improve.register(app)
export.register(app)
compress.register(app)
federated.register(app)


def main() -> None:
    app()
