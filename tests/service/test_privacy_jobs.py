"""Differential privacy on fine-tuning jobs (tunesmith's extension): ``method.supervised.privacy``
through the official openai client against a live `tunesmith serve`, the 400s of settings that
cannot work, the run a private job plans, and the store column its result lives in."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import openai
import pytest
from sqlalchemy import inspect, text

from tests.helpers import (
    LiveServer,
    all_events,
    review_rows,
    wait_status,
    write_jsonl,
)
from tunesmith.service import Store, sqlite_url
from tunesmith.service import plan as plan_module
from tunesmith.service.objects import job_object
from tunesmith.service.plan import PrivacyPlanError, plan_run
from tunesmith.service.tables import Job

TARGET = 8.0
PRIVACY = {"target_epsilon": TARGET, "delta": "auto", "max_grad_norm": 1.0, "accountant": "rdp"}
# as the job echoes it: the settings asked, defaults filled in
ECHOED = {**PRIVACY, "physical_batch_size": 16}
N_TRAIN = 48  # with a validation file every row trains: batch 16 < 48, 3 steps in one epoch


def private(privacy: dict | None = None, **hyperparameters) -> dict:
    hp = {"n_epochs": 1, "batch_size": 16, **hyperparameters}
    return {"type": "supervised", "supervised": {"hyperparameters": hp,
                                                 "privacy": privacy or PRIVACY}}


@pytest.fixture(scope="module")
def files(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    rows = review_rows(N_TRAIN + 8)
    client = server.client("acme")
    return {name: client.files.create(file=write_jsonl(folder / f"{name}.jsonl", part),
                                      purpose="fine-tune").id
            for name, part in (("train", rows[:N_TRAIN]), ("valid", rows[N_TRAIN:]))}


def _bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


# slow: keeps `make test` under 25 minutes; `make test-slow` runs it
@pytest.mark.slow
def test_private_job_reports_the_epsilon_it_spent(server: LiveServer,
                                                  files: dict[str, str]) -> None:
    client = server.client("acme")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=files["train"],
                                         validation_file=files["valid"], seed=5,
                                         method=private())
    assert job.status == "validating_files" and job.privacy is None
    assert job.method.type == "supervised" and job.method.supervised.privacy == ECHOED
    assert "privacy" not in job.hyperparameters.model_dump()

    done = wait_status(client, job.id, ("succeeded",), timeout=420)
    assert done.method.supervised.privacy == ECHOED
    assert done.method.supervised.hyperparameters.batch_size == 16
    spent = done.privacy
    assert 0 < spent["epsilon"] <= TARGET, spent
    assert spent["delta"] == 1e-5 and spent["accountant"] == "rdp"
    assert spent["max_grad_norm"] == 1.0 and spent["noise_multiplier"] > 0
    assert spent["steps"] == 3 and spent["target_epsilon"] == TARGET
    assert spent["n_examples"] == N_TRAIN and spent["sample_rate"] == pytest.approx(16 / 48)
    assert client.fine_tuning.jobs.retrieve(job.id).privacy == spent

    events = all_events(client, job.id)
    dp = [e for e in events if e.message.startswith("differential privacy: epsilon")]
    assert len(dp) == 1 and dp[0].data["privacy"] == spent
    assert dp[0].message == (f"differential privacy: epsilon {spent['epsilon']:.2f} at delta "
                             "1e-05 (RDP accountant)")
    assert any("epsilon" in e.data for e in events if e.type == "metrics")

    run_dir = server.data_dir / "runs" / job.id
    card = json.loads((run_dir / "merged" / "privacy.json").read_text())
    assert card["epsilon"] == pytest.approx(spent["epsilon"])
    assert (run_dir / "adapter" / "privacy.json").is_file()

    # a job without privacy carries none, and its method no privacy section
    plain = client.fine_tuning.jobs.create(model="tiny", training_file=files["train"])
    assert plain.privacy is None and "privacy" not in plain.method.supervised.model_dump()
    with contextlib.suppress(openai.ConflictError):
        client.fine_tuning.jobs.cancel(plain.id)


def test_privacy_that_cannot_work_is_400_naming_the_field(server: LiveServer,
                                                          files: dict[str, str]) -> None:
    client = server.client("acme")
    before = [j.id for j in client.fine_tuning.jobs.list().data]

    def create(method: dict, **body):
        return lambda: client.fine_tuning.jobs.create(
            **{"model": "tiny", "training_file": files["train"],
               "validation_file": files["valid"], "method": method, **body})

    err = _bad_request(create(private({**PRIVACY, "epsilon_budget": 3})))
    assert err.param == "method.supervised.privacy.epsilon_budget"
    assert "Extra inputs are not permitted" in err.message
    err = _bad_request(create(private({"target_epsilon": 8, "noise_multiplier": 1.0})))
    assert err.param == "method.supervised.privacy"
    assert "exactly one of target_epsilon and noise_multiplier" in err.message
    err = _bad_request(create({"type": "dpo", "dpo": {"privacy": PRIVACY}}))
    assert err.param == "method.dpo.privacy" and err.code == "unsupported_method"
    assert "works with supervised jobs only" in err.message

    # checked against the data when the job is created, as its worker will plan it
    err = _bad_request(create(private(batch_size=4)))
    assert err.param == "method.supervised.hyperparameters.batch_size"
    assert err.code == "invalid_hyperparameters"
    assert "batch_size 4 is too small for differential privacy" in err.message
    assert "use 16 or more" in err.message
    err = _bad_request(create({"type": "supervised", "supervised": {"privacy": PRIVACY}},
                              hyperparameters={"batch_size": 8}))
    assert err.param == "hyperparameters.batch_size"  # the deprecated top-level form
    err = _bad_request(create(private({**PRIVACY, "delta": 0.05})))
    assert err.param == "method.supervised.privacy.delta"
    assert f"not below 1/n = {1 / N_TRAIN:g}" in err.message and "'auto'" in err.message
    err = _bad_request(create(private({**PRIVACY, "target_epsilon": 0.1})))
    assert err.param == "method.supervised.privacy.target_epsilon"
    assert "cannot be reached" in err.message and "train.privacy" not in err.message
    assert [j.id for j in client.fine_tuning.jobs.list().data] == before  # none was made


def test_private_plan_is_a_private_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", review_rows(120))
    monkeypatch.setattr(plan_module, "training_size", lambda cfg: 100)

    def planned(requested: dict, **kw):
        return plan_run(job_id="ftjob-x", run_dir=tmp_path / "run", base_ref="tiny",
                        train_path=train, valid_path=None, requested=requested,
                        task="classification", seed=9, max_eval_examples=10, **kw)

    asked = {"n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": "auto",
             "privacy": ECHOED}
    cfg, reported = planned(asked)
    assert cfg.train.privacy is not None and cfg.train.privacy.accountant == "rdp"
    assert cfg.train.privacy.target_epsilon == TARGET and cfg.train.packing is False
    # 'auto' is a DP-sized batch (at least 16), not the small batch of a plain job
    assert reported["batch_size"] == cfg.train.batch_size == 16
    assert reported["privacy"] == ECHOED and "privacy" not in asked["privacy"]
    assert planned(reported)[0] == cfg  # planning again when training starts: the same run
    assert planned({k: v for k, v in asked.items() if k != "privacy"})[0].train.privacy is None

    with pytest.raises(PrivacyPlanError) as caught:
        planned({**asked, "batch_size": 4}, hyperparameters_param="hyperparameters")
    assert caught.value.param == "hyperparameters.batch_size"
    assert caught.value.code == "invalid_hyperparameters"
    assert str(caught.value).startswith("hyperparameters.batch_size 4 is too small")
    with pytest.raises(PrivacyPlanError) as caught:
        planned({**asked, "privacy": {**ECHOED, "delta": 0.02}})
    assert caught.value.param == "method.supervised.privacy.delta"
    assert "method.supervised.privacy.delta 0.02 is not below 1/n = 0.01" in str(caught.value)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return sqlite_url(tmp_path)


def test_an_older_store_gets_the_privacy_column(store_url: str) -> None:
    """A store made before private jobs (no ``jobs.privacy``) opens, and gains the column."""
    old = Store(store_url)
    with old.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN privacy"))
    assert "privacy" not in {c["name"] for c in inspect(old.engine).get_columns("jobs")}
    old.close()
    store = Store(store_url)
    assert "privacy" in {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    Store(store_url).close()  # opening it again adds nothing twice
    with store.begin() as s:
        s.add(Job(id="ftjob-a", org="acme", model="tiny", base_ref="tiny", training_file="f",
                  seed=1, hyperparameters={"n_epochs": 1}, status="succeeded",
                  output_model="ft:a", result_files=[], privacy={"epsilon": 2.5}))
    with store.begin() as s:
        shown = job_object(s.get(Job, "ftjob-a"))
    assert shown["privacy"] == {"epsilon": 2.5} and "privacy" not in shown["hyperparameters"]
    store.close()
