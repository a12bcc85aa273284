"""The HTTP API in-process (FastAPI's TestClient, no worker): auth, files, job validation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.helpers import jsonl_bytes, review_rows
from tunesmith.service import ServiceSettings, Store, create_app, create_key, revoke_key
from tunesmith.service.tables import ApiKey


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path,
             test_home: Path) -> ServiceSettings:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return ServiceSettings(data_dir=tmp_path / "svc", home=test_home, database_url=url,
                           base_models={"tiny": str(tiny_model_dir)},
                           max_upload_bytes=20_000)


@pytest.fixture
def api(settings: ServiceSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, worker=False)) as client:
        yield client


def auth(settings: ServiceSettings, org: str = "acme") -> dict[str, str]:
    key, _ = create_key(Store(settings.url), org)
    return {"Authorization": f"Bearer {key}"}


def upload(api: TestClient, headers: dict, content: bytes, name: str = "train.jsonl",
           purpose: str = "fine-tune"):
    return api.post("/v1/files", headers=headers, data={"purpose": purpose},
                    files={"file": (name, content, "application/jsonl")})


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert err["code"] == code
    return err


def test_requests_need_a_valid_key(api: TestClient, settings: ServiceSettings) -> None:
    for method, path in (("get", "/v1/models"), ("get", "/v1/files"),
                         ("get", "/v1/fine_tuning/jobs"), ("post", "/v1/chat/completions"),
                         ("get", "/v1/fine_tuning/jobs/ftjob-x/events"),
                         ("post", "/v1/feedback")):
        assert_error(getattr(api, method)(path), 401, "missing_api_key")
        assert_error(getattr(api, method)(path, headers={"Authorization": "Bearer sk-ts-nope"}),
                     401, "invalid_api_key")
    headers = auth(settings)
    assert api.get("/v1/models", headers=headers).status_code == 200
    assert_error(api.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    # a revoked key stops working at once
    store = Store(settings.url)
    key, info = create_key(store, "acme")
    assert api.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    revoke_key(store, info.id)
    assert_error(api.get("/v1/models", headers={"Authorization": f"Bearer {key}"}), 401,
                 "invalid_api_key")
    # keys are stored hashed, never in the clear
    with store.begin() as s:
        stored = [str(v) for row in s.execute(select(ApiKey)).scalars()
                  for v in (row.key_hash, row.prefix, row.name)]
    assert stored and not any(key[len("sk-ts-"):] in v for v in stored)


def test_keys_cli(cli, tmp_path: Path) -> None:
    data = str(tmp_path / "svc")
    code, out, err = cli("keys", "create", "--org", "acme", "--name", "ci", "--data-dir", data)
    assert code == 0, err
    key = out.strip()
    assert key.startswith("sk-ts-") and len(key) > 40 and "shown only now" in err
    code, listed, _ = cli("keys", "list", "--data-dir", data)
    key_id = listed.split()[0]
    assert code == 0 and "acme" in listed and "active" in listed and key not in listed
    code, out, _ = cli("keys", "revoke", key_id, "--data-dir", data)
    assert code == 0 and "revoked" in out
    assert "revoked" in cli("keys", "list", "--data-dir", data)[1]
    code, _, err = cli("keys", "create", "--org", "bad:org", "--data-dir", data)
    assert code == 2 and "org name" in err


def test_upload_is_validated_with_the_chat_validator(api: TestClient,
                                                     settings: ServiceSettings) -> None:
    headers = auth(settings)
    bad = jsonl_bytes(review_rows(3)) + b'{"messages": [{"role": "assitant", "content": "x"}]}\n'
    err = assert_error(upload(api, headers, bad, "reviews.jsonl"), 400, "invalid_file_format")
    assert err["param"] == "file"
    assert 'reviews.jsonl line 4: messages[0].role: unrecognized_role' in err["message"]
    assert 'did you mean "assistant"' in err["message"]
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    err = assert_error(upload(api, headers, b"\n" + jsonl_bytes([no_answer]) + b"{oops\n"), 400)
    assert "line 2: messages: example_missing_assistant_message" in err["message"]
    assert "line 3: invalid_json: invalid JSON" in err["message"]
    assert_error(upload(api, headers, b""), 400, "invalid_file_format")
    assert_error(upload(api, headers, jsonl_bytes(review_rows(2)), purpose="assistants"), 400)
    assert_error(upload(api, headers, b"x" * 30_000), 413, "file_too_large")
    assert_error(api.post("/v1/files", headers=headers, content=b"{}"), 400)
    # nothing of the rejected uploads is left behind
    assert [p.name for p in settings.files_dir.iterdir()] == []
    assert api.get("/v1/files", headers=headers).json()["data"] == []


def test_files_list_retrieve_content_delete(api: TestClient, settings: ServiceSettings) -> None:
    headers = auth(settings)
    contents = [jsonl_bytes(review_rows(n)) for n in (2, 3, 4)]
    ids = [upload(api, headers, c, f"f{i}.jsonl").json()["id"] for i, c in enumerate(contents)]
    listed = api.get("/v1/files", headers=headers).json()
    assert [f["id"] for f in listed["data"]] == ids[::-1] and listed["has_more"] is False
    first = api.get("/v1/files", headers=headers, params={"limit": 2, "order": "asc"}).json()
    assert [f["id"] for f in first["data"]] == ids[:2] and first["has_more"]
    rest = api.get("/v1/files", headers=headers,
                   params={"limit": 2, "order": "asc", "after": ids[1]}).json()
    assert [f["id"] for f in rest["data"]] == ids[2:]
    info = api.get(f"/v1/files/{ids[1]}", headers=headers).json()
    assert info == {**info, "object": "file", "bytes": len(contents[1]), "filename": "f1.jsonl",
                    "purpose": "fine-tune", "status": "processed"}
    assert api.get(f"/v1/files/{ids[1]}/content", headers=headers).content == contents[1]
    assert api.delete(f"/v1/files/{ids[1]}", headers=headers).json() == {
        "id": ids[1], "object": "file", "deleted": True}
    assert_error(api.get(f"/v1/files/{ids[1]}", headers=headers), 404, "file_not_found")
    assert_error(api.get(f"/v1/files/{ids[1]}/content", headers=headers), 404)


def test_job_requests_are_checked(api: TestClient, settings: ServiceSettings) -> None:
    headers = auth(settings)
    file_id = upload(api, headers, jsonl_bytes(review_rows(12))).json()["id"]

    def create(**body):
        return api.post("/v1/fine_tuning/jobs", headers=headers,
                        json={"model": "tiny", "training_file": file_id, **body})

    err = assert_error(create(method={"type": "reinforcement", "reinforcement": {}}), 400,
                       "unsupported_method")
    assert "not supported yet" in err["message"] and err["param"] == "method.type"
    # a DPO job needs preference pairs, and this file holds chat examples
    err = assert_error(create(method={"type": "dpo", "dpo": {}}), 400, "invalid_file_format")
    assert err["param"] == "training_file" and file_id in err["message"]
    assert_error(create(model="gpt-4o-mini"), 400, "model_not_available")
    assert_error(create(training_file="file-nope"), 400, "file_not_found")
    err = assert_error(create(hyperparameters={"n_epochs": 0}), 400)
    assert err["param"] == "hyperparameters.n_epochs"
    assert_error(create(hyperparameters={"n_epochs": 2}, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}), 400)
    assert_error(create(suffix="a:b"), 400)
    assert_error(create(metadata={str(i): "x" for i in range(17)}), 400)
    assert_error(create(training_file=None), 400)

    legacy = create(hyperparameters={"n_epochs": 2, "batch_size": "auto"}).json()
    assert legacy["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto",
                                         "learning_rate_multiplier": "auto"}
    job = create(suffix="my-model", metadata={"k": "v"}).json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "validating_files"
    assert job["fine_tuned_model"] is None and job["organization_id"] == "org-acme"
    assert isinstance(job["seed"], int) and job["metadata"] == {"k": "v"}
    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=headers).json()
    assert [e["message"].split(":")[0] for e in events["data"]] == [
        "Validating training file", "Created fine-tuning job"]

    # state changes: only the allowed ones, conflicts are 409 and not retried by clients
    jid = job["id"]
    resp = api.post(f"/v1/fine_tuning/jobs/{jid}/resume", headers=headers)
    assert_error(resp, 409, "job_not_resumed")
    assert resp.headers["x-should-retry"] == "false"
    assert api.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=headers).json()["status"] \
        == "cancelled"
    assert_error(api.post(f"/v1/fine_tuning/jobs/{jid}/pause", headers=headers), 409)
    assert_error(api.get("/v1/fine_tuning/jobs/ftjob-nope", headers=headers), 404)
    assert_error(api.get("/v1/fine_tuning/jobs", headers=headers, params={"limit": 0}), 400)
    filtered = api.get("/v1/fine_tuning/jobs?metadata[k]=v", headers=headers).json()
    assert [j["id"] for j in filtered["data"]] == [jid]
    none = api.get("/v1/fine_tuning/jobs?metadata=null", headers=headers).json()
    assert [j["id"] for j in none["data"]] == [legacy["id"]]


def test_models_and_chat_errors(api: TestClient, settings: ServiceSettings) -> None:
    headers = auth(settings)
    models = api.get("/v1/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert_error(api.get("/v1/models/ft:tiny:acme::x", headers=headers), 404, "model_not_found")
    assert_error(api.delete("/v1/models/tiny", headers=headers), 403)

    def chat(**body):
        return api.post("/v1/chat/completions", headers=headers, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body})

    assert_error(chat(temperature=3), 400)
    assert_error(chat(messages=[]), 400)
    assert_error(chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400)
    assert_error(chat(modalities=["text", "audio"]), 400)
    assert_error(chat(audio={"voice": "alloy", "format": "wav"}), 400)
    assert_error(chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400)
    reply = chat(max_completion_tokens=3, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]).json()
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 3
    assert reply["choices"][0]["logprobs"] is None

    # log-probabilities as OpenAI reports them, streamed or not
    assert_error(chat(top_logprobs=2), 400)  # without logprobs: true
    assert_error(chat(logprobs=True, top_logprobs=21), 400)
    asked = {"logprobs": True, "top_logprobs": 2, "max_tokens": 5, "temperature": 0}
    reply = chat(**asked).json()["choices"][0]
    content = reply["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == reply["message"]["content"]
    for e in content:
        assert e["logprob"] <= 0 and bytes(e["bytes"]).decode(errors="replace") == e["token"]
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"]
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"], abs=1e-4)
    events = [json.loads(line[6:]) for line in chat(**asked, stream=True).text.splitlines()
              if line.startswith("data: {")]
    deltas = [c for ev in events for c in ev["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in deltas) == \
        reply["message"]["content"]
    streamed = [e for c in deltas if c["logprobs"] for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]

    # logit_bias and the penalties: a bias of 100 forces its token; bad values, a 400
    forced = chat(max_tokens=3, temperature=0, logit_bias={"1000": 100}, logprobs=True).json()
    tokens = [e["token"] for e in forced["choices"][0]["logprobs"]["content"]]
    assert len(tokens) == 3 and len(set(tokens)) == 1
    assert forced["choices"][0]["message"]["content"] == tokens[0] * 3
    for body, param in (({"logit_bias": {"abc": 1}}, "logit_bias"),
                        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
                        ({"presence_penalty": 2.5}, "presence_penalty"),
                        ({"frequency_penalty": -3}, "frequency_penalty")):
        assert assert_error(chat(**body), 400)["param"] == param
    penalised = chat(max_tokens=6, temperature=0, presence_penalty=1.0, frequency_penalty=1.0)
    assert penalised.status_code == 200

    # structured outputs: the reply is held to the schema; what cannot be held, a 400
    schema = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}},
              "required": ["label"], "additionalProperties": False}
    held = chat(max_tokens=20, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "label", "schema": schema}}).json()
    assert json.loads(held["choices"][0]["message"]["content"])["label"] in ("spam", "ham")
    for fmt, param in (({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}},
                        "response_format.json_schema.schema"),
                       ({"type": "json_schema", "json_schema": {
                           "name": "x", "schema": {"type": "string", "maxLength": 10**6}}},
                        "response_format")):
        assert assert_error(chat(response_format=fmt), 400)["param"] == param
    spec = api.get("/openapi.json").json()
    assert "/v1/fine_tuning/jobs/{job_id}/checkpoints" in spec["paths"]
    assert json.dumps(spec).count("HTTPBearer") >= 1
