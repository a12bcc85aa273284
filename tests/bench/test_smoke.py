"""The benchmarks run end to end in a smoke mode (tiny sizes): their code cannot rot unseen.

The figures they print here mean nothing; docs/benchmarks.md holds the measured ones.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_train_speed_smoke(bundled_dir):
    done = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), "--steps", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained tokens/s" in done.stdout and "tunesmith / HF" in done.stdout


def test_data_speed_smoke(tmp_path, bundled_dir):
    done = subprocess.run([sys.executable, str(BENCH / "data_speed.py"), "--examples", "300",
                           "--no-big", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["examples"] == 300 and result["validate_plus_clean_seconds"] > 0


def test_search_memory_smoke(tiny_model_dir):
    done = subprocess.run([sys.executable, str(BENCH / "search_memory.py"), "--trials", "2",
                           "--steps", "1", "--model", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HF search process" in done.stdout and "Peak growth from trial 1 to trial 2" \
        in done.stdout
