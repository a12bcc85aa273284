"""The whole flow with the official openai client against a live `tunesmith serve`:
upload -> job -> succeeded -> events -> checkpoints -> chat (fine-tune and checkpoint, plain
and streaming) -> feedback -> from-feedback; and another org sees none of it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import openai
import pytest

from tests.helpers import (
    SYSTEM,
    all_events,
)
from tunesmith.data.chat import check_chat_record
from tunesmith.service import export_feedback, sqlite_url
from tunesmith.service.runner import RESULT_COLUMNS

PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "I love it"}]


def test_job_succeeds_with_openai_shapes(trained) -> None:
    server, job = trained
    client = server.client("acme")
    assert job.fine_tuned_model == f"ft:tiny:acme:reviews:{job.id[-8:]}"
    assert job.organization_id == "org-acme" and job.seed == 7
    assert job.hyperparameters.n_epochs == 4 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == 10
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at >= job.created_at and job.estimated_finish is None
    assert job.metadata == {"team": "support", "round": "1"}
    # tunesmith's extension: the run's energy and emissions (codecarbon, offline)
    assert job.energy["total"]["kwh"] > 0 and job.energy["total"]["kg_co2e"] > 0
    assert job.energy["method"] and job.energy["training"]["seconds"] > 0
    assert job.energy["country_iso_code"] == "FRA"  # the service's setting reached the run

    # listing, with pagination and the metadata filter
    other = client.fine_tuning.jobs.create(model="tiny", training_file=job.training_file,
                                           metadata={"team": "sales"})
    client.fine_tuning.jobs.cancel(other.id)
    first = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [other.id] and first.has_more
    second = client.fine_tuning.jobs.list(limit=1, after=other.id)
    assert [j.id for j in second.data] == [job.id]
    support = client.fine_tuning.jobs.list(metadata={"team": "support"})
    assert [j.id for j in support.data] == [job.id]

    # the result files: a CSV with one row per step, then the run's own report
    assert len(job.result_files) == 2
    report = client.files.retrieve(job.result_files[1])
    assert report.purpose == "fine-tune-results" and report.filename == "report.html"
    assert "<html" in client.files.content(report.id).text.lower()
    result = client.files.retrieve(job.result_files[0])
    assert result.purpose == "fine-tune-results" and result.filename == "step_metrics.csv"
    table = list(csv.DictReader(io.StringIO(client.files.content(result.id).text)))
    assert tuple(table[0]) == RESULT_COLUMNS
    assert [int(r["step"]) for r in table] == list(range(1, 4 * 6 + 1))  # 24 rows / 4 * 4
    assert all(float(r["train_loss"]) > 0 for r in table)
    assert table[-1]["valid_loss"] != ""


def test_events_paginate_newest_first(trained) -> None:
    server, job = trained
    client = server.client("acme")
    events = all_events(client, job.id)  # oldest first
    messages = [e.message for e in events]
    assert messages[0].startswith("Created fine-tuning job")
    for expected in ("Validating training file", "Files validated", "Fine-tuning job started",
                     "Checkpoint created at step", "New fine-tuned model created"):
        assert any(m.startswith(expected) for m in messages), expected
    assert messages[-1] == "The job has successfully completed"
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(1, 25))
    assert all(e.data["total_steps"] == 24 and e.data["train_loss"] > 0 for e in metrics)
    with_valid = [e for e in metrics if "valid_loss" in e.data]
    assert [e.data["step"] for e in with_valid] == [6, 12, 18, 24]
    assert all("valid_mean_token_accuracy" in e.data for e in with_valid)

    # pages of 7, newest first, chained by `after`, cover every event exactly once
    page = client.fine_tuning.jobs.list_events(job.id, limit=7)
    seen = list(page.data)
    while page.has_more:
        page = client.fine_tuning.jobs.list_events(job.id, limit=7, after=page.data[-1].id)
        seen += page.data
    assert [e.id for e in seen] == [e.id for e in events[::-1]]
    assert seen[0].created_at >= seen[-1].created_at
    # the client's auto-pagination walks the same pages
    assert len(list(client.fine_tuning.jobs.list_events(job.id, limit=5))) == len(events)


def test_checkpoints_and_chat(trained) -> None:
    server, job = trained
    client = server.client("acme")
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    # one per epoch, the last 3 kept, newest first
    assert [c.step_number for c in ckpts] == [24, 18, 12]
    for c in ckpts:
        assert c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-" \
            f"{c.step_number}"
        assert c.fine_tuning_job_id == job.id and c.metrics.train_loss > 0
        assert c.metrics.valid_loss > 0
    page = client.fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert page.has_more
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(
        job.id, limit=2, after=page.data[-1].id).data] == [12]

    models = {m.id: m for m in client.models.list()}
    assert models["tiny"].owned_by == "tunesmith"
    assert models[job.fine_tuned_model].owned_by == "org-acme"
    assert client.models.retrieve(ckpts[1].fine_tuned_model_checkpoint).id == \
        ckpts[1].fine_tuned_model_checkpoint

    for model in (job.fine_tuned_model, ckpts[1].fine_tuned_model_checkpoint):
        plain = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=6,
                                               temperature=0)
        choice = plain.choices[0]
        assert plain.object == "chat.completion" and plain.model == model
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert plain.usage.prompt_tokens > 5 and 1 <= plain.usage.completion_tokens <= 6
        assert plain.usage.total_tokens == plain.usage.prompt_tokens + \
            plain.usage.completion_tokens

        chunks = list(client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id
                   for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content  # greedy: the same text both ways
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
            choice.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
            plain.usage.completion_tokens

    # seeded sampling is reproducible, n gives n choices
    a, b = (client.chat.completions.create(model=job.fine_tuned_model, messages=PROMPT,
                                           max_tokens=5, temperature=1.0, seed=3, n=2)
            for _ in range(2))
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]

    # a stop sequence cuts the reply before it and ends with finish_reason "stop"
    full = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8,
                                          temperature=0).choices[0].message.content
    stop = full.strip()[2:5]
    cut = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8,
                                         temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="ft:tiny:acme::nope", messages=PROMPT)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=5000)
    assert err.value.body["code"] == "context_length_exceeded"


def test_feedback_becomes_next_round_data(trained, tmp_path: Path) -> None:
    server, job = trained
    client = server.client("acme")
    model = job.fine_tuned_model
    secret = [PROMPT[0], {"role": "user", "content": "I love it, write to jo@example.com"}]
    first = client.chat.completions.create(model=model, messages=secret, max_tokens=4,
                                           temperature=0)
    second = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=4,
                                            temperature=1.0, seed=1, n=2)
    post = client.post  # the feedback endpoint is our extension: the client's raw post
    fb = post("/feedback", cast_to=object, body={
        "completion_id": first.id, "rating": "bad", "correction": "good"})
    assert fb["object"] == "feedback" and fb["correction"] == "good"
    post("/feedback", cast_to=object, body={"completion_id": second.id, "rating": "good"})
    post("/feedback", cast_to=object, body={"completion_id": second.id, "choice_index": 1,
                                            "rating": "bad"})
    with pytest.raises(openai.NotFoundError):
        post("/feedback", cast_to=object, body={"completion_id": "chatcmpl-nope",
                                                "rating": "good"})
    with pytest.raises(openai.BadRequestError):
        post("/feedback", cast_to=object, body={"completion_id": first.id})

    out = export_feedback(sqlite_url(server.data_dir), org="acme", out_dir=tmp_path / "next")
    chat = [json.loads(x) for x in out.chat_file.read_text().splitlines()]
    dpo = [json.loads(x) for x in out.dpo_file.read_text().splitlines()]
    assert out.chat_examples == len(chat) == 1
    assert chat[0]["messages"][-1] == {"role": "assistant", "content": "good"}
    assert check_chat_record(chat[0], 1) == []
    # redacted before it was stored: the address never reaches the next round's data
    assert "jo@example.com" not in out.chat_file.read_text()
    assert "[EMAIL]" in chat[0]["messages"][1]["content"]
    pairs = {(d["preferred_output"][0]["content"], d["non_preferred_output"][0]["content"])
             for d in dpo}
    assert ("good", first.choices[0].message.content) in pairs
    good, bad = (c.message.content for c in second.choices)
    if good != bad:
        assert (good, bad) in pairs
    assert all(set(d) == {"input", "preferred_output", "non_preferred_output"} for d in dpo)
    assert all(d["input"]["messages"][-1]["role"] == "user" for d in dpo)
    assert out.dpo_pairs == len(dpo)
    # another org's export is empty
    assert export_feedback(sqlite_url(server.data_dir), org="globex",
                           out_dir=tmp_path / "other").chat_examples == 0
    # the same through the command line
    from typer.testing import CliRunner

    from tunesmith.cli import app

    done = CliRunner().invoke(app, ["data", "from-feedback", "--org", "acme", "--data-dir",
                                    str(server.data_dir), "--out", str(tmp_path / "cli")])
    assert done.exit_code == 0, done.output
    assert "1 chat example(s)" in done.stdout
    assert (tmp_path / "cli" / "feedback_chat.jsonl").read_text() == out.chat_file.read_text()
    bad = CliRunner().invoke(app, ["data", "from-feedback", "--org", "acme", "--since", "May"])
    assert bad.exit_code == 2 and "expected a date" in bad.stderr


def test_another_org_gets_404_on_everything(trained) -> None:
    server, job = trained
    owner, other = server.client("acme"), server.client("globex")
    ckpt = owner.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    completion = owner.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=2)
    calls = {
        "file": lambda: other.files.retrieve(job.training_file),
        "file content": lambda: other.files.content(job.training_file),
        "result file": lambda: other.files.content(job.result_files[0]),
        "file delete": lambda: other.files.delete(job.training_file),
        "job": lambda: other.fine_tuning.jobs.retrieve(job.id),
        "cancel": lambda: other.fine_tuning.jobs.cancel(job.id),
        "pause": lambda: other.fine_tuning.jobs.pause(job.id),
        "resume": lambda: other.fine_tuning.jobs.resume(job.id),
        "events": lambda: other.fine_tuning.jobs.list_events(job.id),
        "checkpoints": lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        "model": lambda: other.models.retrieve(job.fine_tuned_model),
        "checkpoint model": lambda: other.models.retrieve(ckpt),
        "model delete": lambda: other.models.delete(job.fine_tuned_model),
        "chat": lambda: other.chat.completions.create(model=job.fine_tuned_model,
                                                       messages=PROMPT, max_tokens=2),
        "chat checkpoint": lambda: other.chat.completions.create(model=ckpt, messages=PROMPT,
                                                                 max_tokens=2),
        "feedback": lambda: other.post("/feedback", cast_to=object, body={
            "completion_id": completion.id, "rating": "good"}),
    }
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError):
            call()
            pytest.fail(f"{name}: no error")
    assert other.files.list().data == []
    assert other.fine_tuning.jobs.list().data == []
    assert [m.id for m in other.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError) as err:  # a job on someone else's file
        other.fine_tuning.jobs.create(model="tiny", training_file=job.training_file)
    assert err.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError):  # fine-tuning someone else's model
        other.fine_tuning.jobs.create(model=job.fine_tuned_model,
                                      training_file=job.training_file)
    # and the owner still has everything
    assert owner.files.retrieve(job.training_file).id == job.training_file
    assert owner.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model


def test_owner_deletes_models_last(trained) -> None:
    """Runs last in this module: it deletes the shared job's models."""
    server, job = trained
    client, other = server.client("acme"), server.client("globex")
    ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1]
    assert client.models.delete(ckpt.fine_tuned_model_checkpoint).deleted
    assert [c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] != [] and \
        ckpt.id not in {c.id for c in client.fine_tuning.jobs.checkpoints.list(job.id).data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=ckpt.fine_tuned_model_checkpoint,
                                       messages=PROMPT, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("tiny")
    deleted = client.models.delete(job.fine_tuned_model)
    assert deleted.id == job.fine_tuned_model and deleted.deleted
    assert job.fine_tuned_model not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=job.fine_tuned_model, messages=PROMPT,
                                       max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(job.fine_tuned_model)
    assert not (server.data_dir / "runs" / job.id / "merged").exists()
    # the job itself and its other checkpoints remain
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert other.models.list().data[0].id == "tiny"
