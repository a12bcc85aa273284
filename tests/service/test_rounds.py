"""The feedback loop through the service: a fine-tuned model is the base of a new job, and a
round of its users' feedback (``tunesmith improve ft:...``) is promoted as a new ft: model
that the live server lists and answers with, under the official openai client."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.helpers import SYSTEM, review_rows, wait_status, write_jsonl
from tunesmith.cli import app
from tunesmith.service import ServiceSettings
from tunesmith.service.rounds import history_file, improve_model


def _flat(text: str) -> str:
    return " ".join(text.split())


def _give_feedback(client, model: str, n: int) -> None:
    """Ask ``model`` about ``n`` reviews and correct every answer with the right label."""
    for row in review_rows(n):
        prompt, label = row["messages"][:2], row["messages"][2]["content"]
        reply = client.chat.completions.create(model=model, messages=prompt, max_tokens=3,
                                               temperature=0)
        client.post("/feedback", cast_to=object, body={
            "completion_id": reply.id, "rating": "bad", "correction": label})


def test_a_fine_tune_is_the_base_of_a_new_job(trained) -> None:
    server, job = trained
    client = server.client("acme")
    again = client.fine_tuning.jobs.create(
        model=job.fine_tuned_model, training_file=job.training_file, suffix="again", seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4}}})
    done = wait_status(client, again.id, ("succeeded",), timeout=150)
    assert done.model == job.fine_tuned_model
    assert done.fine_tuned_model == f"ft:tiny:acme:again:{again.id[-8:]}"
    config = (server.data_dir / "runs" / again.id / "config.yaml").read_text()
    assert str(server.data_dir / "runs" / job.id) in config  # trained from the fine-tune


def test_a_feedback_round_is_promoted_as_a_new_model(trained, test_home: Path,
                                                     tmp_path: Path) -> None:
    server, job = trained
    client = server.client("acme")
    settings = ServiceSettings(data_dir=server.data_dir, home=test_home)
    holdout = write_jsonl(tmp_path / "holdout.jsonl", [
        {"messages": [{"role": "system", "content": SYSTEM}, r["messages"][1] | {
            "content": r["messages"][1]["content"].replace("(#", "(held #")},
            r["messages"][2]]} for r in review_rows(16)])

    # no feedback on this model yet: a clear refusal, exit 2, nothing registered
    runner = CliRunner()
    refused = runner.invoke(app, ["improve", job.fine_tuned_model, "--data-dir",
                                  str(server.data_dir), "--holdout", str(holdout),
                                  "--no-progress"])
    assert refused.exit_code == 2 and "POST /v1/feedback" in _flat(refused.output)
    bad = runner.invoke(app, ["improve", "ft:tiny:acme", "--data-dir", str(server.data_dir)])
    assert bad.exit_code == 2 and "ft:BASE:ORG:SUFFIX:ID" in _flat(bad.output)
    unknown = runner.invoke(app, ["improve", "ft:tiny:acme::nope1234", "--data-dir",
                                  str(server.data_dir)])
    assert unknown.exit_code == 2
    assert "no fine-tuned model of org 'acme'" in _flat(unknown.output)
    assert not history_file(settings, "acme").exists()

    _give_feedback(client, job.fine_tuned_model, 12)
    done = improve_model(settings, "acme", job.fine_tuned_model, holdout=holdout, margin=1.0,
                         show_progress=False)
    r = done.round
    assert r.promoted and r.objective == "dpo" and r.feedback == {"pairs": 12, "chat": 12}
    assert done.model == f"ft:tiny:acme:reviews:{done.job_id[-8:]}"
    history = [json.loads(x) for x in history_file(settings, "acme").read_text().splitlines()]
    assert [h["round"] for h in history] == [1] and history[0]["promoted"]

    # the live server serves it like any fine-tune, and shows the round as a job
    assert done.model in {m.id for m in client.models.list().data}
    round_job = client.fine_tuning.jobs.retrieve(done.job_id)
    assert round_job.status == "succeeded" and round_job.fine_tuned_model == done.model
    assert round_job.model == job.fine_tuned_model and round_job.method.type == "dpo"
    assert round_job.trained_tokens and round_job.result_files
    assert round_job.metadata == {"feedback_round": "1"}
    data = client.files.content(round_job.training_file).text.splitlines()
    assert len(data) == 12 and "preferred_output" in data[0]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(done.job_id)]
    assert any(m.startswith("Promoted: accuracy") for m in messages)
    reply = client.chat.completions.create(
        model=done.model, max_tokens=3, temperature=0,
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Great value, works well"}])
    assert reply.model == done.model
    # another org cannot improve acme's model
    other = improve_model_error(settings, "globex", done.model)
    assert "no fine-tuned model of org 'globex'" in _flat(other)


def improve_model_error(settings: ServiceSettings, org: str, model: str) -> str:
    try:
        improve_model(settings, org, model, show_progress=False)
    except Exception as err:  # noqa: BLE001 - the message is what is checked
        return str(err)
    raise AssertionError("improve_model accepted another org's model")
