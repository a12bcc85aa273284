"""Chat throughput of a live `tunesmith serve`: concurrent clients batched, against the same
requests sent one at a time.

    .venv/bin/python bench/serve_speed.py [--clients 8] [--rounds 3] [--max-tokens 64]
    .venv/bin/python bench/serve_speed.py --smoke --model DIR   # tiny model, 2 clients

Starts `tunesmith serve --no-worker` on 127.0.0.1 with the bundled SmolLM2-135M-Instruct
(``--model``: another) and sends greedy chat completions (``temperature`` 0, ``max_tokens``
each) over HTTP, ``--clients`` different prompts, ``--rounds`` times each:

- ``one_at_a_time``: every request after the previous one's answer (what a server that
  generates one request at a time gives in total, whatever the number of clients);
- ``batched``: ``--clients`` threads each sending its prompt ``--rounds`` times, all at once,
  to the same server (``--max-batch`` = clients): requests that arrive together share forward
  passes (``service.batching``);
- ``unbatched``: the same clients against a second server started with ``--max-batch 1``
  (the service before batching: concurrent requests wait in line); not in ``--smoke``,
  which starts one server only.

Reported per arm: generated tokens (the ``usage.completion_tokens`` of every answer) per
second of wall time from the first request sent to the last answer, requests per second, and
the p50 and p95 latency of a request. Ratio: batched over one at a time, the target. The
answers must be the same in every arm (greedy); the script says how many are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

BASE = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant. Answer in a few sentences."
QUESTIONS = [
    "What is the capital of France, and what is it known for?",
    "Give me three tips for writing a clear bug report.",
    "Explain what a hash table is.",
    "Why is the sky blue?",
    "How do I boil an egg?",
    "What does a compiler do?",
    "Name two benefits of regular exercise.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet.",
    "How does a bicycle stay upright?",
    "What is photosynthesis?",
    "Suggest a name for a cat.",
]


def start(model_ref: str, data_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "--port", str(port), "--data-dir",
           str(data_dir), "--model", f"m={model_ref}", "--no-worker", "--no-energy", *extra]
    log = (data_dir / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1",
                                 "PYTHONPATH": str(REPO / "src")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("the server did not start in 180 s")


def api_key(data_dir: Path) -> str:
    from tunesmith.service import Store, create_key, store_url

    key, _ = create_key(Store(store_url(data_dir, data_dir=data_dir)), "bench")
    return key


def ask(client, question: str, max_tokens: int, system: str = SYSTEM, stream: bool = False,
        history: list[dict] | None = None) -> dict:
    """One chat completion: its text, latency and usage counts; streamed, also the time to
    its first text (the first chunk with content: a whole word, see ``service.batching``; an
    empty reply's end). ``history``: the conversation's turns before this question."""
    body = {"model": "m", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": system}, *(history or []),
                         {"role": "user", "content": question}]}
    started = time.perf_counter()
    first, texts, usage = None, [], None
    if not stream:
        resp = client.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        out = resp.json()
        texts, usage = [out["choices"][0]["message"]["content"]], out["usage"]
    else:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter() - started
                        texts.append(choice["delta"]["content"])
    latency = time.perf_counter() - started
    if stream and first is None:  # an empty reply: its first text is its end
        first = latency
    return {"text": "".join(texts), "latency": latency, "first_text": first,
            "tokens": usage["completion_tokens"], "prompt": usage["prompt_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def one_at_a_time(url: str, key: str, questions: list[str], rounds: int, max_tokens: int,
                  system: str = SYSTEM, stream: bool = False) -> dict:
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                      timeout=600) as client:
        started = time.perf_counter()
        answers = [ask(client, q, max_tokens, system, stream) for _ in range(rounds)
                   for q in questions]
        wall = time.perf_counter() - started
    return summary(answers, wall)


def conversation(url: str, key: str, questions: list[str], rounds: int, max_tokens: int,
                 system: str = SYSTEM) -> dict:
    """The questions as the turns of one conversation, each request sending the turns
    before it with the replies as given (``rounds`` conversations, one after another)."""
    import httpx

    answers = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                      timeout=600) as client:
        started = time.perf_counter()
        for _ in range(rounds):
            history: list[dict] = []
            for q in questions:
                answers.append(ask(client, q, max_tokens, system, history=history))
                history += [{"role": "user", "content": q},
                            {"role": "assistant", "content": answers[-1]["text"]}]
        wall = time.perf_counter() - started
    return summary(answers, wall)


def concurrent(url: str, key: str, questions: list[str], rounds: int, max_tokens: int,
               system: str = SYSTEM) -> dict:
    import httpx

    answers: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(questions))

    def client_thread(i: int) -> None:
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=600) as client:
                go.wait()
                for r in range(rounds):
                    answers[r, i] = ask(client, questions[i], max_tokens, system)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(questions))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return summary([answers[r, i] for r in range(rounds) for i in range(len(questions))], wall)


def summary(answers: list[dict], wall: float) -> dict:
    tokens = sum(a["tokens"] for a in answers)
    latencies = sorted(a["latency"] for a in answers)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {"requests": len(answers), "tokens": tokens, "wall_seconds": wall,
            "tokens_per_second": tokens / wall, "requests_per_second": len(answers) / wall,
            "p50_latency_s": statistics.median(latencies), "p95_latency_s": p95,
            "prompt_tokens": statistics.mean(a["prompt"] for a in answers),
            "cached_tokens": statistics.mean(a["cached"] for a in answers),
            "prompt_tokens_each": [a["prompt"] for a in answers],
            "cached_tokens_each": [a["cached"] for a in answers],
            "p50_first_text_s": statistics.median(a["first_text"] for a in answers)
            if all(a["first_text"] is not None for a in answers) else None,
            "texts": [a["text"] for a in answers]}


def measure(model_ref: str, workdir: Path, max_batch: int, arms: list[str],
            questions: list[str], rounds: int, max_tokens: int, threads: int | None, *,
            system: str = SYSTEM, options: tuple[str, ...] = (), label: str = "") -> dict:
    """One server (``--max-batch``, ``--threads`` and ``options``): each arm's figures. An
    arm named ``one_at_a_time`` sends the requests one after another, ``streamed`` the same
    streamed, ``conversation`` the questions as one conversation's turns; any other, one
    client thread per question, all at once. A first, untimed request loads the model."""
    data_dir = Path(tempfile.mkdtemp(prefix="serve-speed-", dir=workdir))
    extra = ["--max-batch", str(max_batch), *(["--threads", str(threads)] if threads else []),
             *options]
    proc, url = start(model_ref, data_dir, *extra)
    try:
        key = api_key(data_dir)
        one_at_a_time(url, key, questions[:1], 1, 2, system)  # loads the model
        out = {}
        for arm in arms:
            if arm in ("one_at_a_time", "streamed"):
                out[arm] = one_at_a_time(url, key, questions, rounds, max_tokens, system,
                                         stream=arm == "streamed")
            else:
                run = conversation if arm == "conversation" else concurrent
                out[arm] = run(url, key, questions, rounds, max_tokens, system)
            print(f"{label}{arm}: {out[arm]['tokens_per_second']:.1f} tokens/s, p95 "
                  f"{out[arm]['p95_latency_s']:.2f} s", flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def parse(doc: str, counts: dict[str, tuple[int, int, str]], questions: int
          ) -> argparse.Namespace:
    """The serving benchmarks' arguments. ``counts``: name -> (smoke value, full value,
    help) of each integer option, its value filled in once ``--smoke`` is known;
    ``--clients`` (one a question) at most ``questions``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default=BASE, help="base model (name or directory)")
    for name, (_, full, text) in counts.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"{text} ({full})")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--smoke", action="store_true", help="--model DIR: a quick check")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args()
    if args.smoke and args.model == BASE:
        parser.error("--smoke needs --model DIR (a tiny model)")
    for name, (smoke, full, _) in counts.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.clients > questions:
        parser.error(f"--clients: at most {questions}")
    return args


