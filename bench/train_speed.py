"""Training speed and memory: tunesmith's loop against HF Trainer + PEFT, in one invocation.

    .venv/bin/python bench/train_speed.py [--steps 30] [--repeat 3] [--out docs/benchmarks.md]
    .venv/bin/python bench/train_speed.py --steps 2 --model DIR   # smoke: any small model
    python bench/train_speed.py --device cuda --batch 64 --steps 30 --repeat 2   # on a GPU

Both engines train the bundled SmolLM2-135M-Instruct on the same SMS-spam chat rows, with the
same tokenisation and prompt masking (tunesmith's ``encode_chat``), LoRA r=16 / alpha 32 /
dropout 0.05 on all linear layers, AdamW, the same learning rate, cosine schedule, clipping,
batch size and number of steps. HF Trainer runs in fp32 with dynamic padding (its usual
setup); tunesmith with its defaults (packing, bf16 where native, target-only LM head).

Each engine runs in its own process, so each peak RSS is its own. Reported: trained tokens/s
(non-padding tokens of the examples per second of training-loop wall time), peak RSS, and the
final validation loss (target tokens, computed by the same function for both, in fp32). Each
engine's figures are printed as it finishes (a ``measured ...`` line, tunesmith first), so a
run cut short still leaves them; the tables follow at the end.

On a GPU (``--device cuda``) the same engines train on it; TRL runs in bf16 there (its default
where bf16 is native), the peak GPU memory (``torch.cuda.max_memory_allocated``) is reported
beside the RSS, and the limit is the GPU's measured bf16 matrix rate (8,192-square products).
``--batch`` sets the rows per step for every engine (8 by default: the CPU recipe; a GPU is
only busy with more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

DATA = REPO / "examples" / "sms_spam" / "sms_spam.jsonl"
LR, BATCH, MAX_LEN, SEED = 3e-4, 8, 256, 0
DEVICE = "cpu"  # --device: cpu or cuda (auto: cuda where there is one)
QUANTIZE = "none"  # --quantize-base nf4: tunesmith trains on a 4-bit base (QLoRA; CUDA only)
MODEL = "smollm2-135m-instruct"  # --model: a directory instead (the suite's smoke run)
SHARED_DROPOUT = True  # --per-module-dropout: tunesmith's adapters draw a mask each, as PEFT's
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def rows(steps: int) -> tuple[list, list]:
    lines = DATA.read_text(encoding="utf-8").splitlines()
    random.Random(SEED).shuffle(lines)
    data = [json.loads(x)["messages"] for x in lines]
    return data[: steps * BATCH], data[-64:]


def setup(steps: int, dtype: str = "float32", *, peer: bool = True, quantize: str = "none"):
    """The model with fresh adapters and the rows. A peer gets its adapters from PEFT as its
    users would (PEFT's own dropout); tunesmith from ``add_lora`` (its faster CPU dropout)."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.data.encode import encode_chat
    from tunesmith.models.load import add_lora, load
    from tunesmith.models.resolve import default_home, resolve_model

    model, tok = load(resolve_model(MODEL, home=default_home()), dtype=dtype, quantize=quantize)
    train_rows, valid_rows = rows(steps)
    train = [e for e in (encode_chat(tok, m) for m in train_rows) if len(e) <= MAX_LEN]
    valid = [encode_chat(tok, m) for m in valid_rows]
    torch.manual_seed(SEED)
    if peer:
        model = get_peft_model(model, LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    else:
        model = add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                         target_modules=LORA["target_modules"], shared_dropout=SHARED_DROPOUT)
    return model, tok, train, valid


def final_valid_loss(model, tok, valid) -> float:
    from tunesmith.training.loop import evaluate_objective
    from tunesmith.training.objectives import LMObjective

    if not getattr(model, "is_quantized", False):  # 4-bit weights stay 4-bit
        model.float()
    return evaluate_objective(LMObjective(model, pad_id=tok.pad_token_id), valid,
                              batch_size=16, device=next(model.parameters()).device
                              )["valid_loss"]


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


# The peers' shared training arguments: HF Trainer's and TRL's SFTConfig take the same ones.
def trainer_args(steps: int, output_dir: str) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=BATCH, max_steps=steps,
                learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to=[],
                use_cpu=DEVICE == "cpu", seed=SEED, dataloader_num_workers=0, disable_tqdm=True)


