"""The server's scores of each round's global adapter on ``federated.eval_file``, and the
round's line in rounds.jsonl once they are in.

Rounds before the last are scored in a background thread, on one core, while the next round
runs: every round the clients' processes start and load the model, and the largest client
trains alone long after the small ones have finished, one of the two cores idle
(docs/benchmarks.md), so the scoring fills time the machine would otherwise idle instead of
holding up the next round. The last round is scored at once with every core. A round's
global adapter is saved (the restart point) before it is scored; a server killed in between
scores it when it restarts (``ServerRun.start``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunesmith.flows.federated import rounds


class RoundScorer:
    """Scores a round (``evaluate()`` -> metrics into its record), then appends the record."""

    def __init__(self, run_dir: Path, evaluate: Callable[[], dict[str, float]] | None) -> None:
        self.run_dir, self.evaluate = run_dir, evaluate
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()
        self._error: BaseException | None = None

    def score(self, record: dict[str, Any], *, background: bool) -> None:
        self.wait()
        if self.evaluate is None or not background:
            self._complete(record)
            self._raise()
            return
        # torch's intra-op pool is one per process: the server's own thread does no heavy
        # tensor work meanwhile (Flower aggregates in numpy)
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._thread = threading.Thread(target=self._complete, args=(record,),
                                        name="round-scores", daemon=True)
        self._thread.start()

    def _complete(self, record: dict[str, Any]) -> None:
        try:
            if self.evaluate is not None:
                record.update(self.evaluate())
            rounds.append_round(self.run_dir, record)
        except BaseException as err:  # raised again in the server's thread by wait()
            self._error = err

    def wait(self) -> None:
        """The round being scored is finished and recorded (its error, if any, raised here)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            torch.set_num_threads(self._threads)
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
