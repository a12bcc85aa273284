"""DPO jobs through the official openai client against a live `tunesmith serve`: preference
files on upload, OpenAI's ``method`` object, the wrong kind of file, and a DPO job trained to
a model that answers (marked ``dpo_training``: it needs the DPO objective in the run flow)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import openai
import pytest

from tests.helpers import (
    LiveServer,
    all_events,
    review_rows,
    wait_status,
    write_jsonl,
)
from tunesmith.service import plan
from tunesmith.service.plan import JobDataError, check_job_data, plan_run

SPAM = ["WIN a free iPhone now, click here", "Cheap meds, no prescription needed",
        "You have been selected for a cash prize", "Hot singles in your area want to chat",
        "Your account is locked, send your password", "Earn $5000 a week from home",
        "Claim your free gift card today", "Limited offer: 90% off luxury watches",
        "Congratulations, you won the lottery", "Lose 10 kg in a week with this pill"]
HAM = ["Are we still on for lunch tomorrow?", "The meeting moved to 3pm",
       "Can you send me the report by Friday?", "Happy birthday, have a great day",
       "I left my keys at your place", "The train is running ten minutes late",
       "Thanks for the help with the move", "Dinner is at seven, bring a salad",
       "Please review the pull request when you can", "See you at the gym tonight"]


def spam_pairs(n: int, start: int = 0) -> list[dict]:
    """``n`` OpenAI preference pairs: a spam/ham question, the right one-word answer
    preferred over the wrong word or a rambling non-answer."""
    rows = []
    for i in range(start, start + n):
        spam = i % 2 == 0
        text = (SPAM if spam else HAM)[(i // 2) % 10] + f" (#{i})"
        answer, wrong = ("spam", "ham") if spam else ("ham", "spam")
        rejected = wrong if i % 4 < 2 else (f"Hard to say. It might be {answer}, but it "
                                            f"could also be {wrong}; I cannot tell for sure.")
        rows.append({"input": {"messages": [{"role": "user", "content": f"Is this spam: {text}"}]},
                     "preferred_output": [{"role": "assistant", "content": answer}],
                     "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return rows


DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}}


@pytest.fixture(scope="module")
def files(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Uploaded ids: 40 training pairs, 8 validation pairs, and 24 chat examples."""
    folder = tmp_path_factory.mktemp("data")
    client = server.client("acme")
    written = {"pairs": write_jsonl(folder / "pairs.jsonl", spam_pairs(40)),
               "valid_pairs": write_jsonl(folder / "valid_pairs.jsonl", spam_pairs(8, 40)),
               "chat": write_jsonl(folder / "chat.jsonl", review_rows(24))}
    uploaded = {name: client.files.create(file=path, purpose="fine-tune")
                for name, path in written.items()}
    assert all(f.purpose == "fine-tune" and f.status == "processed" for f in uploaded.values())
    return {name: f.id for name, f in uploaded.items()}


def _bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


def test_dpo_job_shows_its_method(server: LiveServer, files: dict[str, str]) -> None:
    client = server.client("acme")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=files["pairs"],
                                         validation_file=files["valid_pairs"], method=DPO)
    assert job.status == "validating_files" and job.method is not None
    assert job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo.hyperparameters.model_dump() == {
        "beta": 0.2, "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": "auto"}
    # the deprecated top-level field keeps OpenAI's three shared values
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.method.type == "dpo" and again.method.dpo.hyperparameters.beta == 0.2
    assert [j.method.type for j in client.fine_tuning.jobs.list().data] == ["dpo"]
    # beta left out (or 'auto') stays 'auto' until the worker resolves it
    auto = client.fine_tuning.jobs.create(model="tiny", training_file=files["pairs"],
                                          method={"type": "dpo"})
    assert auto.method.dpo.hyperparameters.beta == "auto"
    for made in (job, auto):  # free the worker for the other tests
        with contextlib.suppress(openai.ConflictError):
            client.fine_tuning.jobs.cancel(made.id)


