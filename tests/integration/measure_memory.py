"""Train the bundled model a few steps in a fresh process and print its peak memory as JSON.

    python tests/integration/measure_memory.py CONFIG.yaml OUT_DIR

The run takes the path ``tunesmith run`` takes up to the end of training
(``prepare_headless`` then ``fine_tune``), without the evaluation and the saving after it.
On CPU the peak is the process's peak resident set (``ru_maxrss``) less its resident set once
torch and transformers are imported: everything the run itself adds (the rest of the
libraries, the tokenizer and data, weights, optimiser, activations, allocator slack). On CUDA
it is ``torch.cuda.max_memory_allocated`` (tensors only, no CUDA context).
"""

import json
import resource
import sys
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(config: str, out_dir: str) -> None:
    started = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    baseline = _rss_bytes()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tunesmith.config import load_config
    from tunesmith.flows.finetune import fine_tune
    from tunesmith.flows.run import prepare_headless
    from tunesmith.models.resolve import default_home

    cfg = load_config(config)
    headless = prepare_headless(cfg, Path(out_dir), default_home())
    loaded = _rss_bytes()
    p = headless.prepared
    fine_tune(cfg, Path(out_dir), headless.model, headless.model_dir, headless.tokenizer,
              train_rows=p.train, valid_rows=p.valid, hp=p.hp, labels=headless.labels,
              restore_best=False, save=False)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cuda = torch.cuda.is_available()
    print(json.dumps({
        "device": "cuda" if cuda else "cpu",
        "peak": torch.cuda.max_memory_allocated() if cuda else peak_rss - baseline,
        "baseline_rss": baseline, "peak_rss": peak_rss, "rss_after_load": loaded - baseline,
        "steps": p.hp.total_steps, "batch_size": p.hp.batch_size,
        "seconds": time.perf_counter() - started,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