def timed(trainer, model, tok, train, valid, steps: int) -> dict:
    started = time.perf_counter()
    trainer.train()
    synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in train[: steps * BATCH])
    return {"tokens": tokens, "seconds": seconds, "steps": steps,
            "valid_loss": final_valid_loss(model, tok, valid)}


def run_hf(steps: int, bf16: bool = False) -> dict:
    """HF Trainer + PEFT with dynamic padding, in fp32 or with ``bf16=True`` (autocast)."""
    from transformers import Trainer, TrainingArguments

    model, tok, train, valid = setup(steps)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in train]
    args = TrainingArguments(**trainer_args(steps, "/tmp/bench-hf"), bf16=bf16,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=padding_collator(tok.pad_token_id))
    return timed(trainer, model, tok, train, valid, steps)


def run_trl(steps: int) -> dict:
    """TRL's SFTTrainer, padding-free: each batch's examples in one row, no padding, each
    attending to itself (its collator's position ids restart per example), in fp32."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok, train, valid = setup(steps)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in train])
    # SFTConfig turns on bf16 and gradient checkpointing by default, unlike TrainingArguments:
    # both off on the CPU, as in the HF arm (bf16 is emulated, and slow, on CPUs without it);
    # bf16 kept on a GPU, as TRL's users there run it
    args = SFTConfig(**trainer_args(steps, "/tmp/bench-trl"), padding_free=True,
                     max_length=None, dataset_kwargs={"skip_prepare_dataset": True},
                     bf16=DEVICE == "cuda", gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    return timed(trainer, model, tok, train, valid, steps)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(dtype: torch.dtype, size: int | None = None, seconds: float = 2.0) -> float:
    """This machine's rate for a square matmul in ``dtype`` (all of torch's threads, or the
    GPU: 8,192 squares there, 1,024 on the CPU)."""
    size = size or (8192 if DEVICE == "cuda" else 1024)
    a, b = (torch.randn(size, size, dtype=dtype, device=DEVICE) for _ in range(2))
    a @ b
    synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
        synchronize()
    return 2 * size ** 3 * done / (time.perf_counter() - started) / 1e9


def lora_flops_per_token() -> float:
    """FLOPs to train one token with LoRA: forward and the backward to the activations through
    every linear layer and the LM head (2 + 2 per weight); the frozen weights get no
    gradients, and the adapters' own products are negligible beside them."""
    from transformers import AutoConfig

    from tunesmith.models.resolve import default_home, resolve_model

    config = AutoConfig.from_pretrained(resolve_model(MODEL, home=default_home()))
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f  # q, o; k, v; gate, up, down
    return 4.0 * (layers * per_layer + h * config.vocab_size)


def run_tunesmith(steps: int) -> dict:
    from tunesmith.training.loop import LoopSettings, train
    from tunesmith.training.precision import load_dtype

    # tunesmith's default: frozen weights loaded straight in bf16 where training runs in bf16
    dtype = load_dtype("auto", precision="auto", method="lora", device=torch.device(DEVICE))
    model, tok, data, valid = setup(steps, dtype, peer=False, quantize=QUANTIZE)
    settings = LoopSettings(learning_rate=LR, epochs=1, batch_size=BATCH, total_steps=steps,
                            eval_every=steps, schedule="cosine", max_grad_norm=1.0, packing=True,
                            pack_capacity=MAX_LEN, precision="auto", seed=SEED)
    started = time.perf_counter()
    result = train(model, data, [], settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=Path("/tmp/bench-tunesmith"))
    synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(len(e) for e in data[: steps * BATCH])
    return {"tokens": tokens, "seconds": seconds, "precision": result.precision,
            "steps": steps, "valid_loss": final_valid_loss(model, tok, valid)}


ENGINES = {"hf": run_hf, "hf_bf16": lambda steps: run_hf(steps, bf16=True), "trl": run_trl,
           "tunesmith": run_tunesmith}


def child(engine: str, steps: int) -> None:
    torch.manual_seed(SEED)
    result = ENGINES[engine](steps)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    if DEVICE == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print("RESULT " + json.dumps(result), flush=True)


