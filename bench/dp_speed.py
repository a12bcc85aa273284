"""DP-SGD step time: tunesmith's private training against its non-private training and against
Opacus' own PrivacyEngine, in one invocation.

    .venv/bin/python bench/dp_speed.py [--steps 8] [--batch-size 32] [--out dp.json]
    .venv/bin/python bench/dp_speed.py --smoke --model DIR   # tiny model, 1 timed step of 16

Four arms train LoRA adapters (r=16, alpha 32, no dropout, all linear layers) of the bundled
SmolLM2-135M-Instruct in fp32 on the CPU, with AdamW (no weight decay), the same constant
learning rate, on the same rows: (steps + 1) x B SMS-spam chat examples (the label as the
assistant answer, at most 256 tokens, tunesmith's ``encode_chat``), batch size B, 1 warm-up
step (not timed), then ``--steps`` timed steps. No evaluation; a checkpoint is saved only after
the last step, outside the timing.

1. ``tunesmith_packed``: ``train(...)`` as a user runs it, packing on (the loop's default),
   clipping the batch gradient at 1.0 (the default).
2. ``tunesmith_unpacked``: the same, packing off: the same batches, one example per row
   (``group_by_length`` off, so the batches really are the same).
3. ``tunesmith_dp``: ``train(..., wrappers=[Privacy(plan, seed).wrap])`` with ``plan_privacy``
   at noise multiplier 1.0, per-example clipping at 1.0, physical batches of
   ``--physical-batch-size`` (16), Poisson sampling at expected batch B; no batch-gradient clip
   (as ``flows.finetune.loop_settings`` sets it under DP).
4. ``opacus``: Opacus' documented path. ``PrivacyEngine().make_private(module=peft_model,
   optimizer=AdamW, data_loader=DataLoader(rows, batch_size=B), noise_multiplier=1.0,
   max_grad_norm=1.0, poisson_sampling=True, loss_reduction="mean")`` (PEFT's own LoraConfig
   on the same base and seed, so the same initial adapters), ``BatchMemoryManager(
   max_physical_batch_size=16)``, and a plain loop over padded rows calling
   ``model(input_ids, attention_mask, labels)`` (HF's causal-LM loss, labels -100 outside the
   answer, as Opacus' and HF's text tutorials do). Opacus with PEFT can leave the adapters
   silently unchanged or corrupt (opacus issue 820): every arm asserts that every LoRA tensor
   changed and stayed finite.

A step's time runs from the end of the previous optimiser step to the end of this one, so it
covers drawing and collating the batch, forward, backward, clipping, noise and the update
(tunesmith: between the loop's ``on_step`` events; Opacus: between optimiser steps that are
not skipped by ``BatchMemoryManager``). Poisson batches vary in size, so the fair unit is the
time per step (the same expected batch); examples actually processed per second are reported
too. Each arm runs in its own process, so each peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from dpo_speed import tiny_model  # noqa: E402
from train_speed import ratio_table  # noqa: E402

DATA = REPO / "examples" / "sms_spam" / "sms_spam.jsonl"
LR, MAX_LEN, SEED = 3e-4, 256, 0  # as examples/sms_spam/config.yaml
SIGMA, CLIP = 1.0, 1.0  # noise multiplier, per-example clipping bound
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
ARMS = ("tunesmith_packed", "tunesmith_unpacked", "tunesmith_dp", "opacus")


def prepare(args: argparse.Namespace):
    """Model (fp32), tokenizer, and the (steps + 1) x batch encoded rows every arm trains on."""
    from tunesmith.data.encode import encode_chat
    from tunesmith.models.load import load
    from tunesmith.models.resolve import default_home, resolve_model

    model_dir = Path(args.model) if Path(args.model).is_dir() else resolve_model(
        args.model, home=default_home())
    model, tok = load(model_dir, dtype="float32")
    n = (args.steps + 1) * args.batch_size
    lines = DATA.read_text(encoding="utf-8").splitlines()
    random.Random(SEED).shuffle(lines)
    data = []
    for line in lines:
        e = encode_chat(tok, json.loads(line)["messages"])
        if len(e) <= MAX_LEN and e.n_targets > 0:
            data.append(e)
        if len(data) == n:
            break
    if len(data) < n:
        raise SystemExit(f"{DATA}: only {len(data)} usable rows, {n} needed")
    return model, tok, data


def lora_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def check_trained(model, before: dict) -> None:
    """Every adapter tensor moved and is finite (opacus issue 820: silent no-op updates)."""
    import torch

    after = lora_weights(model)
    assert after and after.keys() == before.keys(), "no LoRA weights found"
    still = [n for n in before if torch.equal(before[n], after[n])]
    assert not still, f"{len(still)} of {len(before)} LoRA tensors unchanged, e.g. {still[0]}"
    bad = [n for n, p in after.items() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite LoRA weights, e.g. {bad[0]}"


class Clock:
    """Times each optimiser step from the end of the previous one; the first (warm-up) step is
    not timed. As a loop wrapper it also counts the examples of each batch the loop draws."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.seconds: list[float] = []
        self.examples: list[int] = []
        self.steps = 0
        self.drawn: list[int] = []

    def tick(self, examples: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.seconds.append(now - self.last)
            self.examples.append(examples)
        self.last, self.steps = now, self.steps + 1

    # -- tunesmith: a wrapper over the batch source, and a callback -------------------------
    def wrap(self, parts):
        return parts.replace(batches=Counted(parts.batches, self.drawn))

    def on_step(self, loop, metrics):  # noqa: ARG002 - the callback protocol
        self.tick(self.drawn[-1])

    def result(self) -> dict:
        seconds = sum(self.seconds)
        return {"steps": len(self.seconds), "step_seconds": self.seconds,
                "step_examples": self.examples, "seconds_per_step": seconds / len(self.seconds),
                "examples_per_s": sum(self.examples) / seconds}


class Counted:
    """A batch source that records the size of every batch it hands out."""

    def __init__(self, inner, sizes: list[int]) -> None:
        self.inner, self.data, self.sizes = inner, inner.data, sizes

    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch()

    def epoch(self, epoch: int, start_step: int = 0):
        for batch in self.inner.epoch(epoch, start_step):
            self.sizes.append(len(batch))
            yield batch


def run_tunesmith(args: argparse.Namespace) -> dict:
    import torch

    from tunesmith.models.load import add_lora
    from tunesmith.training.loop import LoopSettings, train
    from tunesmith.training.privacy import Privacy, PrivacySettings, plan_privacy

    model, tok, data = prepare(args)
    torch.manual_seed(SEED)
    model = add_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                     target_modules=LORA["target_modules"])
    before = lora_weights(model)
    private, total = args.child == "tunesmith_dp", args.steps + 1
    settings = LoopSettings(
        learning_rate=LR, epochs=1, batch_size=args.batch_size, total_steps=total,
        eval_every=10 ** 9, warmup_steps=0, schedule="constant", weight_decay=0.0,
        max_grad_norm=None if private else 1.0, packing=args.child == "tunesmith_packed",
        pack_capacity=MAX_LEN, group_by_length=False, precision="fp32", seed=SEED,
        restore_best=False)
    clock, privacy, wrappers = Clock(), None, []
    if private:
        plan = plan_privacy(PrivacySettings(noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                            physical_batch_size=args.physical_batch_size),
                            n_examples=len(data), batch_size=args.batch_size, steps=total,
                            epochs=1)
        privacy = Privacy(plan, seed=SEED)
        wrappers.append(privacy.wrap)
    with tempfile.TemporaryDirectory() as ckpt:
        train(model, data, [], settings=settings, pad_id=tok.pad_token_id,
              checkpoint_dir=Path(ckpt), callbacks=[clock], wrappers=[*wrappers, clock.wrap])
    check_trained(model, before)
    result = clock.result()
    if privacy is not None:
        summary = privacy.summary()
        result.update(epsilon=summary["epsilon"], delta=summary["delta"],
                      accounted_steps=summary["steps"])
    return result


