"""Running the service: the HTTP server (with its worker thread) and standalone workers."""

from __future__ import annotations

import logging
import signal
from typing import Any

from tunesmith.service.settings import ServiceSettings
from tunesmith.service.worker import Worker


def serve(settings: ServiceSettings, *, host: str = "127.0.0.1", port: int = 8000,
          worker: bool = True, log_level: str = "info") -> None:
    """Serve the API until interrupted; with ``worker``, also train jobs in this process."""
    import uvicorn

    from tunesmith.service.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    uvicorn.run(create_app(settings, worker=worker), host=host, port=port, log_level=log_level)


def run_worker(settings: ServiceSettings) -> None:
    """Train jobs until SIGINT/SIGTERM; a job in training is released to resume elsewhere."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")
    worker = Worker(settings)

    def stop(_signum: int, _frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    worker.run_forever()