def test_bad_dpo_requests_are_400_naming_the_param(server: LiveServer,
                                                   files: dict[str, str]) -> None:
    client = server.client("acme")

    def create(**body):
        return lambda: client.fine_tuning.jobs.create(
            **{"model": "tiny", "training_file": files["pairs"], **body})

    for beta in (-0.5, 0, "high"):
        err = _bad_request(create(method={"type": "dpo", "dpo": {"hyperparameters": {
            "beta": beta}}}))
        assert err.param == "method.dpo.hyperparameters.beta", (beta, err.message)
    err = _bad_request(create(method={"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 0}}}))
    assert err.param == "method.dpo.hyperparameters.n_epochs"
    err = _bad_request(create(method={"type": "dpo", "dpo": {"beta": 0.2}}))
    assert err.param == "method.dpo.beta"  # misplaced: not silently ignored
    err = _bad_request(create(method={"type": "dpo", "supervised": {"hyperparameters": {
        "n_epochs": 2}}}))
    assert err.param == "method.supervised"
    err = _bad_request(create(hyperparameters={"n_epochs": 2}, method=DPO))
    assert err.param == "hyperparameters" and "method.dpo.hyperparameters" in err.message
    err = _bad_request(create(method={"type": "supervised", "supervised": {
        "hyperparameters": {"beta": 0.2}}}))
    assert err.param == "method.supervised.hyperparameters.beta"
    err = _bad_request(create(method={"type": "reinforcement", "reinforcement": {}}))
    assert err.param == "method.type" and err.code == "unsupported_method"

    # the wrong kind of file, named with what to do
    err = _bad_request(create(training_file=files["chat"], method=DPO))
    assert err.param == "training_file" and err.code == "invalid_file_format"
    assert f"{files['chat']} holds chat examples; a dpo job needs preference pairs (input, " \
           "preferred_output, non_preferred_output)" in err.message
    err = _bad_request(create(validation_file=files["chat"], method=DPO))
    assert err.param == "validation_file" and files["chat"] in err.message
    err = _bad_request(create(method={"type": "supervised"}))
    assert err.param == "training_file" and err.code == "invalid_file_format"
    assert f"{files['pairs']} holds preference pairs; a supervised job needs chat " \
           "examples" in err.message and "method.type 'dpo'" in err.message
    err = _bad_request(create())  # no method: supervised
    assert err.param == "training_file"


def test_preference_uploads_are_checked_line_by_line(server: LiveServer,
                                                     tmp_path: Path) -> None:
    client = server.client("acme")
    rows = spam_pairs(6)
    rows[2]["preferred_output"][0]["role"] = "user"
    del rows[4]["non_preferred_output"]
    rows[5]["non_preferred_output"] = rows[5]["preferred_output"]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    err = _bad_request(lambda: client.files.create(file=path, purpose="fine-tune"))
    assert err.param == "file" and err.code == "invalid_file_format"
    assert "prefs.jsonl: 3 problem(s)" in err.message and "preference pairs" in err.message
    # each with its line and field (the categories are tunesmith.data.preference's)
    assert 'prefs.jsonl line 3: preferred_output[0].role: ' in err.message
    assert 'must be "assistant", not "user"' in err.message
    assert "prefs.jsonl line 5: non_preferred_output: " in err.message
    assert "prefs.jsonl line 6: non_preferred_output: " in err.message
    # a line of another kind in a preference file is a problem of that line
    mixed = write_jsonl(tmp_path / "mixed.jsonl", spam_pairs(3) + review_rows(1))
    err = _bad_request(lambda: client.files.create(file=mixed, purpose="fine-tune"))
    assert "mixed.jsonl line 4: input.messages: " in err.message
    good = client.files.create(file=write_jsonl(tmp_path / "ok.jsonl", spam_pairs(12)),
                               purpose="fine-tune")
    assert good.filename == "ok.jsonl"
    assert {f.filename for f in client.files.list().data} >= {"ok.jsonl"}
    assert "prefs.jsonl" not in {f.filename for f in client.files.list().data}


def test_dpo_plan_is_a_dpo_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run config of a DPO job (the training split's size is stubbed: the run flow's own
    reading of preference pairs is not this test's business)."""
    train = write_jsonl(tmp_path / "pairs.jsonl", spam_pairs(40))
    monkeypatch.setattr(plan, "training_size", lambda cfg: 32)
    # evaluated as the run evaluates pairs: by their preferred answers, here two labels
    assert check_job_data(train, None, "dpo") == "classification"
    free = spam_pairs(12)
    for i, row in enumerate(free):
        row["preferred_output"][0]["content"] = f"a longer answer, number {i}"
    assert check_job_data(write_jsonl(tmp_path / "free.jsonl", free), None, "dpo") \
        == "generation"

    def planned(requested: dict):
        return plan_run(job_id="ftjob-x", run_dir=tmp_path / "run", base_ref="tiny",
                        train_path=train, valid_path=None, requested=requested,
                        task="classification", seed=9, max_eval_examples=10)

    cfg, reported = planned({"n_epochs": 1, "batch_size": 4,
                             "learning_rate_multiplier": "auto", "beta": 0.2})
    assert cfg.train.objective == "dpo" and cfg.train.preference.beta == 0.2
    assert reported == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0,
                        "beta": 0.2}
    assert planned(reported)[0] == cfg  # planning again when training starts: the same run
    cfg, reported = planned({"n_epochs": "auto", "batch_size": "auto",
                             "learning_rate_multiplier": 2, "beta": "auto"})
    assert cfg.train.preference.beta == reported["beta"] == 0.1  # tunesmith's auto beta
    assert cfg.train.epochs == reported["n_epochs"] and reported["n_epochs"] >= 1
    # a supervised job stays sft, and reports no beta
    cfg, reported = planned({"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1})
    assert cfg.train.objective == "sft" and "beta" not in reported


def test_dpo_job_data_is_checked_by_the_worker(tmp_path: Path) -> None:
    few = write_jsonl(tmp_path / "few.jsonl", spam_pairs(5))
    with pytest.raises(JobDataError) as caught:
        check_job_data(few, None, "dpo")
    assert caught.value.code == "invalid_n_examples"
    chat = write_jsonl(tmp_path / "chat.jsonl", review_rows(12))
    with pytest.raises(JobDataError) as caught:
        check_job_data(write_jsonl(tmp_path / "ok.jsonl", spam_pairs(12)), chat, "dpo")
    assert caught.value.param == "validation_file"
    assert "line 1: input.messages: " in str(caught.value)
    with pytest.raises(JobDataError) as caught:
        check_job_data(tmp_path / "gone.jsonl", None, "dpo")
    assert caught.value.code == "file_not_found"


@pytest.mark.dpo_training
# slow: keeps `make test` under 25 minutes; `make test-slow` runs it
@pytest.mark.slow
def test_dpo_job_trains_a_model_that_answers(server: LiveServer, files: dict[str, str]) -> None:
    client = server.client("acme")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=files["pairs"],
                                         validation_file=files["valid_pairs"], suffix="spam",
                                         seed=3, method=DPO)
    done = wait_status(client, job.id, ("succeeded",), timeout=420)
    assert done.fine_tuned_model == f"ft:tiny:acme:spam:{job.id[-8:]}"
    assert done.method.type == "dpo"
    assert done.method.dpo.hyperparameters.model_dump() == {
        "beta": 0.2, "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert done.trained_tokens and done.trained_tokens > 0
    events = all_events(client, job.id)
    messages = [e.message for e in events]
    assert f"New fine-tuned model created: {done.fine_tuned_model}" in messages
    # with a validation file every training pair is trained on: 40 pairs / 4 = 10 steps
    assert [e.data["step"] for e in events if e.type == "metrics"] == list(range(1, 11))
    assert any(m.startswith("Evaluation on held-out examples") for m in messages)
    assert done.fine_tuned_model in {m.id for m in client.models.list().data}

    reply = client.chat.completions.create(
        model=done.fine_tuned_model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "Is this spam: Free cruise, reply YES now"}])
    assert reply.model == done.fine_tuned_model
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens <= 4