def padded(batch, pad_id: int):
    """Right-pad (input_ids, labels, attention_mask) rows to the longest: input_ids with the
    pad id, labels with -100, the mask with 0."""
    import torch

    width = max(len(ids) for ids, _, _ in batch)
    out = [torch.full((len(batch), width), pad_id, dtype=torch.long),
           torch.full((len(batch), width), -100, dtype=torch.long),
           torch.zeros((len(batch), width), dtype=torch.long)]
    for row, item in enumerate(batch):
        for tensor, value in zip(out, item, strict=True):
            tensor[row, :len(value)] = value
    return out


def run_opacus(args: argparse.Namespace) -> dict:
    import opacus
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    from tunesmith.training.privacy import auto_delta

    model, tok, data = prepare(args)
    torch.manual_seed(SEED)
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    before = lora_weights(model)
    rows = [(torch.tensor(e.input_ids), torch.tensor(e.labels),
             torch.ones(len(e), dtype=torch.long)) for e in data]
    loader = DataLoader(rows, batch_size=args.batch_size,
                        collate_fn=lambda batch: padded(batch, tok.pad_token_id))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=0.0)
    engine = PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA,
        max_grad_norm=CLIP, poisson_sampling=True, loss_reduction="mean")
    private.train()
    clock, examples, total = Clock(), 0, args.steps + 1
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=args.physical_batch_size,
                            optimizer=optimizer) as physical:
        while clock.steps < total:
            for ids, labels, mask in physical:
                optimizer.zero_grad()
                if len(ids):  # Poisson sampling may draw nothing
                    loss = private(input_ids=ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                optimizer.step()
                examples += len(ids)
                if not optimizer._is_last_step_skipped:  # the logical batch ended: a real step
                    clock.tick(examples)
                    examples = 0
                    if clock.steps == total:
                        break
    check_trained(model, before)
    delta = auto_delta(len(data))  # tunesmith's delta 'auto', so the epsilons compare
    return {**clock.result(), "epsilon": engine.get_epsilon(delta=delta), "delta": delta,
            "accounted_steps": clock.steps, "opacus_version": opacus.__version__}


def child(args: argparse.Namespace) -> None:
    result = (run_opacus if args.child == "opacus" else run_tunesmith)(args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print("RESULT " + json.dumps(result), flush=True)


def measure(arm: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", arm, "--steps", str(args.steps), "--batch-size",
         str(args.batch_size), "--physical-batch-size", str(args.physical_batch_size),
         "--model", str(args.model)], capture_output=True, text=True, check=False, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


ROWS = [("seconds per step", "seconds_per_step", "{:.3f}"),
        ("examples processed per second", "examples_per_s", "{:.2f}"),
        ("peak RSS (GB)", "peak_rss_gb", "{:.2f}")]


def tables(r: dict) -> str:
    dp = r["tunesmith_dp"]
    return "\n\n".join([
        ratio_table("Opacus PrivacyEngine + PEFT", "Opacus", r["opacus"], dp, ROWS),
        ratio_table("tunesmith non-private, packed", "packed", r["tunesmith_packed"], dp, ROWS),
        ratio_table("tunesmith non-private, unpacked", "unpacked", r["tunesmith_unpacked"], dp,
                    ROWS)])


def ratios(r: dict) -> dict:
    dp = r["tunesmith_dp"]
    return {"dp_over_packed_step_time":
            dp["seconds_per_step"] / r["tunesmith_packed"]["seconds_per_step"],
            "dp_over_unpacked_step_time":
            dp["seconds_per_step"] / r["tunesmith_unpacked"]["seconds_per_step"],
            "dp_over_opacus_step_time": dp["seconds_per_step"] / r["opacus"]["seconds_per_step"],
            "dp_over_opacus_peak_rss": dp["peak_rss_gb"] / r["opacus"]["peak_rss_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="batch size (expected batch size under Poisson sampling)")
    parser.add_argument("--physical-batch-size", type=int, default=16,
                        help="examples per forward/backward pass under DP (both engines)")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model name or directory (smoke: a tiny random model if unset)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 timed step of 16")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.smoke:
        # physical batches of 8 so that both engines split a logical batch
        args.steps, args.batch_size, args.physical_batch_size = 1, 16, 8
        if args.model == parser.get_default("model"):
            args.model = str(tiny_model(Path(tempfile.mkdtemp(prefix="dp-bench-tiny-"))))
    results = {arm: measure(arm, args) for arm in ARMS}
    print("The tunesmith column is tunesmith's DP-SGD run (Privacy wrapper).\n")
    print(tables(results))
    dp, peer = results["tunesmith_dp"], results["opacus"]
    print(f"\n{args.steps} timed steps (+1 warm-up) of (expected) batch {args.batch_size}, "
          f"physical batch {args.physical_batch_size}, noise multiplier {SIGMA}, clip {CLIP}, "
          f"lr {LR}, fp32, {(args.steps + 1) * args.batch_size} rows; epsilon spent: tunesmith "
          f"{dp['epsilon']:.2f} (delta {dp['delta']:.2g}), Opacus {peer['epsilon']:.2f} "
          f"(delta {peer['delta']:.2g})")
    found = ratios(results)
    assert all(math.isfinite(v) and v > 0 for v in found.values()), found
    if args.out:
        import torch

        args.out.write_text(json.dumps({
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "opacus_version": peer["opacus_version"], "steps": args.steps,
            "warmup_steps": 1, "batch_size": args.batch_size,
            "physical_batch_size": args.physical_batch_size, "rows":
            (args.steps + 1) * args.batch_size, "noise_multiplier": SIGMA,
            "max_grad_norm": CLIP, "learning_rate": LR, "lora": LORA, "model": args.model,
            "smoke": args.smoke, "arms": list(ARMS), **results, "ratios": found,
        }, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
