"""The benchmarks run end to end in a smoke mode (tiny sizes): their code cannot rot unseen.

The figures they print here mean nothing; docs/benchmarks.md holds the measured ones. The
smoke runs are mostly process start-up (each arm imports torch, transformers and peft in a
process of its own), so they run two at a time, each on one core's worth of threads: with
torch's default of every core each, two processes' OpenMP threads would spin-wait on each
other.
"""

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
AT_ONCE = 2


def _commands(tmp: Path, tiny: Path) -> dict[str, list[str]]:
    model = ["--model", str(tiny)]
    found = {
        # HF bf16 is the HF arm with one flag more, and emulated (slow) on CPUs without bf16
        "train_speed": ["train_speed.py", "--steps", "2", *model, "--peers",
                        "hf,trl" if importlib.util.find_spec("trl") else "hf"],
        "data_speed": ["data_speed.py", "--examples", "300", "--no-big", "--workdir",
                       str(tmp / "data_speed")],
        "search_memory": ["search_memory.py", "--trials", "2", "--steps", "1", *model],
        "dpo_speed": ["dpo_speed.py", "--smoke", *model, "--data", str(tmp / "absent.jsonl"),
                      "--out", str(tmp / "dpo.json")],
        "dp_speed": ["dp_speed.py", "--smoke", *model, "--out", str(tmp / "dp.json")],
        "label_issues": ["label_issues.py", "--smoke", *model, "--out", str(tmp / "li.json")],
        "eval_speed": ["eval_speed.py", "--smoke", *model, "--max-items", "6", "--out",
                       str(tmp / "eval.json")],
        "serve_memory": ["serve_memory.py", "--smoke", *model, "--workdir", str(tmp), "--out",
                         str(tmp / "serve.json")],
        "serve_speed": ["serve_speed.py", "--smoke", *model, "--workdir", str(tmp), "--out",
                        str(tmp / "serve_speed.json")],
        "prompt_cache_speed": ["prompt_cache_speed.py", "--smoke", *model, "--workdir",
                               str(tmp), "--out", str(tmp / "prompt_cache.json")],
    }
    needs = {"dpo_speed": "trl", "dp_speed": "opacus"}
    return {name: args for name, args in found.items()
            if name not in needs or importlib.util.find_spec(needs[name]) is not None}


@pytest.fixture(scope="module")
def smokes(tmp_path_factory, tiny_model_dir, bundled_dir):
    """Every benchmark's smoke run: {name: (completed process, its output folder)}."""
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "data_speed").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(item):
        name, args = item
        return name, subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]],
                                    capture_output=True, text=True, timeout=900, env=env)

    # the slowest first, so the two lanes end together
    order = ["search_memory", "dp_speed", "dpo_speed", "data_speed", "train_speed",
             "label_issues", "serve_memory", "serve_speed", "prompt_cache_speed", "eval_speed"]
    commands = _commands(tmp, tiny_model_dir)
    with ThreadPoolExecutor(AT_ONCE) as pool:
        done = dict(pool.map(run, sorted(commands.items(), key=lambda kv: order.index(kv[0]))))
    return {name: (proc, tmp) for name, proc in done.items()}


def _smoke(smokes, name: str):
    if name not in smokes:
        pytest.skip(f"{name}: its reference library is not installed")
    done, tmp = smokes[name]
    assert done.returncode == 0, done.stderr[-3000:]
    return done, tmp


def test_train_speed_smoke(smokes):
    done, _ = _smoke(smokes, "train_speed")
    assert "trained tokens/s" in done.stdout and "tunesmith / HF" in done.stdout
    # each engine's figures as it finishes, tunesmith's first
    measured = [x for x in done.stdout.splitlines() if x.startswith("measured ")]
    assert measured[0].startswith("measured tunesmith: ") and len(measured) >= 2
    assert all("trained tokens/s" in x and "validation loss" in x for x in measured)
    if importlib.util.find_spec("trl"):
        assert "tunesmith / TRL" in done.stdout
    for precision in ("bf16", "fp32"):
        assert f"{precision} matmul:" in done.stdout and "LoRA limit" in done.stdout


def test_data_speed_smoke(smokes):
    done, _ = _smoke(smokes, "data_speed")
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["examples"] == 300 and result["validate_plus_clean_seconds"] > 0


def test_search_memory_smoke(smokes):
    done, _ = _smoke(smokes, "search_memory")
    assert "HF search process" in done.stdout and "Peak growth from trial 1 to trial 2" \
        in done.stdout


def test_dpo_speed_smoke(smokes):
    done, tmp = _smoke(smokes, "dpo_speed")
    out = tmp / "dpo.json"
    assert "pairs/s" in done.stdout and "tunesmith / TRL" in done.stdout
    result = json.loads(out.read_text())
    assert result["ratios"]["pairs_per_s"] > 0 and result["data"].startswith("synthetic")
    # the same batches in the same order, the same LoRA initialisation: the same losses
    assert result["tunesmith"]["losses"] == pytest.approx(result["trl"]["losses"], abs=1e-3)
    # and SFT on the same rows, the memory LoRA-DPO is held to
    assert "tunesmith / SFT" in done.stdout and result["dpo_over_sft_peak_rss"] > 0
    assert len(result["sft"]["losses"]) == result["steps"]


