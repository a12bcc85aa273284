"""The benchmarks run end to end in a smoke mode (tiny sizes): their code cannot rot unseen.

The figures they print here mean nothing; docs/benchmarks.md holds the measured ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_train_speed_smoke(tiny_model_dir):
    done = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), "--steps", "2",
                           "--model", str(tiny_model_dir)],
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


def test_dpo_speed_smoke(tmp_path, tiny_model_dir):
    pytest.importorskip("trl")
    out = tmp_path / "dpo.json"
    done = subprocess.run([sys.executable, str(BENCH / "dpo_speed.py"), "--smoke", "--model",
                           str(tiny_model_dir), "--data", str(tmp_path / "absent.jsonl"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pairs/s" in done.stdout and "tunesmith / TRL" in done.stdout
    result = json.loads(out.read_text())
    assert result["ratios"]["pairs_per_s"] > 0 and result["data"].startswith("synthetic")
    # the same batches in the same order, the same LoRA initialisation: the same losses
    assert result["tunesmith"]["losses"] == pytest.approx(result["trl"]["losses"], abs=1e-3)
    # and SFT on the same rows, the memory LoRA-DPO is held to
    assert "tunesmith / SFT" in done.stdout and result["dpo_over_sft_peak_rss"] > 0
    assert len(result["sft"]["losses"]) == result["steps"]


def test_dp_speed_smoke(tmp_path, tiny_model_dir):
    pytest.importorskip("opacus")
    out = tmp_path / "dp.json"
    done = subprocess.run([sys.executable, str(BENCH / "dp_speed.py"), "--smoke", "--model",
                           str(tiny_model_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seconds per step" in done.stdout and "tunesmith / Opacus" in done.stdout
    assert "tunesmith / packed" in done.stdout and "tunesmith / unpacked" in done.stdout
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == {"dp_over_packed_step_time", "dp_over_unpacked_step_time",
                                     "dp_over_opacus_step_time", "dp_over_opacus_peak_rss"}
    assert all(0 < v < float("inf") for v in result["ratios"].values())  # NaN fails too
    for arm in result["arms"]:  # every arm trained (LoRA weights moved) the requested steps
        assert result[arm]["steps"] == result["steps"] == len(result[arm]["step_seconds"]), arm
        assert result[arm]["seconds_per_step"] > 0 and result[arm]["peak_rss_gb"] > 0, arm
    # both private arms spent the same budget: the same mechanism, steps and sampling rate
    assert result["tunesmith_dp"]["epsilon"] == pytest.approx(result["opacus"]["epsilon"])


def test_label_issues_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "li.json"
    done = subprocess.run([sys.executable, str(BENCH / "label_issues.py"), "--smoke",
                           "--model", str(tiny_model_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["recovery"]["examples"] == 300 and len(result["recovery"]["runs"]) == 2
    assert result["timing"]["examples"] == 300 and result["timing"]["total_seconds"] > 0
    assert "bias + label issues of 300 examples" in done.stdout


def test_eval_speed_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, str(BENCH / "eval_speed.py"), "--smoke", "--model",
                           str(tiny_model_dir), "--max-items", "6", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("items: 6", "speed score / generate:", "accuracy: score", "disagree:"):
        assert line in done.stdout, line
    result = json.loads(out.read_text())
    assert result["items"] == 6 and set(result["seconds"]) == {"score", "generate"}
    assert all(s > 0 for s in result["seconds"].values())
    assert result["speed_score_over_generate"] > 0
    # a random model's replies: some may be invalid, never more than there are items
    assert 0 <= result["generate_invalid"] <= 6 and 0 <= result["disagree"] <= 6
    assert len(result["disagreements"]) == result["disagree"]
