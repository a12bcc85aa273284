"""Concurrent chat completions to one model are generated in shared batches, and each answer
is exactly the one the request gets alone: its text, finish reason, usage counts, stop
strings and token limit, streamed or not, with several choices. The prompt tokens taken from
the prompt cache (``usage.prompt_tokens_details.cached_tokens``) depend on the requests before,
so they are compared apart: every request after the first reuses the system prompt's blocks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import SYSTEM
from tunesmith.service import ServiceSettings, Store, create_app, create_key

QUESTIONS = ["I love it", "Broke after a day", "Fine, I guess", "Where is my parcel?",
             "Terrible support, never again", "ok"]


@pytest.fixture
def client(tmp_path: Path, tiny_model_dir: Path, test_home: Path) -> Iterator[TestClient]:
    settings = ServiceSettings(data_dir=tmp_path / "svc", home=test_home,
                               base_models={"tiny": str(tiny_model_dir)},
                               max_batch=8, batch_window_ms=300)
    key, _ = create_key(Store(settings.url), "acme")
    with TestClient(create_app(settings, worker=False),
                    headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def body(i: int, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "temperature": 0, "max_tokens": (6, 14, 9)[i % 3],
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTIONS[i]}], **extra}


def answer(client: TestClient, request: dict[str, Any]) -> dict[str, Any]:
    """What a client reads: each choice's text and finish reason, and the usage counts; and
    apart (``cached``), the prompt tokens the prompt cache gave."""
    resp = client.post("/v1/chat/completions", json=request)
    assert resp.status_code == 200, resp.text
    if not request.get("stream"):
        out = resp.json()
        return {"choices": [(c["message"]["content"], c["finish_reason"])
                            for c in out["choices"]], **usage_and_cached(out["usage"])}
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: {")]
    assert resp.text.rstrip().endswith("data: [DONE]")
    n = 1 + max(c["index"] for chunk in chunks for c in chunk["choices"])
    texts, reasons = [""] * n, [None] * n
    for chunk in chunks:
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    return {"choices": list(zip(texts, reasons, strict=True)),
            **usage_and_cached(usage[0] if usage else None)}


def usage_and_cached(usage: dict[str, Any] | None) -> dict[str, Any]:
    if usage is None:
        return {"usage": None, "cached": None}
    details = usage.pop("prompt_tokens_details")
    return {"usage": usage, "cached": details["cached_tokens"]}


def replies(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answers without what the prompt cache gave."""
    return [{k: v for k, v in a.items() if k != "cached"} for a in answers]


def all_at_once(client: TestClient, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    got: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def send(k: int) -> None:
        try:
            got[k] = answer(client, requests[k])
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return [got[k] for k in range(len(requests))]


def sizes(client: TestClient) -> list[int]:
    """The rows of each ``generate`` call of the model's batcher so far."""
    from tunesmith.service.batching import batcher_for

    service = client.app.state.service
    (key,) = service.cache.names()
    model, _ = service.cache.cached(key)
    return list(batcher_for(model, max_batch=8, window_s=0.3, pool=service.chat.prompts).sizes)


def test_concurrent_requests_are_batched_and_each_answers_as_alone(client: TestClient
                                                                   ) -> None:
    plain = [body(i) for i in range(len(QUESTIONS))]
    alone = [answer(client, r) for r in plain]  # one at a time: batches of one
    assert set(sizes(client)) == {1}
    # a stop string found in one reply, so that it really ends that reply early
    text = alone[1]["choices"][0][0]
    stop = text.strip()[3:5]
    assert stop
    requests = [*plain, body(1, stop=[stop, "never-seen"]),
                body(2, stream=True, stream_options={"include_usage": True})]
    expected = [*alone, answer(client, requests[-2]), answer(client, requests[-1])]
    assert expected[-2]["choices"][0] == (text[:text.index(stop)], "stop")
    assert expected[-2]["usage"]["completion_tokens"] < alone[1]["usage"]["completion_tokens"]
    assert replies(expected[-1:]) == replies(alone[2:3])  # streamed: text, reason, usage
    assert alone[0]["cached"] == 0 and all(a["cached"] > 0 for a in expected[1:])

    before = len(sizes(client))
    together = all_at_once(client, requests)
    assert replies(together) == replies(expected)
    assert max(sizes(client)[before:]) > 1
    assert all(a["cached"] > 0 for a in together)


def test_the_choices_of_one_request_generate_together(client: TestClient) -> None:
    one = answer(client, body(0))
    before = len(sizes(client))
    three = answer(client, body(0, n=3))
    assert three["choices"] == one["choices"] * 3  # greedy: every choice the same
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert set(sizes(client)[before:]) == {3}
    streamed = answer(client, body(0, n=3, stream=True,
                                   stream_options={"include_usage": True}))
    assert replies([streamed]) == replies([three])
