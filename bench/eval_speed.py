"""Evaluation by scoring against evaluation by generating: time, accuracy and agreement.

    .venv/bin/python bench/eval_speed.py [--run runs/sms-spam] [--max-items N] [--out eval.json]
    .venv/bin/python bench/eval_speed.py --smoke --model DIR   # any model, a handful of items

One model answers one test set both ways (``eval.mode``), in one process, through the run's
own evaluation (``flows.assess.evaluate_lm``, as ``tunesmith run`` evaluates the tuned model
without the calibration extras):

- ``score``: the label with the highest log-probability (``evaluation.scoring``: the prompts'
  shared prefix once, then one pass per batch with each item's labels branching off it);
- ``generate``: greedy generation of up to ``eval.max_new_tokens`` (auto: the longest label's
  tokens + 2), the reply parsed to a label; a reply naming no label or several is invalid
  (``models.generation.generate``: the prompts' shared prefix once too, then each batch's
  rest and its one-token steps).

Default: a finished run's merged model on that run's test split (``data/test.jsonl``), with
its eval settings (labels, batch size). Smoke mode: ``--model`` (a directory) on the first
``--max-items`` (8) SMS-spam examples, labels spam/ham; the tiny random model's figures mean
nothing, the run only shows the code works. Each mode first answers two items untimed (warm-up),
then the whole set is timed once, score first. Reported: items, seconds per mode, the speed
ratio score / generate (generate seconds over score seconds: above 1, scoring is faster),
accuracy each way, invalid generated replies, the items where the two answers differ, and
the token slots each way's forward passes held (padding included; passes over many columns
apart from generation's one-token decode steps), beside the tokens of the prompts whole. At an
equal cost per slot, the ratio of the slots bounds the speed ratio: neither way can run fewer
tokens than each item's own after the shared prefix, and scoring adds its labels' tokens where
generation adds its replies'.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SMS = REPO / "examples" / "sms_spam" / "sms_spam.jsonl"
MODES = ("score", "generate")


def run_setup(run_dir: Path, max_items: int | None):
    """The run's merged model, its test split, eval settings and labels."""
    from tunesmith.flows.finished import open_run

    done = open_run(run_dir)
    if done.config.eval.task != "classification" or done.head:
        sys.exit(f"{run_dir}: scoring needs a classification run answering in text "
                 "(eval.task: classification, train.head: lm)")
    test = done.split("test")[:max_items]
    return str(done.merged), test, done.config.eval, done.labels


def smoke_setup(max_items: int):
    """A handful of SMS-spam examples, the run's default eval settings for them."""
    from tunesmith.config import EvalConfig
    from tunesmith.data.chat import ChatExample

    lines = SMS.read_text(encoding="utf-8").splitlines()[:max_items]
    test = [ChatExample(messages=json.loads(x)["messages"]) for x in lines]
    labels = ["spam", "ham"]
    return test, EvalConfig(task="classification", labels=labels, positive_label="spam",
                            batch_size=4), labels


def answer(model, tokenizer, test, ev, labels, mode: str) -> tuple[float, object, dict]:
    """Seconds to answer ``test`` in ``mode``, the evaluation (after an untimed warm-up), and
    the token slots its forward passes held: passes over many columns (prompts, scoring's
    batches) and one-column passes (generation's decode steps)."""
    from tunesmith.flows import assess
    from tunesmith.models.load import unwrap

    ev = ev.model_copy(update={"mode": mode})
    assess.evaluate_lm(model, tokenizer, test[:2], ev, labels, score_labels=False)
    slots = {"passes": 0, "wide_slots": 0, "decode_steps": 0, "decode_slots": 0}

    def count(_module, _args, kwargs):
        shape = kwargs["input_ids"].shape
        wide = shape[1] > 1
        slots["passes" if wide else "decode_steps"] += 1
        slots["wide_slots" if wide else "decode_slots"] += shape[0] * shape[1]

    hook = unwrap(model).get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    try:
        started = time.perf_counter()
        found = assess.evaluate_lm(model, tokenizer, test, ev, labels, score_labels=False)
        seconds = time.perf_counter() - started
    finally:
        hook.remove()
    return seconds, found, slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "sms-spam",
                        help="a finished classification run (its merged model and test split)")
    parser.add_argument("--model", default=None,
                        help="smoke mode: the model directory (default mode: the run's merged)")
    parser.add_argument("--max-items", type=int, default=None,
                        help="answer only the first N test items (smoke: 8)")
    parser.add_argument("--smoke", action="store_true", help="--model on a handful of items")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from tunesmith.evaluation.metrics import INVALID
    from tunesmith.models.load import load
    from tunesmith.models.resolve import default_home, resolve_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.smoke:
        if not args.model:
            parser.error("--smoke needs --model DIR")
        test, ev, labels = smoke_setup(args.max_items or 8)
        model_ref = args.model
    else:
        model_ref, test, ev, labels = run_setup(args.run, args.max_items)
        model_ref = args.model or model_ref
    model, tokenizer = load(resolve_model(model_ref, home=default_home()))
    model.eval()
    seconds, evals, slots = {}, {}, {}
    for mode in MODES:
        seconds[mode], evals[mode], slots[mode] = answer(model, tokenizer, test, ev, labels,
                                                         mode)
        print(f"{mode}: {len(test)} items in {seconds[mode]:.2f} s, accuracy "
              f"{evals[mode].metrics['accuracy']:.4f}", flush=True)
    from tunesmith.data.encode import encode_prompt

    # what passes over whole prompts would hold without padding
    prompt_tokens = sum(len(encode_prompt(tokenizer, ex.prompt)) for ex in test)
    score, gen = (evals[m].predictions for m in MODES)
    differ = [i for i, (a, b) in enumerate(zip(score.predicted, gen.predicted, strict=True))
              if a != b]
    invalid = sum(p == INVALID for p in gen.predicted)
    result = {
        "model": model_ref, "smoke": args.smoke, "items": len(test), "labels": labels,
        "batch_size": ev.batch_size, "max_new_tokens": ev.max_new_tokens,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "seconds": {m: round(seconds[m], 3) for m in MODES},
        "speed_score_over_generate": seconds["generate"] / seconds["score"]
        if seconds["score"] else None,
        "accuracy": {m: evals[m].metrics["accuracy"] for m in MODES},
        # token slots each way's forward passes held (padding included): what bounds the ratio
        "slots": slots,
        "prompt_tokens": prompt_tokens,
        "generate_invalid": invalid,
        "disagree": len(differ),
        # where the two differ: the generated reply beside the scored label
        "disagreements": [{"index": i, "expected": score.expected[i], "score": score.predicted[i],
                           "generate": gen.predicted[i], "reply": gen.replies[i]}
                          for i in differ[:20]],
    }
    ratio = result["speed_score_over_generate"]
    print(f"items: {len(test)}")
    print(f"seconds: score {seconds['score']:.2f}, generate {seconds['generate']:.2f}")
    print("speed score / generate: " + (f"{ratio:.2f}x" if ratio else "-"))
    print(f"accuracy: score {result['accuracy']['score']:.4f}, generate "
          f"{result['accuracy']['generate']:.4f} ({invalid} invalid generated replies)")
    print(f"disagree: {len(differ)} of {len(test)} items")
    print(f"prompts whole: {prompt_tokens} tokens")
    for m in MODES:
        c = slots[m]
        print(f"slots {m}: {c['wide_slots']} in {c['passes']} passes, {c['decode_slots']} in "
              f"{c['decode_steps']} one-token steps")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
