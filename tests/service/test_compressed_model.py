"""A compressed model directory is served like any other model: ``tunesmith serve --model DIR``
(or ``--model NAME=DIR``) offers the pruned tiny Llama under the directory's name (or NAME),
and chat completions come from its own (pruned) weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SYSTEM
from tunesmith.compress.prune import prunable_linears, prune

PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "I love it"}]
KIND = "magnitude-50-unstructured"  # the directory name the compress flow gives it


@pytest.fixture
def pruned_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny Llama pruned to 50% in place and saved where `tunesmith compress` puts it."""
    from tunesmith.models.load import load

    model, tokenizer = load(tiny_model_dir)
    prune(model, sparsity=0.5, method="magnitude")
    out = tmp_path / "run" / "compressed" / KIND
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_pruned_directory_is_listed_and_answers_by_its_id(launch, tmp_path: Path,
                                                            pruned_dir: Path) -> None:
    from tunesmith.flows.chat import chat
    from tunesmith.models.load import load_model

    saved = load_model(pruned_dir)  # still a plain Hugging Face directory, zeros stored dense
    for name, layer in prunable_linears(saved).items():
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5), name
    # a bare directory is named after itself; NAME=DIR names it
    server = launch(tmp_path / "svc", "--model", str(pruned_dir),
                    "--model", f"tiny-pruned={pruned_dir}")
    client = server.client("acme")

    assert {m.id for m in client.models.list().data} == {"tiny", KIND, "tiny-pruned"}
    assert client.models.retrieve(KIND).id == KIND

    reply = client.chat.completions.create(model=KIND, messages=PROMPT, max_tokens=8,
                                           temperature=0)
    assert reply.model == KIND and reply.object == "chat.completion"
    assert 1 <= reply.usage.completion_tokens <= 8
    # the pruned model's own greedy reply, not the base model's it was pruned from
    expected = chat(str(pruned_dir), PROMPT, max_new_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected
    named = client.chat.completions.create(model="tiny-pruned", messages=PROMPT, max_tokens=8,
                                           temperature=0)
    assert named.model == "tiny-pruned" and named.choices[0].message.content == expected
    base = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8,
                                          temperature=0)
    assert base.choices[0].message.content != expected
