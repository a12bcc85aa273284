"""One generation path: `tunesmith chat`, ``tunesmith.chat()`` and /v1/chat/completions give
the same answer for the same model, messages and parameters."""

from __future__ import annotations

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
