"""Replies held to a JSON schema (``models.constrained``), on the tiny random model with the
real tokenizer: whatever the model would say, the reply parses and fits the schema, its
properties in the schema's order; in a batch, beside unguided rows, each reply is the one it
gets alone; schemas outlines-core cannot use, or whose index would be too large, are refused
with the reason."""

from __future__ import annotations

import json

import pytest

from tunesmith.data.encode import encode_prompt
from tunesmith.errors import ConfigError
from tunesmith.models.constrained import ANY_OBJECT, check_schema, compile_schema
from tunesmith.models.generation import GenerationParams, generate
from tunesmith.service.batching import Batcher, Ticket

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["label", "urgent", "note"],
          "properties": {"label": {"enum": ["spam", "ham", "unsure"]},
                         "urgent": {"type": "boolean"},
                         "note": {"type": "string", "maxLength": 6}}}
QUESTIONS = ["WINNER!! claim your prize now", "lunch tomorrow?", "x", "call me back when free"]


def prompts(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def fits(text: str) -> None:
    value = json.loads(text)
    assert list(value) == ["label", "urgent", "note"]  # the schema's order
    assert value["label"] in ("spam", "ham", "unsure") and isinstance(value["urgent"], bool)
    assert isinstance(value["note"], str) and len(value["note"]) <= 6


def test_every_reply_fits_the_schema_greedy_or_sampled(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    free = generate(model, tokenizer, prompts(tokenizer), GenerationParams(max_new_tokens=40))
    assert not any(r.text.lstrip().startswith("{") for r in free)  # the model alone: no JSON
    for temperature in (0.0, 1.0):
        params = GenerationParams(max_new_tokens=60, temperature=temperature, seed=1,
                                  schema=check_schema(SCHEMA))
        for reply in generate(model, tokenizer, prompts(tokenizer), params, batch_size=4):
            assert reply.finish_reason == "stop", reply
            fits(reply.text)


def test_guided_and_free_rows_share_a_batch_and_each_answers_as_alone(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    schema = check_schema(SCHEMA)
    params = [GenerationParams(max_new_tokens=(60, 9)[i % 2], schema=(schema, None)[i % 2])
              for i in range(len(QUESTIONS))]
    alone = [generate(model, tokenizer, [p], q)[0]
             for p, q in zip(prompts(tokenizer), params, strict=True)]
    batcher = Batcher(max_batch=4, window_s=0.2)
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q, streaming=True))
               for p, q in zip(prompts(tokenizer), params, strict=True)]
    streamed = ["".join(t.pieces()) for t in tickets]
    assert [t.result() for t in tickets] == alone and streamed == [r.text for r in alone]
    assert max(batcher.sizes) > 1
    for reply in alone[::2]:
        fits(reply.text)


def test_any_object_for_json_object(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    params = GenerationParams(max_new_tokens=24, schema=ANY_OBJECT)
    for reply in generate(model, tokenizer, prompts(tokenizer)[:2], params):
        assert reply.text.startswith("{")
        if reply.finish_reason == "stop":
            assert isinstance(json.loads(reply.text), dict)


def test_schemas_that_cannot_be_used_are_refused_with_the_reason(tiny_loaded) -> None:
    _, tokenizer = tiny_loaded
    with pytest.raises(ConfigError, match="is a JSON object"):
        check_schema(["not", "a", "schema"])
    with pytest.raises(ConfigError, match="Unsupported type: frob"):
        compile_schema(tokenizer, check_schema({"type": "frob"}))
    too_long = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5000}}}
    with pytest.raises(ConfigError, match="15,012 atoms, over the 1,000"):
        compile_schema(tokenizer, check_schema(too_long))
    # bounds nested in each other multiply: 40 strings of up to 40 characters
    nested = {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 40}
    with pytest.raises(ConfigError, match="4,962 atoms, over the 1,000"):
        compile_schema(tokenizer, check_schema(nested))
    nested["maxItems"] = nested["items"]["maxLength"] = 10
    compile_schema(tokenizer, check_schema(nested))  # 342 atoms: built
    with pytest.raises(ConfigError, match="characters"):
        check_schema({"enum": ["x" * 70_000]})
    with pytest.raises(ConfigError, match="min_new_tokens"):
        GenerationParams(max_new_tokens=4, min_new_tokens=2, schema=check_schema(SCHEMA))
    # the same schema's index is built once
    assert compile_schema(tokenizer, check_schema(SCHEMA)) is \
        compile_schema(tokenizer, check_schema(SCHEMA))


def test_the_chat_command_names_a_schema_file_it_cannot_use(cli, tiny_model_dir, tmp_path
                                                              ) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object",\n "properties": {oops}}')
    code, out, err = cli("chat", str(tiny_model_dir), "-p", "hi", "--json-schema", str(bad))
    assert code == 2 and f"{bad}:2:17: not JSON" in out + err
    code, out, err = cli("chat", str(tiny_model_dir), "-p", "hi", "--json-schema",
                         str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read the JSON schema" in out + err
    bad.write_text(json.dumps({"type": "frob"}))
    code, out, err = cli("chat", str(tiny_model_dir), "-p", "hi", "--json-schema", str(bad))
    assert code == 2 and "Unsupported type: frob" in out + err


def test_a_schema_being_built_holds_up_no_other_request(tiny_loaded, monkeypatch) -> None:
    import threading

    import outlines_core

    _, tokenizer = tiny_loaded
    ready = compile_schema(tokenizer, check_schema(SCHEMA))
    started, release = threading.Event(), threading.Event()
    real = outlines_core.Index

    def slow(regex, vocabulary):  # a build that takes as long as the test says
        started.set()
        release.wait(60)
        return real(regex, vocabulary)

    monkeypatch.setattr(outlines_core, "Index", slow)
    builder = threading.Thread(target=compile_schema,
                               args=(tokenizer, check_schema({"enum": ["held-up"]})))
    builder.start()
    try:
        assert started.wait(60)
        got: list = []
        lookup = threading.Thread(
            target=lambda: got.append(compile_schema(tokenizer, check_schema(SCHEMA))))
        lookup.start()
        lookup.join(30)
        assert got == [ready]  # answered while the other schema is still being built
    finally:
        release.set()
        builder.join(60)