def main() -> None:
    args = parse(__doc__, {"clients": (2, 8, "concurrent clients"),
                           "rounds": (1, 3, "requests per client"),
                           "max_tokens": (4, 64, "per request")}, len(QUESTIONS))
    clients, rounds, max_tokens = args.clients, args.rounds, args.max_tokens
    questions = QUESTIONS[:clients]
    batched = measure(args.model, args.workdir, clients, ["one_at_a_time", "batched"],
                      questions, rounds, max_tokens, args.threads)
    unbatched = {} if args.smoke else measure(args.model, args.workdir, 1, ["unbatched"],
                                              questions, rounds, max_tokens, args.threads)
    arms = {**batched, **unbatched}
    reference = arms["one_at_a_time"]["texts"]
    same = {arm: sum(a == b for a, b in zip(r["texts"], reference, strict=True))
            for arm, r in arms.items()}
    ratio = arms["batched"]["tokens_per_second"] / arms["one_at_a_time"]["tokens_per_second"]
    result = {"model": args.model, "smoke": args.smoke, "clients": clients, "rounds": rounds,
              "max_tokens": max_tokens, "cpus": os.cpu_count(), "machine": platform.machine(),
              "arms": {k: {m: v for m, v in r.items() if m != "texts"} for k, r in arms.items()},
              "batched_over_one_at_a_time": ratio,
              "unbatched_over_one_at_a_time": arms["unbatched"]["tokens_per_second"]
              / arms["one_at_a_time"]["tokens_per_second"] if unbatched else None,
              "same_answers": same}
    print(f"{clients} clients x {rounds} requests, greedy, max_tokens {max_tokens}, "
          f"{args.model}")
    print("| arm | requests | generated tokens | tokens/s | requests/s | p50 s | p95 s |")
    for arm, r in arms.items():
        print(f"| {arm} | {r['requests']} | {r['tokens']} | {r['tokens_per_second']:.1f} | "
              f"{r['requests_per_second']:.2f} | {r['p50_latency_s']:.2f} | "
              f"{r['p95_latency_s']:.2f} |")
    print(f"batched / one at a time: {ratio:.2f}x tokens/s; same answers: {same}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