def measure(engine: str, steps: int) -> dict:
    """One engine in a process of its own, so its peak RSS is its own."""
    extra = ["--seed", str(SEED), "--device", DEVICE, "--batch", str(BATCH),
             "--quantize-base", QUANTIZE] + (
        [] if SHARED_DROPOUT else ["--per-module-dropout"])
    # a CPU run on a machine with a GPU must not find it (Accelerate would take it)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if DEVICE == "cpu" else {})}
    done = subprocess.run([sys.executable, __file__, "--child", engine, "--steps", str(steps),
                           "--model", MODEL, *extra], capture_output=True, text=True,
                          check=False, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    # each engine's figures as soon as they exist: a run cut short (a lent GPU's time running
    # out) still leaves what it measured
    gpu = f", peak GPU {result['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in result else ""
    print(f"measured {engine}: {result['tokens_per_s']:.0f} trained tokens/s over "
          f"{result['steps']} steps, peak RSS {result['peak_rss_gb']:.2f} GB{gpu}, final "
          f"validation loss {result['valid_loss']:.4f}", flush=True)
    return result


def combined(runs: list[dict]) -> dict:
    """One engine's rounds as one: the median tokens/s and loop seconds, the highest peak RSS,
    the validation loss (the same in every round: same seed, same steps)."""
    out = dict(runs[0])
    for key in ("tokens_per_s", "seconds"):
        out[key] = statistics.median(r[key] for r in runs)
    for key in ("peak_rss_gb", "peak_gpu_gb"):
        if key in out:
            out[key] = max(r[key] for r in runs)
    return out


def ratio_table(peer_name: str, short: str, peer: dict, ts: dict,
                rows: list[tuple[str, str, str]]) -> str:
    """A Markdown table of (label, key, format) rows: the peer, tunesmith, and their ratio."""
    def row(name: str, key: str, fmt: str) -> str:
        ratio = ts[key] / peer[key]
        return f"| {name} | {fmt.format(peer[key])} | {fmt.format(ts[key])} | {ratio:.2f}x |"

    return "\n".join([f"| measure | {peer_name} | tunesmith | tunesmith / {short} |",
                      "| --- | ---: | ---: | ---: |", *(row(*r) for r in rows)])


ROWS = [("trained tokens/s", "tokens_per_s", "{:.0f}"), ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
        ("final validation loss", "valid_loss", "{:.4f}"),
        ("training-loop seconds", "seconds", "{:.1f}")]
GPU_ROW = ("peak GPU memory (GB)", "peak_gpu_gb", "{:.2f}")
PEERS = {"hf": ("HF Trainer + PEFT (fp32)", "HF"),
         "hf_bf16": ("HF Trainer + PEFT (bf16=True)", "HF bf16"),
         "trl": ("TRL SFTTrainer, padding-free (fp32)", "TRL")}


def table(hf: dict, ts: dict) -> str:
    return ratio_table(*PEERS["hf"], hf, ts, ROWS)


def main() -> None:
    global MODEL, SHARED_DROPOUT, SEED, DEVICE, BATCH, QUANTIZE
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bf16-steps", type=int, default=None,
                        help="steps of the HF bf16 peer (default --steps; fewer where bf16 is "
                        "emulated: its tokens/s are per its own steps, its validation loss is "
                        "then not comparable)")
    parser.add_argument("--peers", default="hf,hf_bf16,trl",
                        help="comma-separated: hf, hf_bf16, trl (the suite's smoke: hf)")
    parser.add_argument("--child")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default=MODEL, help="model name or directory")
    parser.add_argument("--per-module-dropout", action="store_true",
                        help="tunesmith with train.lora.shared_dropout false (a mask per adapter)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every engine, the order turning each round; reported: "
                        "the median tokens/s and each round's ratios")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="the rows' order (which are trained and validated on) and the "
                        "adapters' initial weights")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where every engine trains (auto: a CUDA GPU where there is one)")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per step, every engine")
    parser.add_argument("--quantize-base", choices=["none", "nf4"], default="none",
                        help="nf4: tunesmith trains LoRA on a 4-bit base (QLoRA, CUDA only); "
                        "the peers keep theirs")
    args = parser.parse_args()
    MODEL, SHARED_DROPOUT, SEED, BATCH, QUANTIZE = (
        args.model, not args.per_module_dropout, args.seed, args.batch, args.quantize_base)
    DEVICE = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: this machine has no CUDA GPU")
        PEERS["trl"] = ("TRL SFTTrainer, padding-free (bf16)", "TRL")
    if args.child:
        child(args.child, args.steps)
        return
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"--peers: unknown {sorted(unknown)}; choose from {sorted(PEERS)}")
    # tunesmith first in the first round: the figure a run cut short most needs
    engines = ["tunesmith", *peers]
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    rate_runs: list[dict[str, float]] = []
    for round_ in range(args.repeat):
        # the order turns each round, so no engine always runs first or last while the
        # machine's speed drifts
        for e in engines[round_ % len(engines):] + engines[:round_ % len(engines)]:
            runs[e].append(measure(e, args.bf16_steps if e == "hf_bf16" and args.bf16_steps
                                   else args.steps))
        rate_runs.append({"fp32": matmul_gflops(torch.float32),
                          "bf16": matmul_gflops(torch.bfloat16)})
    found = {p: combined(runs[p]) for p in peers}
    ts = combined(runs["tunesmith"])
    rates = {k: statistics.median(r[k] for r in rate_runs) for k in ("fp32", "bf16")}
    flops = lora_flops_per_token()
    limits = {k: v * 1e9 / flops for k, v in rates.items()}
    rows_ = [*ROWS[:2], GPU_ROW, *ROWS[2:]] if DEVICE == "cuda" else ROWS
    text = "\n\n".join(ratio_table(*PEERS[p], r, ts, rows_ if r["steps"] == args.steps
                                     else rows_[:2]) for p, r in found.items())
    if args.repeat > 1:
        text += "\n\n" + "\n".join(
            f"tunesmith / {PEERS[p][1]} in each round: " + ", ".join(
                f"{t['tokens_per_s'] / q['tokens_per_s']:.2f}x"
                for t, q in zip(runs["tunesmith"], runs[p], strict=True)) for p in peers)
        text += "\n\ntokens/s in each round: " + "; ".join(
            f"{PEERS[e][1] if e in PEERS else e} "
            + ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs[e]) for e in engines)
    limit_text = "\n".join(
        f"{k} matmul: {rates[k]:.1f} GFLOP/s -> LoRA limit {limits[k]:.0f} tokens/s "
        f"({flops / 1e6:.0f} MFLOP per trained token); tunesmith at "
        f"{100 * ts['tokens_per_s'] / limits[k]:.1f}% of it" for k in ("bf16", "fp32"))
    print(text)
    print(f"tunesmith: {ts['tokens_per_s']:.0f} trained tokens/s, peak RSS "
          f"{ts['peak_rss_gb']:.2f} GB, final validation loss {ts['valid_loss']:.4f}")
    print(limit_text)
    machine = (f"{torch.cuda.get_device_name()}" if DEVICE == "cuda" else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"tunesmith precision: {ts['precision']}; {args.steps} steps of batch {BATCH}; "
          f"{ts['tokens']} trained tokens each; tunesmith's base weights "
          f"{'unquantised' if QUANTIZE == 'none' else QUANTIZE}; {machine}, "
          f"torch {torch.__version__}")
    if args.out:
        heading = ("## Training speed on CUDA" if DEVICE == "cuda" else "## Training speed") + (
            "" if QUANTIZE == "none" else f", tunesmith on a {QUANTIZE} base")
        section = (f"{heading}\n\nMachine: {machine}, torch {torch.__version__}. Command: "
                   f"`python bench/train_speed.py --device {DEVICE} --batch {BATCH} --steps "
                   f"{args.steps} --repeat {args.repeat} --peers {args.peers} --quantize-base "
                   f"{QUANTIZE} --model {MODEL} --out {args.out}` (tokens/s: the median of the "
                   f"rounds). SMS spam chat rows, LoRA r=16/alpha 32/"
                   f"all linear, batch {BATCH}, lr {LR}, cosine, {args.steps} steps; tunesmith "
                   f"precision {ts['precision']}.\n\n{text}\n\n{limit_text}\n")
        replace_section(args.out, heading, section)


def replace_section(path: Path, heading: str, section: str) -> None:
    """Write ``section`` into ``path``, replacing an earlier section under the same heading."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    start = text.find(heading + "\n")  # the whole heading line, not a longer one
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