def test_dp_speed_smoke(smokes):
    done, tmp = _smoke(smokes, "dp_speed")
    out = tmp / "dp.json"
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


def test_label_issues_smoke(smokes):
    done, tmp = _smoke(smokes, "label_issues")
    out = tmp / "li.json"
    result = json.loads(out.read_text())
    assert result["recovery"]["examples"] == 300 and len(result["recovery"]["runs"]) == 2
    assert result["timing"]["examples"] == 300 and result["timing"]["total_seconds"] > 0
    assert "bias + label issues of 300 examples" in done.stdout


def test_eval_speed_smoke(smokes):
    done, tmp = _smoke(smokes, "eval_speed")
    out = tmp / "eval.json"
    for line in ("items: 6", "speed score / generate:", "accuracy: score", "disagree:"):
        assert line in done.stdout, line
    result = json.loads(out.read_text())
    assert result["items"] == 6 and set(result["seconds"]) == {"score", "generate"}
    assert all(s > 0 for s in result["seconds"].values())
    assert result["speed_score_over_generate"] > 0
    # a random model's replies: some may be invalid, never more than there are items
    assert 0 <= result["generate_invalid"] <= 6 and 0 <= result["disagree"] <= 6
    assert len(result["disagreements"]) == result["disagree"]
    # scoring: a prefix pass and one pass per batch, no decode steps; generation: a prefix
    # pass, a pass per batch over the rest of its prompts, and one-token steps. The six SMS
    # prompts share their system prompt, which each way runs once: fewer slots than the
    # prompts whole, even with scoring's label tokens
    score, generate = result["slots"]["score"], result["slots"]["generate"]
    assert score["passes"] >= 2 and score["decode_steps"] == 0
    assert generate["passes"] >= 2 and generate["decode_steps"] >= 1
    assert 0 < score["wide_slots"] < result["prompt_tokens"]
    assert 0 < generate["wide_slots"] < result["prompt_tokens"]
    assert "slots score:" in done.stdout and "slots generate:" in done.stdout
    assert f"prompts whole: {result['prompt_tokens']} tokens" in done.stdout


def test_serve_memory_smoke(smokes):
    done, tmp = _smoke(smokes, "serve_memory")
    result = json.loads((tmp / "serve.json").read_text())
    arms = result["arms"]
    assert set(arms) == {"shared_1", "shared_3", "merged_1", "merged_3"}
    assert "shared / merged at 3" in done.stdout
    # three adapters cost one base and three adapters, not three bases
    base = arms["merged_1"]["cache_mb"]
    assert arms["shared_1"]["cache_mb"] < arms["shared_3"]["cache_mb"] < 1.2 * base
    assert arms["merged_3"]["cache_mb"] == pytest.approx(3 * base)
    assert all(len(a["replies"]) == a["fine_tunes"] for a in arms.values())


def test_serve_speed_smoke(smokes):
    done, tmp = _smoke(smokes, "serve_speed")
    result = json.loads((tmp / "serve_speed.json").read_text())
    assert set(result["arms"]) == {"one_at_a_time", "batched"}  # --smoke: one server
    for arm in result["arms"].values():
        assert arm["requests"] == 2 and arm["tokens"] >= 2 and arm["p95_latency_s"] > 0
    # greedy: every arm gives every request the same answer
    assert result["same_answers"] == {"one_at_a_time": 2, "batched": 2}
    assert "batched / one at a time" in done.stdout


def test_prompt_cache_speed_smoke(smokes):
    done, tmp = _smoke(smokes, "prompt_cache_speed")
    result = json.loads((tmp / "prompt_cache.json").read_text())
    servers = result["servers"]
    assert set(servers) == {"cached", "uncached"}
    for way in ("one_at_a_time", "batched", "streamed", "conversation"):
        # the document's blocks came from the cache on one server and never on the other
        assert servers["cached"][way]["cached_tokens"] >= 16
        assert servers["uncached"][way]["cached_tokens"] == 0
    assert set(result["cached_over_uncached"]) == {"one_at_a_time", "batched"}
    assert all(ratio > 0 for ratio in result["cached_over_uncached"].values())
    assert all(n == result["clients"] * result["rounds"] for n in result["same_answers"].values())
    # a conversation's turns each send the one before: each takes at least as much cached
    turns = servers["cached"]["conversation"]["cached_tokens_each"]
    assert turns == sorted(turns) and len(turns) == result["clients"] * result["rounds"]
    # streamed, each request's first text came before its whole answer
    for server in servers.values():
        streamed = server["streamed"]
        assert 0 < streamed["p50_first_text_s"] <= streamed["p50_latency_s"]
    assert "cached / uncached requests/s" in done.stdout and "first text" in done.stdout
