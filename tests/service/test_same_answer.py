"""One generation path: `tunesmith chat`, ``tunesmith.chat()`` and /v1/chat/completions give
the same answer for the same model, messages and parameters."""

from __future__ import annotations

import json
from pathlib import Path

import tunesmith
from tests.helpers import SYSTEM

QUESTION = "I love it"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
MAX_TOKENS = 12


def test_cli_python_and_http_give_the_same_answer(launch, cli, tiny_model_dir: Path,
                                                  tmp_path: Path) -> None:
    model = str(tiny_model_dir)
    direct = tunesmith.chat(model, MESSAGES, max_new_tokens=MAX_TOKENS)
    assert direct.strip()

    code, out, err = cli("chat", model, "--system", SYSTEM, "--prompt", QUESTION,
                         "--max-new-tokens", str(MAX_TOKENS))
    assert code == 0, err
    assert out == direct + "\n"

    client = launch(tmp_path / "svc").client("acme")
    completion = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                max_tokens=MAX_TOKENS, temperature=0)
    choice = completion.choices[0]
    assert choice.message.content == direct
    assert 1 <= completion.usage.completion_tokens <= MAX_TOKENS
    assert choice.finish_reason == ("length" if completion.usage.completion_tokens == MAX_TOKENS
                                    else "stop")
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct

    # seeded sampling draws the same tokens in both places too
    sampled = tunesmith.chat(model, MESSAGES, max_new_tokens=MAX_TOKENS, temperature=1.0, seed=3)
    served = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                            max_tokens=MAX_TOKENS, temperature=1.0, seed=3)
    assert served.choices[0].message.content == sampled

    # log-probabilities reach OpenAI's client as its own types: the greedy answer's tokens
    scored = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                            max_tokens=MAX_TOKENS, temperature=0,
                                            logprobs=True, top_logprobs=3)
    assert scored.choices[0].message.content == direct
    content = scored.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode() == direct
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
               and t.top_logprobs[0].logprob >= t.top_logprobs[2].logprob for t in content)

    # structured outputs through OpenAI's own parse helper: a pydantic model as the schema
    from typing import Literal

    from pydantic import BaseModel, ConfigDict

    class Verdict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label: Literal["positive", "negative"]
        confident: bool

    parsed = client.chat.completions.parse(model="tiny", messages=MESSAGES, max_tokens=30,
                                           temperature=0, response_format=Verdict)
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict) and parsed.choices[0].finish_reason == "stop"

    # a reply held to a schema is the same from the CLI, the Python API and the service
    schema = Verdict.model_json_schema()
    held = tunesmith.chat(model, MESSAGES, max_new_tokens=30, json_schema=schema)
    assert Verdict.model_validate_json(held)
    (tmp_path / "verdict.json").write_text(json.dumps(schema))
    code, out, err = cli("chat", model, "--system", SYSTEM, "--prompt", QUESTION,
                         "--max-new-tokens", "30", "--json-schema",
                         str(tmp_path / "verdict.json"))
    assert code == 0 and out == held + "\n", err
    served = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=30, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}})
    assert served.choices[0].message.content == held
