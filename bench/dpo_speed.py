"""LoRA-DPO speed and memory: tunesmith against TRL's DPOTrainer + PEFT, in one invocation.

    .venv/bin/python bench/dpo_speed.py [--steps 10] [--batch-size 8] [--out dpo.json]
    .venv/bin/python bench/dpo_speed.py --smoke          # tiny random model, 2 steps

Both engines train LoRA adapters (r=16, alpha 32, no dropout, all linear layers) of the
bundled SmolLM2-135M-Instruct with the DPO loss (beta 0.1) on the same SMS-spam preference
pairs, in fp32 on the CPU, with AdamW, the same learning rate, cosine schedule, clipping, batch
size and number of steps, and without evaluation or saving. They see the same batches in the
same order (TRL reads the pairs in the order tunesmith's seeded shuffle gives; its own sampler
would shuffle differently) and tokenize the chat alike (tests/unit/training/
test_dpo_matches_trl.py checks it), so their losses should agree step by step.

tunesmith runs as its DPO run does: the reference log-probs of the pairs first (adapters off,
one no-grad pass), then the loop with packed pairs. Its time covers both. TRL runs as
configured by default, but fp32 and without gradient checkpointing (both on by default in its
``DPOConfig``; tunesmith has checkpointing off by default too): padded rows, the reference
computed with the adapters off at every step. Its time is ``trainer.train()``. Tokenizing is
timed for neither.

Each engine runs in its own process, so each peak RSS (ru_maxrss) is its own. Reported: pairs
per second, peak RSS, the last step's training loss and the mean over all steps. A third
process runs tunesmith's LoRA SFT on the same rows (prompt + chosen answer) with the same
settings: LoRA-DPO's peak RSS is held to at most 1.3x of it (a step's pairs run in passes of
no more tokens than SFT's, see ``training.preference.pair_passes``).

The pairs are ``examples/sms_spam/preferences/train.jsonl`` (OpenAI preference format); where
that file is missing, synthetic pairs built the same way from ``sms_spam.jsonl``: the SMS
classification prompt, the right label preferred, the wrong one (alone, or in a verbose
sentence, as the base model answers) not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from train_speed import ratio_table  # noqa: E402

PAIRS = REPO / "examples" / "sms_spam" / "preferences" / "train.jsonl"
SMS = REPO / "examples" / "sms_spam" / "sms_spam.jsonl"
LR, BETA, MAX_LEN, SEED = 2e-4, 0.1, 256, 0  # as examples/sms_spam/dpo.yaml
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
VERBOSE = {
    "spam": "Based on its content, I would classify this SMS message as spam: it reads like an "
            "unsolicited offer sent to many people at once.",
    "ham": "This SMS message looks like ham to me. It reads like an ordinary personal message "
           "between people who know each other, not an advertisement.",
}


def synthetic_rows(n: int) -> list[dict]:
    """Preference rows from the SFT file: right label preferred, wrong one (often verbose) not."""
    rows = []
    for line in SMS.read_text(encoding="utf-8").splitlines()[: n + 50]:
        messages = json.loads(line)["messages"]
        label = messages[-1]["content"]
        wrong = "ham" if label == "spam" else "spam"
        rejected = wrong if len(rows) % 3 == 0 else VERBOSE[wrong]
        rows.append({"input": {"messages": messages[:-1]},
                     "preferred_output": [{"role": "assistant", "content": label}],
                     "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return rows


def read_rows(path: Path, n: int) -> tuple[list[dict], str]:
    """Preference rows (prompt, chosen and rejected messages) for ``n`` pairs, and where they
    came from."""
    if path.is_file():
        raw = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        source = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    else:
        raw, source = synthetic_rows(4 * n), "synthetic (from sms_spam.jsonl)"
    return [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
             "rejected": r["non_preferred_output"]} for r in raw], source


def prepare(args: argparse.Namespace):
    """Model (fp32), tokenizer, and the rows both engines train on, with their encodings."""
    from tunesmith.data.encode import encode_pair
    from tunesmith.models.load import load
    from tunesmith.models.resolve import default_home, resolve_model
    from tunesmith.training.batches import epoch_order

    model_dir = Path(args.model) if Path(args.model).is_dir() else resolve_model(
        args.model, home=default_home())
    model, tok = load(model_dir, dtype="float32")
    n = args.steps * args.batch_size
    rows, source = read_rows(args.data, n)
    kept = []
    for r in rows:
        pair = encode_pair(tok, r["prompt"], r["chosen"], r["rejected"])
        if len(pair) <= MAX_LEN and pair.n_targets > 0:
            kept.append((r, pair))
        if len(kept) == n:
            break
    if len(kept) < n:
        raise SystemExit(f"{source}: only {len(kept)} usable pairs, {n} needed")
    # tunesmith shuffles its n pairs with epoch_order; TRL reads them in that order unshuffled
    order = epoch_order(n, seed=SEED, epoch=0)
    return model, tok, [p for _, p in kept], [kept[i][0] for i in order], source


def lora_setup(args: argparse.Namespace):
    """The model with fresh LoRA adapters (seeded), the pairs, and the loop settings both of
    tunesmith's runs (DPO and SFT on the same rows) use."""
    import torch

    from tunesmith.models.load import add_lora
    from tunesmith.training.loop import LoopSettings

    model, tok, pairs, _, source = prepare(args)
    torch.manual_seed(SEED)
    model = add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                     target_modules=LORA["target_modules"])
    settings = LoopSettings(learning_rate=LR, epochs=1, batch_size=args.batch_size,
                            total_steps=args.steps, eval_every=args.steps, warmup_steps=0,
                            schedule="cosine", max_grad_norm=1.0, weight_decay=0.0,
                            packing=True, pack_capacity=MAX_LEN, precision="fp32", seed=SEED)
    return model, tok, pairs, source, settings


