"""The training memory estimate against the measured peak of the bundled model (LoRA, full).

Each training runs in a fresh process (``measure_memory.py``: ``tunesmith run``'s path up to
the end of training, 3 steps of 4 examples of about 250 tokens, max_length 256) so that its
peak is its own. The measured peak on CPU is the process's peak resident set over its
resident set once torch and transformers are imported: the rest of the libraries, tokenizer
and data, weights, adapters, gradients, AdamW state, activations and logits. glibc's mmap
threshold is fixed at 256 KiB for that process, so a freed tensor goes back to the system and
the resident set follows the memory in use, which is what the estimate is of: by default
glibc raises the threshold as large blocks are freed and keeps later freed activations in its
heap, which added about a quarter to the LoRA run's resident set. On CUDA the measured peak is
``torch.cuda.max_memory_allocated``.

About 2 minutes of CPU per method (10 minutes each on a busy 2-core machine): marked slow,
`make test-slow` runs it.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config
from tunesmith.flows.memory import training_memory
from tunesmith.training.memory import GIB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("measure_memory.py")
BATCH, MAX_LENGTH = 4, 256
WORDS = ["the", "river", "carried", "small", "stones", "past", "old", "mill", "while",
         "children", "counted", "boats", "and", "a", "green", "hill", "under", "bright", "sky",
         "near", "quiet", "town", "with"]


def _write_config(folder: Path, method: str, packing: bool) -> Path:
    """40 chat examples whose answers fill most of max_length (every token a target)."""
    rows = []
    for i in range(40):
        rng = random.Random(i)
        # about one token per word: with the chat template, some 246 tokens per example
        answer = " ".join(rng.choice(WORDS) + ("," if j % 9 == 8 else "")
                          for j in range(int(MAX_LENGTH * 0.8) - 16))
        rows.append({"messages": [{"role": "user", "content": f"Tell me story {i}."},
                                  {"role": "assistant", "content": answer}]})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": "memory", "output_dir": str(folder / "run"), "energy": {"enabled": False},
           "data": {"train_file": "train.jsonl", "max_length": MAX_LENGTH,
                    "max_validation_examples": BATCH},
           "train": {"method": method, "batch_size": BATCH, "max_steps": 3, "epochs": 1,
                     "eval_every": 100, "early_stopping_patience": None, "packing": packing},
           "eval": {"batch_size": BATCH}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", ["lora", "full", "lora-packed"])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path, bundled_dir,
                                                                test_home, method):
    """``lora-packed``: packed rows (one example and its padding each, at these lengths), which
    attend through models.packed_attention on CPU."""
    config = _write_config(tmp_path, method.split("-")[0], packing=method.endswith("packed"))
    env = {**os.environ, "TUNESMITH_HOME": str(test_home), "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}
    done = subprocess.run([sys.executable, str(SCRIPT), str(config), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["steps"] == 3 and measured["batch_size"] == BATCH
    estimate = training_memory(load_config(config), home=test_home)
    peak = measured["peak"]
    report = (f"{method}: estimated {estimate.total / GIB:.2f} GiB, measured "
              f"{peak / GIB:.2f} GiB ({measured['device']}, {measured['seconds']:.0f} s); "
              f"{estimate.summary()}")
    print(report)
    assert abs(estimate.total - peak) <= 0.25 * peak, report
