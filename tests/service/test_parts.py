"""Small parts of the service: planning a run, results CSV, feedback data, redaction, cache."""

from __future__ import annotations

import torch

from tests.conftest import review_rows
from tunesmith.config import auto_learning_rate
from tunesmith.data.chat import ChatExample
from tunesmith.service.audit import feedback_records, redact
from tunesmith.service.inference import ModelCache, _held_back
from tunesmith.service.plan import detect_task, resolve_hyperparameters, run_config
from tunesmith.service.runner import RESULT_COLUMNS, results_csv
from tunesmith.service.tables import Completion, Feedback


def examples(rows: list[dict]) -> list[ChatExample]:
    return [ChatExample(r["messages"]) for r in rows]


def test_task_detection() -> None:
    assert detect_task(examples(review_rows(24)), None) == "classification"
    free = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": f"answer number {i}"}]}
            for i in range(24)]
    assert detect_task(examples(free), None) == "generation"
    # a validation label the training set never shows cannot be scored as a class
    odd = review_rows(2)
    odd[0]["messages"][-1]["content"] = "neutral"
    assert detect_task(examples(review_rows(24)), examples(odd)) == "generation"


def test_hyperparameters_and_run_config(tmp_path) -> None:
    auto = resolve_hyperparameters({"n_epochs": "auto", "batch_size": "auto",
                                    "learning_rate_multiplier": "auto"}, 40)
    assert auto == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert resolve_hyperparameters({"batch_size": 64}, 20)["batch_size"] == 20
    cfg = run_config(job_id="ftjob-x", run_dir=tmp_path / "run", base_ref="tiny",
                     train_path=tmp_path / "t.jsonl", valid_path=tmp_path / "v.jsonl",
                     hyperparameters={"n_epochs": 2, "batch_size": 8,
                                      "learning_rate_multiplier": 0.5},
                     task="classification", seed=9, max_eval_examples=10)
    assert cfg.train.learning_rate == auto_learning_rate("lora", 8) * 0.5
    assert cfg.train.eval_every == "epoch" and cfg.train.keep_checkpoints == 3
    assert cfg.train.early_stopping_patience is None and cfg.train.seed == 9
    assert cfg.data.test_file == cfg.data.validation_file == tmp_path / "v.jsonl"
    assert cfg.eval.task == "classification" and not cfg.eval.compare_base


def test_results_csv_merges_train_and_eval_by_step() -> None:
    text = results_csv([
        {"kind": "eval", "step": 0, "valid_loss": 9.0, "valid_token_accuracy": 0.0},
        {"kind": "train", "step": 1, "train_loss": 2.0, "train_token_accuracy": 0.5},
        {"kind": "train", "step": 2, "train_loss": 1.0, "train_token_accuracy": 0.75},
        {"kind": "eval", "step": 2, "valid_loss": 1.5, "valid_token_accuracy": 0.6},
    ]).decode()
    assert text.splitlines() == [",".join(RESULT_COLUMNS), "1,2.0,0.5,,", "2,1.0,0.75,1.5,0.6"]


def test_feedback_records() -> None:
    prompt = [{"role": "user", "content": "How is it?"}]
    a = Completion(id="c1", messages=prompt, choices=["meh", "great"])
    b = Completion(id="c2", messages=prompt, choices=["bad answer"])
    chat, dpo = feedback_records([
        (Feedback(completion_id="c1", choice_index=1, rating="good"), a),
        (Feedback(completion_id="c1", choice_index=0, rating="bad"), a),
        (Feedback(completion_id="c2", choice_index=0, rating="bad", correction="Fine."), b),
    ])
    assert chat == [{"messages": [*prompt, {"role": "assistant", "content": "Fine."}]}]
    pairs = {(d["preferred_output"][0]["content"], d["non_preferred_output"][0]["content"])
             for d in dpo}
    assert pairs == {("great", "meh"), ("great", "bad answer"), ("Fine.", "meh"),
                     ("Fine.", "bad answer")}
    assert all(d["input"] == {"messages": prompt} for d in dpo)


def test_redaction() -> None:
    text = redact("mail jo.doe+x@mail.example.com or call +44 20 7946 0958, card "
                  "4111 1111 1111 1111 from 10.0.0.12")
    for secret in ("jo.doe", "7946", "4111", "10.0.0.12"):
        assert secret not in text
    assert "[EMAIL]" in text and "[PHONE]" in text and "[CREDIT_CARD]" in text
    assert redact("version 2.5 costs 30 dollars") == "version 2.5 costs 30 dollars"


def test_stop_sequences_hold_back_possible_starts() -> None:
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("xyz",)) == 0
    assert _held_back("ab", ("abc", "b!")) == 2


def test_model_cache_evicts_least_recently_used() -> None:
    def linear(n: int):  # n*n float32 weights
        return lambda: (torch.nn.Linear(n, n, bias=False), object())

    cache = ModelCache(budget_bytes=3 * 64 * 64 * 4)
    loads = []
    for name in ("a", "b", "a", "c", "d"):
        cache.get(name, lambda name=name: (loads.append(name), linear(64)())[1])
    assert loads == ["a", "b", "c", "d"]
    assert cache.names() == ["a", "c", "d"]  # b was the least recently used
    cache.get("big", linear(128))  # larger than the budget: served alone
    assert cache.names() == ["big"]
    cache.forget("big")
    assert cache.names() == []


def test_upload_parser_streams_across_any_chunking(tmp_path) -> None:
    import asyncio

    from tunesmith.errors import ServiceError
    from tunesmith.service.upload import receive_upload

    content = b'{"messages": []}\n' * 200 + b"\r\n--not-the-boundary\r\n"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../d/t.jsonl\""
            b"\r\nContent-Type: application/jsonl\r\n\r\n" + content + b"\r\n--XyZ--\r\n")

    async def chunks(size: int):
        for i in range(0, len(body), size):
            yield body[i:i + size]

    for size in (1, 7, 4096):
        got = asyncio.run(receive_upload("multipart/form-data; boundary=XyZ", chunks(size),
                                         temp_dir=tmp_path, limit=10_000))
        assert got.fields == {"purpose": "fine-tune"} and got.filename == "t.jsonl"
        assert got.file_path.read_bytes() == content and got.size == len(content)
        got.file_path.unlink()
    try:
        asyncio.run(receive_upload("multipart/form-data; boundary=XyZ", chunks(64),
                                   temp_dir=tmp_path, limit=1000))
    except ServiceError as err:
        assert err.status == 413
    else:
        raise AssertionError("the limit was not enforced")
    assert list(tmp_path.iterdir()) == []  # the partial file is removed
