"""Data preparation speed and memory: validate + clean 100,000 chat examples, and the peak
memory of `clean` on a 1 GB JSONL file.

    .venv/bin/python bench/data_speed.py            # both measurements
    .venv/bin/python bench/data_speed.py --gb 0.1   # a smaller file for a quick look

Generated data goes to /tmp (or --workdir), never into the repository. Examples look like
support tickets: a system prompt, a customer message with order numbers, stray HTML, the odd
look-alike letter and runs of whitespace, and an agent answer; about 3% are exact or near
copies. The tokenizer is the bundled model's (SmolLM2), counted with its chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = [
    "order", "delivery", "parcel", "refund", "invoice", "account", "password", "login",
    "screen", "error", "charge", "twice", "broken", "missing", "damaged", "late", "courier",
    "tracking", "warehouse", "replacement", "warranty", "battery", "charger", "cable",
    "screen", "speaker", "firmware", "update", "subscription", "cancel", "renew", "address",
    "postcode", "billing", "payment", "card", "bank", "transfer", "receipt", "discount",
    "voucher", "code", "please", "urgent", "again", "still", "yesterday", "today", "tomorrow",
    "week", "month", "help", "thanks", "customer", "agent", "manager", "support", "ticket",
    "reply", "email", "phone", "call", "waiting", "hours", "days"
]
SYSTEM = "You are a helpful support agent for Acme Ltd. Answer briefly and politely."
MESSY = ("<p>", "</p>", "<br>", "&nbsp;", "  ", "\u200b", "Οrder", "\r\n")


def ticket(rng: random.Random, i: int) -> dict:
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    user = (f"Ticket {i}: {words(rng.randint(40, 90))} order #{rng.randint(10**6, 10**7)} "
            f"{rng.choice(MESSY)} {words(rng.randint(10, 30))}")
    answer = f"Thanks for reaching out. {words(rng.randint(25, 50))}."
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def generate(path: Path, *, n: int | None = None, size_bytes: int | None = None,
             seed: int = 0) -> int:
    """Write tickets to ``path`` until ``n`` examples or ``size_bytes``; returns the count."""
    rng = random.Random(seed)
    count, written, previous = 0, 0, None
    with path.open("w", encoding="utf-8") as fh:
        while (n is None or count < n) and (size_bytes is None or written < size_bytes):
            row = previous if previous is not None and rng.random() < 0.03 else ticket(rng, count)
            line = json.dumps(row, ensure_ascii=False) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
            previous, count = row, count + 1
    return count


def _child(command: str, src: str, out: str) -> None:
    """Run one stage in this (separate) process and print its seconds and tally as JSON."""
    from tunesmith.flows.prepare import clean_file, load_tokenizer_for, validate_file

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started, cpu_started = time.perf_counter(), time.process_time()
    if command == "validate":
        report = validate_file(src, tokenizer=load_tokenizer_for("smollm2-135m-instruct"),
                               max_tokens=512)
        summary = {"examples": report.examples, "errors": report.n_errors,
                   "warnings": report.n_warnings}
    else:
        result = clean_file(src, out, on_error="skip")
        summary = result.tally.to_json()
    seconds = time.perf_counter() - started
    # CPU seconds of all this process's threads (the tokenizer runs on several): the figure to
    # compare when other work shares the machine and stretches the wall-clock time
    cpu = time.process_time() - cpu_started
    # the kernel's high-water mark of this process's resident memory (KiB on Linux); the
    # process runs nothing but this stage, so the figure includes Python, torch and
    # transformers that `import tunesmith` loads
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                      "peak_rss_mib": round(peak, 1),
                      "rss_after_imports_mib": round(baseline, 1), **summary}))


def run_child(command: str, src: Path, out: Path) -> dict:
    """Run a stage in a fresh process, so its peak memory is its own."""
    proc = subprocess.run([sys.executable, __file__, "--child", command, str(src), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--gb", type=float, default=1.0, help="Size of the memory-test file.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunesmith-bench"))
    parser.add_argument("--no-big", action="store_true", help="Skip the memory test.")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]  # other work on the machine stretches wall-clock times
    small = args.workdir / "tickets-100k.jsonl"
    n = generate(small, n=args.examples)
    validate = run_child("validate", small, args.workdir / "unused.jsonl")
    clean = run_child("clean", small, args.workdir / "tickets-100k.clean.jsonl")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}, load average before "
                   f"{load_before:.1f}",
        "examples": n, "validate": validate, "clean": clean,
        "validate_plus_clean_seconds": round(validate["seconds"] + clean["seconds"], 1)}
    if not args.no_big:
        big = args.workdir / "tickets-1gb.jsonl"
        n_big = generate(big, size_bytes=int(args.gb * 2**30), seed=1)
        result.update(big_file_bytes=big.stat().st_size, big_file_examples=n_big,
                      clean_big=run_child("clean", big, args.workdir / "tickets-1gb.clean.jsonl"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
