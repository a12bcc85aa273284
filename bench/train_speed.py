"""Training speed and memory: tunesmith's loop against HF Trainer + PEFT, in one invocation.

    .venv/bin/python bench/train_speed.py [--steps 30] [--out docs/benchmarks.md]
    .venv/bin/python bench/train_speed.py --steps 2 --model DIR   # smoke: any small model

Both engines train the bundled SmolLM2-135M-Instruct on the same SMS-spam chat rows, with the
same tokenisation and prompt masking (tunesmith's ``encode_chat``), LoRA r=16 / alpha 32 /
dropout 0.05 on all linear layers, AdamW, the same learning rate, cosine schedule, clipping,
batch size and number of steps. HF Trainer runs in fp32 with dynamic padding (its usual
setup); tunesmith with its defaults (packing, bf16 where native, target-only LM head).

Each engine runs in its own process, so each peak RSS is its own. Reported: trained tokens/s
(non-padding tokens of the examples per second of training-loop wall time), peak RSS, and the
final validation loss (target tokens, computed by the same function for both, in fp32).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

DATA = REPO / "examples" / "sms_spam" / "sms_spam.jsonl"
LR, BATCH, MAX_LEN, SEED = 3e-4, 8, 256, 0
MODEL = "smollm2-135m-instruct"  # --model: a directory instead (the suite's smoke run)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def rows(steps: int) -> tuple[list, list]:
    lines = DATA.read_text(encoding="utf-8").splitlines()
    random.Random(SEED).shuffle(lines)
    data = [json.loads(x)["messages"] for x in lines]
    return data[: steps * BATCH], data[-64:]


def setup(steps: int, dtype: str = "float32"):
    from tunesmith.data.encode import encode_chat
    from tunesmith.models.load import add_lora, load
    from tunesmith.models.resolve import default_home, resolve_model

    model, tok = load(resolve_model(MODEL, home=default_home()), dtype=dtype)
    train_rows, valid_rows = rows(steps)
    train = [e for e in (encode_chat(tok, m) for m in train_rows) if len(e) <= MAX_LEN]
    valid = [encode_chat(tok, m) for m in valid_rows]
    torch.manual_seed(SEED)
    model = add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                     target_modules=LORA["target_modules"])
    return model, tok, train, valid


def final_valid_loss(model, tok, valid) -> float:
    from tunesmith.training.loop import evaluate_objective
    from tunesmith.training.objectives import LMObjective

    model.float()
    return evaluate_objective(LMObjective(model, pad_id=tok.pad_token_id), valid,
                              batch_size=16, device=torch.device("cpu"))["valid_loss"]


def padding_collator(pad_id: int):
    """HF Trainer's usual batches: dynamic padding to the longest row, labels -100 there."""

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = (torch.tensor(b["input_ids"]),
                                                      torch.tensor(b["labels"]), 1)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def run_hf(steps: int) -> dict:
    from transformers import Trainer, TrainingArguments

    model, tok, train, valid = setup(steps)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in train]

    args = TrainingArguments(
        output_dir="/tmp/bench-hf", per_device_train_batch_size=BATCH, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to=[],
        use_cpu=True, seed=SEED, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=padding_collator(tok.pad_token_id))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in train[: steps * BATCH])
    return {"tokens": tokens, "seconds": seconds, "valid_loss": final_valid_loss(model, tok,
                                                                                   valid)}


def run_tunesmith(steps: int) -> dict:
    from tunesmith.training.loop import LoopSettings, train
    from tunesmith.training.precision import load_dtype

    # tunesmith's default: frozen weights loaded straight in bf16 where training runs in bf16
    dtype = load_dtype("auto", precision="auto", method="lora", device=torch.device("cpu"))
    model, tok, data, valid = setup(steps, dtype)
    settings = LoopSettings(learning_rate=LR, epochs=1, batch_size=BATCH, total_steps=steps,
                            eval_every=steps, schedule="cosine", max_grad_norm=1.0, packing=True,
                            pack_capacity=MAX_LEN, precision="auto", seed=SEED)
    started = time.perf_counter()
    result = train(model, data, [], settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=Path("/tmp/bench-tunesmith"))
    seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in data[: steps * BATCH])
    return {"tokens": tokens, "seconds": seconds, "precision": result.precision,
            "valid_loss": final_valid_loss(model, tok, valid)}


def child(engine: str, steps: int) -> None:
    torch.manual_seed(SEED)
    result = (run_hf if engine == "hf" else run_tunesmith)(steps)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print("RESULT " + json.dumps(result), flush=True)


def measure(engine: str, steps: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", engine, "--steps", str(steps),
                           "--model", MODEL], capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def ratio_table(peer_name: str, short: str, peer: dict, ts: dict,
                rows: list[tuple[str, str, str]]) -> str:
    """A Markdown table of (label, key, format) rows: the peer, tunesmith, and their ratio."""
    def row(name: str, key: str, fmt: str) -> str:
        ratio = ts[key] / peer[key]
        return f"| {name} | {fmt.format(peer[key])} | {fmt.format(ts[key])} | {ratio:.2f}x |"

    return "\n".join([f"| measure | {peer_name} | tunesmith | tunesmith / {short} |",
                      "| --- | ---: | ---: | ---: |", *(row(*r) for r in rows)])


def table(hf: dict, ts: dict) -> str:
    return ratio_table("HF Trainer + PEFT (fp32)", "HF", hf, ts, [
        ("trained tokens/s", "tokens_per_s", "{:.0f}"),
        ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
        ("final validation loss", "valid_loss", "{:.4f}"),
        ("training-loop seconds", "seconds", "{:.1f}")])


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default=MODEL, help="model name or directory")
    args = parser.parse_args()
    MODEL = args.model
    if args.child:
        child(args.child, args.steps)
        return
    hf = measure("hf", args.steps)
    ts = measure("tunesmith", args.steps)
    text = table(hf, ts)
    print(text)
    print(f"tunesmith precision: {ts['precision']}; {args.steps} steps of batch {BATCH}; "
          f"{hf['tokens']} trained tokens each")
    if args.out:
        section = (f"## Training speed\n\nMachine: {platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}. Command: "
                   f"`.venv/bin/python bench/train_speed.py --steps {args.steps} --out "
                   f"{args.out}`. SmolLM2-135M-Instruct, SMS spam chat rows, LoRA r=16/alpha 32/"
                   f"all linear, batch {BATCH}, lr {LR}, cosine, {args.steps} steps; tunesmith "
                   f"precision {ts['precision']}.\n\n{text}\n")
        replace_section(args.out, "## Training speed", section)


def replace_section(path: Path, heading: str, section: str) -> None:
    """Write ``section`` into ``path``, replacing an earlier section under the same heading."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
