"""Prompt caching in a live `tunesmith serve`: questions about one long document, with the
prompts' opening blocks kept across requests and without.

    .venv/bin/python bench/prompt_cache_speed.py [--clients 8] [--rounds 2] [--max-tokens 32]
    .venv/bin/python bench/prompt_cache_speed.py --smoke --model DIR   # tiny model, 2 clients

Every request's system prompt is the same document (the opening of *Pride and Prejudice*
that ships with tunesmith, ``--doc-chars`` characters: about 600 tokens by default), and its
user message one of ``--clients`` questions about it: a help desk's instructions, or a
document a team asks about. Two servers, one after the other, on 127.0.0.1 with the bundled
SmolLM2-135M-Instruct (``--model``: another): ``cached`` with the default prompt cache,
``uncached`` with ``--prompt-cache-mb 0``. Each answers the same greedy requests
(``max_tokens`` each) two ways, as ``bench/serve_speed.py`` sends them: one at a time, then
``--clients`` threads at once (``--max-batch`` = clients), each question ``--rounds`` times.
Before either, one untimed request loads the model (with the cache on, it also keeps the
document's blocks: the state of a server that has answered about the document before).

Reported per server and way: requests per second, p50 and p95 latency, the prompt tokens and
the tokens taken from the cache (``usage.prompt_tokens_details.cached_tokens``) per request.
Ratios: cached over uncached requests per second, each way. The answers must be the same
(greedy); the script says how many are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_speed import BASE, api_key, start  # noqa: E402  (bench/ is not a package)

QUESTIONS = [
    "Who has taken Netherfield Park?",
    "What does Mrs. Bennet want for her daughters?",
    "How does Mr. Bennet tease his wife?",
    "How many daughters do the Bennets have?",
    "What is Mr. Bingley's income said to be?",
    "Why does Mrs. Bennet want her husband to visit Mr. Bingley?",
    "Which daughter does Mr. Bennet praise?",
    "What is the famous first sentence about?",
]


def document(chars: int) -> str:
    from tunesmith.evaluation.forgetting import GENERAL_TEXT_FILE, general_text_dir

    text = (general_text_dir() / GENERAL_TEXT_FILE).read_text(encoding="utf-8")
    start = text.find("It is a truth universally acknowledged")
    return text[max(start, 0):][:chars]


def ask(client, system: str, question: str, max_tokens: int) -> dict:
    body = {"model": "m", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}
    started = time.perf_counter()
    resp = client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - started
    resp.raise_for_status()
    out = resp.json()
    return {"text": out["choices"][0]["message"]["content"], "latency": latency,
            "prompt": out["usage"]["prompt_tokens"],
            "cached": out["usage"]["prompt_tokens_details"]["cached_tokens"]}


def run_way(url: str, key: str, system: str, questions: list[str], rounds: int,
            max_tokens: int, concurrent: bool) -> dict:
    """Every question ``rounds`` times: one at a time, or one thread per question at once."""
    import httpx

    answers: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(questions) if concurrent else 1)

    def client_thread(which: list[int]) -> None:
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=600) as client:
                go.wait()
                for r in range(rounds):
                    for i in which:
                        answers[r, i] = ask(client, system, questions[i], max_tokens)
        except BaseException as err:  # reported below
            errors.append(err)

    groups = [[i] for i in range(len(questions))] if concurrent else [
        list(range(len(questions)))]
    threads = [threading.Thread(target=client_thread, args=(g,)) for g in groups]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    got = [answers[r, i] for r in range(rounds) for i in range(len(questions))]
    latencies = sorted(a["latency"] for a in got)
    return {"requests": len(got), "wall_seconds": wall, "requests_per_second": len(got) / wall,
            "p50_latency_s": statistics.median(latencies),
            "p95_latency_s": latencies[min(len(got) - 1, round(0.95 * (len(got) - 1)))],
            "prompt_tokens": statistics.mean(a["prompt"] for a in got),
            "cached_tokens": statistics.mean(a["cached"] for a in got),
            "texts": [a["text"] for a in got]}


def measure(model_ref: str, workdir: Path, cache_mb: float | None, system: str,
            questions: list[str], rounds: int, max_tokens: int, threads: int | None) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="prompt-cache-", dir=workdir))
    extra = ["--max-batch", str(len(questions)),
             *(["--threads", str(threads)] if threads else []),
             *(["--prompt-cache-mb", str(cache_mb)] if cache_mb is not None else [])]
    proc, url = start(model_ref, data_dir, *extra)
    try:
        key = api_key(data_dir)
        run_way(url, key, system, ["Hello."], 1, 2, False)  # loads the model
        out = {}
        for way in ("one_at_a_time", "concurrent"):
            out[way] = run_way(url, key, system, questions, rounds, max_tokens,
                               way == "concurrent")
            print(f"{'uncached' if cache_mb == 0 else 'cached'} {way}: "
                  f"{out[way]['requests_per_second']:.2f} requests/s, p50 "
                  f"{out[way]['p50_latency_s']:.2f} s", flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BASE, help="base model (name or directory)")
    parser.add_argument("--clients", type=int, default=None, help="questions, sent at once (8)")
    parser.add_argument("--rounds", type=int, default=None, help="times each is asked (2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="per request (32)")
    parser.add_argument("--doc-chars", type=int, default=None, help="document length (2400)")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--smoke", action="store_true", help="--model DIR: a quick check")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args()
    if args.smoke and args.model == BASE:
        parser.error("--smoke needs --model DIR (a tiny model)")
    clients = args.clients or (2 if args.smoke else 8)
    if clients > len(QUESTIONS):
        parser.error(f"--clients: at most {len(QUESTIONS)}")
    rounds = args.rounds or (1 if args.smoke else 2)
    max_tokens = args.max_tokens or (4 if args.smoke else 32)
    system = ("Answer questions about this text in one or two sentences.\n\n"
              + document(args.doc_chars or (400 if args.smoke else 2400)))
    questions = QUESTIONS[:clients]
    workdir = args.workdir or Path(tempfile.gettempdir())
    servers = {name: measure(args.model, workdir, mb, system, questions, rounds, max_tokens,
                             args.threads)
               for name, mb in (("cached", None), ("uncached", 0))}
    reference = servers["uncached"]["one_at_a_time"]["texts"]
    same = {f"{name} {way}": sum(a == b for a, b in zip(r["texts"], reference, strict=True))
            for name, ways in servers.items() for way, r in ways.items()}
    ratios = {way: servers["cached"][way]["requests_per_second"]
              / servers["uncached"][way]["requests_per_second"]
              for way in ("one_at_a_time", "concurrent")}
    result = {"model": args.model, "smoke": args.smoke, "clients": clients, "rounds": rounds,
              "max_tokens": max_tokens, "cpus": os.cpu_count(), "machine": platform.machine(),
              "servers": {name: {way: {k: v for k, v in r.items() if k != "texts"}
                                 for way, r in ways.items()} for name, ways in servers.items()},
              "cached_over_uncached": ratios, "same_answers": same}
    print(f"{clients} questions x {rounds} rounds about one document, greedy, max_tokens "
          f"{max_tokens}, {args.model}")
    print("| server | way | requests/s | p50 s | p95 s | prompt tokens | cached tokens |")
    for name, ways in servers.items():
        for way, r in ways.items():
            print(f"| {name} | {way} | {r['requests_per_second']:.2f} | "
                  f"{r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} | "
                  f"{r['prompt_tokens']:.0f} | {r['cached_tokens']:.0f} |")
    print("cached / uncached requests/s: " + ", ".join(
        f"{way} {ratio:.2f}x" for way, ratio in ratios.items()) + f"; same answers: {same}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
