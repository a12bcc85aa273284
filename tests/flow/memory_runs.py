"""Run the tiny model's train-and-evaluate flow three times in one process; print peak RSS.

    python tests/flow/memory_runs.py CONFIG
"""

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tunesmith import run  # noqa: E402


def main(config: str) -> None:
    peaks = []
    for _ in range(3):
        run(config, overwrite=True, show_progress=False)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB
    print("PEAKS " + json.dumps(peaks), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
