"""Where output goes: the run's log file, and third-party chatter kept off the screen.

Libraries print progress bars ("Loading weights", "Writing model shards", GGUF conversion)
and warnings (deprecations, FutureWarnings) meant for their own developers. A run keeps them in
its ``run.log``; the command line keeps them off the user's screen unless ``--debug``.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Loggers whose records belong in a run's log: ours, the libraries', and Python warnings
# (routed to "py.warnings" by logging.captureWarnings).
LIBRARY_LOGGERS = ("transformers", "peft", "accelerate", "huggingface_hub", "py.warnings")

log = logging.getLogger("tunesmith")


def attach_log_file(run_dir: Path) -> logging.Handler:
    """Send tunesmith's and the libraries' log records (and warnings) to ``run_dir/run.log``."""
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    logging.captureWarnings(True)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    for name in ("tunesmith", *LIBRARY_LOGGERS):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def keep_library_output_off_screen() -> None:
    """Progress bars off, library log records and warnings not printed to the terminal.

    They still reach a run's ``run.log`` (``attach_log_file``). Called once by the command
    line, the edge where "what goes on the screen" is decided.
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.disable_default_handler()  # transformers' own stderr handler
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False  # not to the root logger's last-resort stderr output
        logger.addHandler(logging.NullHandler())
