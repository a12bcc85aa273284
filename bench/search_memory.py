"""Hyperparameter search, memory across trials: ``tunesmith tune`` against HF Trainer's
``hyperparameter_search`` (Optuna backend), in one invocation.

    .venv/bin/python bench/search_memory.py [--trials 4] [--steps 6] [--out docs/benchmarks.md]

Both search the learning rate of a LoRA fine-tune of the bundled SmolLM2-135M-Instruct on
the SMS-spam file (tunesmith samples its training rows from it), with the same steps per
trial, batch, LoRA r=16/alpha 32/all linear, and Optuna's seeded TPE sampler. HF Trainer runs
every trial in one process (``model_init`` builds a fresh model per trial); tunesmith runs
each trial in its own process. Each search runs in its own process, so the figures are its
own. Reported after every trial: the peak resident memory of the search's process (HF: the
one process; tunesmith: the study's process) and, for tunesmith, of each trial's process.
Seconds per trial are wall time, start to end.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from procmem import peak_mb, rss_mb  # noqa: E402
from train_speed import (  # noqa: E402
    BATCH,
    LORA,
    MAX_LEN,
    SEED,
    padding_collator,
    replace_section,
    rows,
)

LR_LOW, LR_HIGH = 5e-5, 3e-3


def run_hf(trials: int, steps: int, model_ref: str) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tunesmith.data.encode import encode_chat
    from tunesmith.models.load import add_lora, load, load_tokenizer
    from tunesmith.models.resolve import default_home, resolve_model

    model_dir = resolve_model(model_ref, home=default_home())
    tok = load_tokenizer(model_dir)
    train_rows, valid_rows = rows(steps)
    train = [{"input_ids": e.input_ids, "labels": e.labels}
             for e in (encode_chat(tok, m) for m in train_rows) if len(e) <= MAX_LEN]
    valid = [{"input_ids": e.input_ids, "labels": e.labels}
             for e in (encode_chat(tok, m) for m in valid_rows[:32])]

    def model_init(trial=None):  # noqa: ARG001 - HF's signature
        model, _ = load(model_dir, dtype="float32")
        torch.manual_seed(SEED)
        return add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                        target_modules=LORA["target_modules"])

    after: list[dict] = []
    started = [time.perf_counter()]

    class Measure(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):  # noqa: ARG002
            after.append({"rss_mb": rss_mb(), "peak_mb": peak_mb(),
                          "seconds": time.perf_counter() - started[0]})
            started[0] = time.perf_counter()

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps,
        lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10_000,
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=SEED,
        remove_unused_columns=False, disable_tqdm=True, per_device_eval_batch_size=16)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=train,
                      eval_dataset=valid, data_collator=padding_collator(tok.pad_token_id),
                      callbacks=[Measure()])
    import optuna

    trainer.hyperparameter_search(
        direction="minimize", backend="optuna", n_trials=trials,
        hp_space=lambda t: {"learning_rate": t.suggest_float("learning_rate", LR_LOW, LR_HIGH,
                                                             log=True)},
        sampler=optuna.samplers.TPESampler(seed=SEED))
    return {"after": after}


def run_tunesmith(trials: int, steps: int, model_ref: str) -> dict:
    import yaml

    from tunesmith.flows.tune import tune

    work = Path(tempfile.mkdtemp())
    n_train = steps * BATCH
    train_rows, _ = rows(steps)
    data = work / "train.jsonl"
    # the same rows as HF trains on, then the rest of the file for validation and test
    all_rows = train_rows + rows(200)[0][n_train:]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in all_rows))
    cfg = {"name": "search-bench", "model": {"base": model_ref},
           "data": {"train_file": str(data), "max_train_examples": n_train,
                    "max_validation_examples": 32, "max_length": MAX_LEN},
           "train": {"method": "lora", "lora": LORA, "epochs": 1, "batch_size": BATCH,
                     "max_steps": steps, "eval_every": steps, "seed": SEED,
                     "early_stopping_patience": None},
           "eval": {"compare_base": False, "forgetting": False},
           "tune": {"space": {"train.learning_rate": {"type": "log_uniform", "low": LR_LOW,
                                                      "high": LR_HIGH}},
                    "trials": trials, "pruner": "none", "seed": SEED}}
    path = work / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = tune(path, study_dir=work / "study", show_progress=False)
    import optuna

    study = optuna.load_study(study_name="tunesmith",
                              storage=f"sqlite:///{result.study_dir / 'study.db'}")
    after = []
    for t in study.trials:
        after.append({"rss_mb": None, "peak_mb": t.user_attrs.get("parent_peak_rss_mb"),
                      "trial_peak_mb": t.user_attrs.get("peak_rss_mb"),
                      "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
                      "state": t.state.name})
    after[-1]["rss_mb"] = rss_mb()
    return {"after": after}


def measure(engine: str, trials: int, steps: int, model_ref: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", engine, "--trials", str(trials),
                           "--steps", str(steps), "--model", model_ref],
                          capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def table(hf: dict, ts: dict) -> str:
    h, t = hf["after"], ts["after"]

    def f(x):
        return "-" if x is None else f"{x:.0f}"

    lines = ["| after trial | HF search process: peak RSS (MB) | tunesmith study process: peak "
             "RSS (MB) | tunesmith trial process: peak RSS (MB) | HF s/trial | tunesmith "
             "s/trial |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i in range(max(len(h), len(t))):
        a, b = (h[i] if i < len(h) else {}), (t[i] if i < len(t) else {})
        lines.append(f"| {i + 1} | {f(a.get('peak_mb'))} | {f(b.get('peak_mb'))} | "
                     f"{f(b.get('trial_peak_mb'))} | {f(a.get('seconds'))} | "
                     f"{f(b.get('seconds'))} |")
    growth_h = h[-1]["peak_mb"] - h[0]["peak_mb"]
    growth_t = t[-1]["peak_mb"] - t[0]["peak_mb"]
    ours = max(max(x["peak_mb"] for x in t), max(x["trial_peak_mb"] or 0 for x in t))
    lines += ["", f"Peak growth from trial 1 to trial {len(h)}: HF {growth_h:+.0f} MB, tunesmith "
              f"study process {growth_t:+.0f} MB. Largest single process: HF "
              f"{h[-1]['peak_mb']:.0f} MB, tunesmith {ours:.0f} MB "
              f"({ours / h[-1]['peak_mb']:.2f}x)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--child")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        run = run_hf if args.child == "hf" else run_tunesmith
        print("RESULT " + json.dumps(run(args.trials, args.steps, args.model)), flush=True)
        return
    hf = measure("hf", args.trials, args.steps, args.model)
    ts = measure("tunesmith", args.trials, args.steps, args.model)
    text = table(hf, ts)
    print(text)
    if args.out:
        section = (f"## Hyperparameter search: memory across trials\n\nMachine: "
                   f"{platform.processor() or platform.machine()}. Command: `.venv/bin/python "
                   f"bench/search_memory.py --trials {args.trials} --steps {args.steps} --out "
                   f"{args.out}`. {args.model}, SMS spam chat rows, LoRA r=16/alpha 32/all "
                   f"linear, batch {BATCH}, {args.steps} steps per trial, learning rate searched "
                   f"by seeded TPE; HF Trainer.hyperparameter_search (Optuna backend, "
                   f"model_init per trial, one process) against tunesmith tune (a process per "
                   f"trial).\n\n{text}\n")
        replace_section(args.out, "## Hyperparameter search: memory across trials", section)


if __name__ == "__main__":
    main()
