"""Repeated runs in one process (as a search trial or a worker would) do not grow memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("memory_runs.py")


# slow: keeps `make test` under 25 minutes; `make test-slow` runs it
@pytest.mark.slow
def test_three_runs_in_one_process_keep_peak_memory_flat(make_config, tmp_path):
    cfg = make_config(train={"epochs": 2})
    done = subprocess.run([sys.executable, str(SCRIPT), str(cfg)], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("PEAKS "))
    first, _, third = json.loads(line.removeprefix("PEAKS "))
    print(f"peak RSS after runs 1 and 3: {first:.0f} MiB, {third:.0f} MiB")
    assert third <= first * 1.10, (first, third)
