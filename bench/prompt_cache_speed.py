"""Prompt caching in a live `tunesmith serve`: questions about one long document, with the
prompts' opening blocks kept across requests and without.

    .venv/bin/python bench/prompt_cache_speed.py [--clients 8] [--rounds 2] [--max-tokens 32]
        [--doc-chars 2400]
    .venv/bin/python bench/prompt_cache_speed.py --smoke --model DIR   # tiny model, 2 clients

Every request's system prompt is the same document (the opening of *Pride and Prejudice*
that ships with tunesmith, ``--doc-chars`` characters: about 600 tokens by default), and its
user message one of ``--clients`` questions about it: a help desk's instructions, or a
document a team asks about. Two servers, one after the other, on 127.0.0.1 with the bundled
SmolLM2-135M-Instruct (``--model``: another): ``cached`` with the default prompt cache,
``uncached`` with ``--prompt-cache-mb 0``. Each answers the same greedy requests
(``max_tokens`` each) two ways, through ``bench/serve_speed.py``'s client: ``one_at_a_time``,
then ``batched`` (``--clients`` threads at once, ``--max-batch`` = clients), each question
``--rounds`` times. Before either, one untimed request (the first question, 2 tokens) loads
the model; with the cache on, it also keeps the document's blocks: the state of a server that
has answered about the document before.

A third way, ``streamed``, sends the one-at-a-time requests again, streamed, and times each
request's first text (the first chunk with content: the first whole word). A fourth,
``conversation``, asks the questions as the turns of one conversation (``--rounds`` times):
each request sends the turns before it with the replies as given, so its prompt opens with
the previous request's prompt and reply.

Reported per server and way: requests per second, p50 and p95 latency, p50 time to the first
text (streamed), the prompt tokens and the tokens taken from the cache
(``usage.prompt_tokens_details.cached_tokens``) per request. Ratios: cached over uncached
requests per second, one at a time and batched. The answers must be the same (greedy); the
script says how many are.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from serve_speed import measure, parse  # noqa: E402

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


def main() -> None:
    args = parse(__doc__, {"clients": (2, 8, "questions, sent at once"),
                           "rounds": (1, 2, "times each is asked"),
                           "max_tokens": (4, 32, "per request"),
                           "doc_chars": (400, 2400, "the document's characters")},
                 len(QUESTIONS))
    system = ("Answer questions about this text in one or two sentences.\n\n"
              + document(args.doc_chars))
    questions = QUESTIONS[:args.clients]
    servers = {name: measure(args.model, args.workdir, args.clients,
                             ["one_at_a_time", "batched", "streamed", "conversation"],
                             questions, args.rounds,
                             args.max_tokens, args.threads, system=system, options=options,
                             label=f"{name} ")
               for name, options in (("cached", ()), ("uncached", ("--prompt-cache-mb", "0")))}
    same = {f"{name} {way}": sum(a == b for a, b in zip(
        r["texts"], servers["uncached"][
            "conversation" if way == "conversation" else "one_at_a_time"]["texts"], strict=True))
            for name, ways in servers.items() for way, r in ways.items()}
    ratios = {way: servers["cached"][way]["requests_per_second"]
              / servers["uncached"][way]["requests_per_second"]
              for way in ("one_at_a_time", "batched")}
    first = {name: ways["streamed"]["p50_first_text_s"] for name, ways in servers.items()}
    result = {"model": args.model, "smoke": args.smoke, "clients": args.clients,
              "rounds": args.rounds, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
              "machine": platform.machine(),
              "servers": {name: {way: {k: v for k, v in r.items() if k != "texts"}
                                 for way, r in ways.items()} for name, ways in servers.items()},
              "cached_over_uncached": ratios, "p50_first_text_s": first,
              "uncached_over_cached_first_text": first["uncached"] / first["cached"],
              "same_answers": same}
    print(f"{args.clients} questions x {args.rounds} rounds about one document, greedy, "
          f"max_tokens {args.max_tokens}, {args.model}")
    print("| server | way | requests/s | p50 s | p95 s | p50 first text s | prompt tokens "
          "| cached tokens |")
    for name, ways in servers.items():
        for way, r in ways.items():
            text = "" if r["p50_first_text_s"] is None else f"{r['p50_first_text_s']:.3f}"
            print(f"| {name} | {way} | {r['requests_per_second']:.2f} | "
                  f"{r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} | {text} | "
                  f"{r['prompt_tokens']:.0f} | {r['cached_tokens']:.0f} |")
    turns = servers["cached"]["conversation"]
    print("conversation, each turn's prompt tokens (cached): " + ", ".join(
        f"{p} ({c})" for p, c in zip(turns["prompt_tokens_each"], turns["cached_tokens_each"],
                                     strict=True)))
    print("cached / uncached requests/s: " + ", ".join(
        f"{way} {ratio:.2f}x" for way, ratio in ratios.items())
        + f"; first text (streamed, p50): {first['cached']:.3f} s against "
        f"{first['uncached']:.3f} s; same answers: {same}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