class Losses:
    """A loop callback keeping each step's training loss."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step(self, loop, metrics):  # noqa: ARG002 - the callback protocol
        self.values.append(metrics["train_loss"])


def run_tunesmith(args: argparse.Namespace) -> dict:
    from tunesmith.training.loop import fit
    from tunesmith.training.preference import (
        PreferenceObjective,
        reference_log_probs,
        with_reference,
    )
    from tunesmith.training.setup import setup

    model, tok, pairs, source, settings = lora_setup(args)
    losses = Losses()
    started = time.perf_counter()
    reference = reference_log_probs(model, pairs, pad_id=tok.pad_token_id)
    ref_seconds = time.perf_counter() - started
    parts = setup(model, lambda m, precision: PreferenceObjective(
        m, loss="dpo", beta=BETA, pad_id=tok.pad_token_id, precision=precision, packing=True,
        pack_capacity=MAX_LEN), with_reference(pairs, reference), settings=settings)
    fit(parts, settings=settings, callbacks=[losses])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "reference_seconds": ref_seconds, "losses": losses.values,
            "data": source, "tokens": sum(len(p.chosen) + len(p.rejected) for p in pairs)}


def run_sft(args: argparse.Namespace) -> dict:
    """tunesmith's LoRA SFT on the same rows (prompt + chosen answer), the same settings: the
    memory DPO is held to (at most 1.3x SFT's peak RSS)."""
    from tunesmith.training.loop import train

    model, tok, pairs, source, settings = lora_setup(args)
    started = time.perf_counter()
    losses = Losses()
    train(model, [p.chosen for p in pairs], [], settings=settings, pad_id=tok.pad_token_id,
          checkpoint_dir=Path(tempfile.mkdtemp()), callbacks=[losses])
    return {"seconds": time.perf_counter() - started, "losses": losses.values, "data": source,
            "tokens": sum(len(p.chosen) for p in pairs)}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model, tok, _, rows, source = prepare(args)

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=None,
        bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, seed=SEED, dataloader_num_workers=0,
        disable_tqdm=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = InOrder(model=model, args=config, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "losses": losses, "data": source}


def child(args: argparse.Namespace) -> None:
    result = {"trl": run_trl, "sft": run_sft, "tunesmith": run_tunesmith}[args.child](args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    if args.child == "trl":
        import trl

        result["trl_version"] = trl.__version__
    print("RESULT " + json.dumps(result), flush=True)


def measure(engine: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", engine, "--steps", str(args.steps),
         "--batch-size", str(args.batch_size), "--data", str(args.data), "--model",
         str(args.model)], capture_output=True, text=True, check=False, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result["pairs_per_s"] = args.steps * args.batch_size / result["seconds"]
    result["final_loss"] = result["losses"][-1]
    result["mean_loss"] = sum(result["losses"]) / len(result["losses"])
    return result


def table(trl: dict, ts: dict) -> str:
    return ratio_table("TRL DPOTrainer + PEFT", "TRL", trl, ts, [
        ("pairs/s (reference included)", "pairs_per_s", "{:.2f}"),
        ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
        ("last step's DPO loss", "final_loss", "{:.4f}"),
        ("mean DPO loss over the steps", "mean_loss", "{:.4f}"),
        ("seconds", "seconds", "{:.1f}")])


def tiny_model(directory: Path) -> Path:
    """A random 2-layer Llama with the bundled tokenizer (smoke mode: the code runs, fast)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.resolve import default_home, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct", home=default_home()))
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, default=PAIRS,
                        help="preference JSONL (OpenAI format); synthetic pairs if missing")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model name or directory (smoke: a tiny random model if unset)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 steps of 2 pairs")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.smoke:
        args.steps, args.batch_size = 2, 2
        if args.model == parser.get_default("model"):
            args.model = str(tiny_model(Path(tempfile.mkdtemp(prefix="dpo-bench-tiny-"))))
    trl = measure("trl", args)
    ts = measure("tunesmith", args)
    sft = measure("sft", args)
    print(table(trl, ts))
    print()
    print(ratio_table("tunesmith LoRA-SFT (prompt + chosen)", "SFT", sft, ts, [
        ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
        ("tokens trained on", "tokens", "{:d}"),
        ("seconds", "seconds", "{:.1f}")]))
    print(f"{args.steps} steps of {args.batch_size} pairs, beta {BETA}, lr {LR}, fp32; data: "
          f"{ts['data']}; tunesmith's reference pass: {ts['reference_seconds']:.1f} s")
    if args.out:
        import torch

        args.out.write_text(json.dumps({
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "steps": args.steps, "batch_size": args.batch_size, "beta": BETA,
            "learning_rate": LR, "lora": LORA, "model": args.model, "data": ts["data"],
            "smoke": args.smoke, "trl_version": trl["trl_version"], "trl": trl, "tunesmith": ts,
            "sft": sft,
            "ratios": {k: ts[k] / trl[k] for k in ("pairs_per_s", "peak_rss_gb", "seconds")},
            "dpo_over_sft_peak_rss": ts["peak_rss_gb"] / sft["peak_rss_gb"],
        }, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
