"""Federated pieces without processes: Flower's FedAvg on adapter tensors, FFA-LoRA, the
label-skew partition, the FedProx term."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="federated training needs `pip install -e '.[federated]'`")

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402

from tunesmith.config import RunConfig, parse_config
from tunesmith.flows.federated.local import (
    fedprox,
    ffa_lora,
    load_global,
    proximal_term,
)
from tunesmith.flows.federated.partition import partition_indices
from tunesmith.flows.steps import prepare_model_for_training
from tunesmith.models.adapters import trainable_state_copy
from tunesmith.models.load import load
from tunesmith.training.loop import train
from tunesmith.training.setup import LoopSettings


def _reply(state: dict[str, torch.Tensor], n: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(state),
                       "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})})


def test_fedavg_of_adapter_tensors_is_the_weighted_mean() -> None:
    g = torch.Generator().manual_seed(0)
    states = [{"a.lora_A.weight": torch.randn(4, 8, generator=g),
               "a.lora_B.weight": torch.randn(8, 4, generator=g)} for _ in range(3)]
    counts = [10, 30, 60]
    # what Flower's FedAvg.aggregate_train does with the replies' contents
    arrays = aggregate_arrayrecords([_reply(s, n) for s, n in zip(states, counts, strict=True)],
                                    "num-examples")
    for name in states[0]:
        by_hand = (0.1 * states[0][name] + 0.3 * states[1][name] + 0.6 * states[2][name])
        got = torch.from_numpy(arrays[name].numpy())
        torch.testing.assert_close(got, by_hand, rtol=1e-6, atol=1e-6)


def test_label_skew_partition_is_seeded_complete_and_skewed() -> None:
    labels = ["a"] * 100 + ["b"] * 100 + ["c"] * 100
    parts = partition_indices(len(labels), 4, seed=3, labels=labels, alpha=0.1)
    assert parts == partition_indices(len(labels), 4, seed=3, labels=labels, alpha=0.1)
    assert parts != partition_indices(len(labels), 4, seed=4, labels=labels, alpha=0.1)
    assert sorted(i for p in parts for i in p) == list(range(len(labels)))
    assert all(parts)
    # skewed: most clients are dominated by one label (iid would give about a third each)
    top_shares = [Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts]
    assert np.mean(top_shares) > 0.7
    iid = partition_indices(len(labels), 4, seed=3)
    assert sorted(i for p in iid for i in p) == list(range(len(labels)))
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1


def test_proximal_term_is_zero_at_global_and_its_gradient_is_mu_times_the_gap() -> None:
    g = {"w": torch.randn(3, 5), "v": torch.randn(7)}
    assert float(proximal_term(g, g, 0.3)) == 0.0
    w = {k: (t + torch.randn_like(t)).requires_grad_(True) for k, t in g.items()}
    proximal_term(w, g, 0.3).backward()
    for k in w:
        torch.testing.assert_close(w[k].grad, 0.3 * (w[k].detach() - g[k]))


@pytest.fixture
def tiny_cfg(tiny_model_dir: Path) -> RunConfig:
    return parse_config({"model": {"base": str(tiny_model_dir)},
                         "data": {"train_file": "x.jsonl"},
                         "train": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "seed": 5}})


def _lora_model(cfg: RunConfig, tiny_model_dir: Path):
    model, tokenizer = load(tiny_model_dir)
    return prepare_model_for_training(model, cfg), tokenizer


def _settings(steps: int) -> LoopSettings:
    return LoopSettings(learning_rate=5e-2, epochs=steps, batch_size=2, total_steps=steps,
                        eval_every=steps, early_stopping_patience=None, restore_best=False,
                        packing=False, max_grad_norm=None)


def _rows(tokenizer, n: int, offset: int, folder: Path):
    from tests.helpers import review_rows, write_jsonl
    from tunesmith.data.chat import read_chat_jsonl
    from tunesmith.data.encode import encode_chat

    path = write_jsonl(folder / f"rows-{offset}.jsonl", review_rows(n + offset)[offset:])
    return [encode_chat(tokenizer, ex.messages) for ex in read_chat_jsonl(path)]


def test_ffa_lora_keeps_a_identical_on_every_client_and_trains_b(tiny_cfg, tiny_model_dir,
                                                                  tmp_path) -> None:
    server, _ = _lora_model(tiny_cfg, tiny_model_dir)
    start = trainable_state_copy(server)
    global_b = {k: v for k, v in start.items() if "lora_B" in k}
    finals = []
    for client in range(2):  # two clients, different data
        model, tokenizer = _lora_model(tiny_cfg, tiny_model_dir)
        rows = _rows(tokenizer, 4, offset=client * 7, folder=tmp_path)
        train(model, rows, rows[:2], settings=_settings(2), pad_id=tokenizer.pad_token_id,
              checkpoint_dir=tmp_path / f"c{client}", wrappers=[ffa_lora, load_global(global_b)])
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()
                       if "lora_" in n})
    for name, tensor in start.items():
        if "lora_A" in name:  # A: the seeded start, on both clients
            assert torch.equal(finals[0][name], tensor) and torch.equal(finals[1][name], tensor)
    b_names = [n for n in start if "lora_B" in n]
    assert any(not torch.equal(finals[0][n], start[n]) for n in b_names)
    assert any(not torch.equal(finals[0][n], finals[1][n]) for n in b_names)


def test_fedprox_hook_adds_mu_times_the_gap_to_each_gradient(tiny_cfg, tiny_model_dir,
                                                             tmp_path) -> None:
    model, tokenizer = _lora_model(tiny_cfg, tiny_model_dir)
    anchor = {k: v + 0.01 for k, v in trainable_state_copy(model).items()}
    seen: list[torch.Tensor] = []

    def spy(parts):
        def record(optimizer, args, kwargs):
            p = next(p for p in parts.model.parameters() if p.requires_grad)
            seen.append(p.grad.detach().clone())
        parts.optimizer.register_step_pre_hook(record)  # runs after FedProx's hook
        return parts

    rows = _rows(tokenizer, 4, offset=0, folder=tmp_path)
    settings = _settings(1)
    plain, _ = _lora_model(tiny_cfg, tiny_model_dir)
    train(plain, rows, [], settings=settings, pad_id=tokenizer.pad_token_id,
          checkpoint_dir=tmp_path / "a", wrappers=[spy])
    train(model, rows, [], settings=settings, pad_id=tokenizer.pad_token_id,
          checkpoint_dir=tmp_path / "b", wrappers=[fedprox(anchor, 0.5), spy])
    # both start from the same seeded adapters and batch: the gradients differ by exactly
    # mu * (w - w_global) = 0.5 * (-0.01) in every element
    torch.testing.assert_close(seen[1] - seen[0], torch.full_like(seen[0], 0.5 * -0.01),
                               rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- failures


@pytest.fixture
def flower_task():
    """Flower's replies are built inside a run; outside one, name a run and a server node."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def _round_replies(states, counts, failing: dict[int, str]):
    """Replies of nodes 1..n to a train instruction; nodes in ``failing`` answer an error."""
    from flwr.app import Error, Message

    replies = []
    for node, (state, n) in enumerate(zip(states, counts, strict=True), start=1):
        sent = Message(RecordDict({"arrays": ArrayRecord({k: torch.zeros_like(v)
                                                          for k, v in state.items()})}),
                       dst_node_id=node, message_type="train")
        replies.append(Message(Error(code=2, reason=failing[node]), reply_to=sent)
                       if node in failing else Message(_reply(state, n), reply_to=sent))
    return replies


def _strategy(run_dir: Path, min_clients: int):
    from flwr.serverapp.strategy import FedAvg

    from tunesmith.flows.federated.apps import recording

    return recording(FedAvg, run_dir, 0, min_clients, True)(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
        min_available_nodes=1)


def test_a_failed_client_is_logged_and_the_round_averages_the_others(
        flower_task, tmp_path, caplog) -> None:
    g = torch.Generator().manual_seed(1)
    states = [{"l.lora_B.weight": torch.randn(4, 2, generator=g)} for _ in range(3)]
    reason = ("<class 'tunesmith.errors.DataError'>:<'client-2.jsonl line 3: messages[1].role: "
              "'robot' is not one of system, user, assistant'>")
    strategy = _strategy(tmp_path, min_clients=2)
    with caplog.at_level("WARNING", logger="tunesmith"):
        arrays, _ = strategy.aggregate_train(1, _round_replies(states, [10, 30, 60], {3: reason}))
    # the mean of the two that answered, weighted 10:30
    mean = 0.25 * states[0]["l.lora_B.weight"] + 0.75 * states[1]["l.lora_B.weight"]
    torch.testing.assert_close(torch.from_numpy(arrays["l.lora_B.weight"].numpy()), mean)
    assert strategy.pending["failures"] == [{"node": "3", "reason": reason}]
    assert sorted(strategy.pending["clients"]) == ["1", "2"]
    assert "client 3 failed" in caplog.text and "client-2.jsonl line 3" in caplog.text


def test_fewer_answers_than_min_clients_keep_the_global_adapter(flower_task, tmp_path) -> None:
    states = [{"l.lora_B.weight": torch.ones(2, 2)} for _ in range(3)]
    strategy = _strategy(tmp_path, min_clients=2)
    replies = _round_replies(states, [5, 5, 5], {2: "killed", 3: "killed"})
    assert strategy.aggregate_train(4, replies) == (None, None)
    assert strategy.pending["skipped"] and len(strategy.pending["failures"]) == 2


def test_a_malformed_client_file_fails_that_client_with_file_line_and_field(
        tiny_cfg, tmp_path, test_home) -> None:
    from tests.helpers import review_rows, write_jsonl
    from tunesmith.errors import TunesmithError
    from tunesmith.flows.federated.local import train_locally

    rows = review_rows(12)
    rows[4] = {"messages": [{"role": "robot", "content": "hi"}]}
    data = write_jsonl(tmp_path / "client-1.jsonl", rows)
    with pytest.raises(TunesmithError) as err:
        train_locally(tiny_cfg, data, tmp_path / "work", {}, home=test_home, local_steps=1,
                      round_number=1)
    message = str(err.value)
    assert "client-1.jsonl" in message and "line 5" in message and "role" in message


def test_a_client_trains_on_every_row_it_does_not_validate_on(tiny_cfg, tmp_path,
                                                               test_home) -> None:
    """The server holds the test set: a client carves no test split off its own file."""
    from tests.helpers import review_rows, write_jsonl
    from tunesmith.flows.federated.local import client_config
    from tunesmith.flows.steps import load_splits

    data = write_jsonl(tmp_path / "client-1.jsonl", review_rows(40))
    cfg = client_config(tiny_cfg, data, tmp_path / "work")
    splits = load_splits(cfg, with_test=False, carve_test=False)
    assert len(splits.train) + len(splits.validation) == 40
    assert splits.validation and splits.test == []
    # a run (or a search trial) of the same file keeps its test share out of training
    kept = load_splits(cfg, with_test=False)
    assert len(kept.train) + len(kept.validation) < 40


def _classification_client(tiny_model_dir: Path, tmp_path: Path) -> tuple[RunConfig, Path]:
    """A LoRA classification config of the tiny model and a 40-review client file."""
    from tests.helpers import review_rows, write_jsonl

    cfg = parse_config({"model": {"base": str(tiny_model_dir)},
                        "data": {"train_file": "x.jsonl", "max_length": 128},
                        "train": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "seed": 5},
                        "eval": {"task": "classification", "labels": ["good", "bad"]}})
    return cfg, write_jsonl(tmp_path / "client-1.jsonl", review_rows(40))


def test_each_client_scores_the_global_adapter_on_its_own_validation_split(
        tiny_model_dir, tmp_path, test_home) -> None:
    from tunesmith.flows.federated.local import evaluate_locally

    cfg, data = _classification_client(tiny_model_dir, tmp_path)
    model, _ = _lora_model(cfg, tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) * 0.1
             for k, v in trainable_state_copy(model).items()}
    n, metrics = evaluate_locally(cfg, data, tmp_path / "work", state, home=test_home)
    # the split it trains beside: no test share carved off the client's file
    from tunesmith.flows.federated.local import client_config
    from tunesmith.flows.steps import load_splits

    split = load_splits(client_config(cfg, data, tmp_path / "work"), with_test=False,
                        carve_test=False)
    assert n == len(split.validation) and len(split.train) + n == 40
    assert set(metrics) == {"valid_loss", "accuracy", "macro_f1"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # the adapter it scored is the one it was sent: another update (B negated), another loss
    flipped = {k: -v if "lora_B" in k else v for k, v in state.items()}
    _, other = evaluate_locally(cfg, data, tmp_path / "work", flipped, home=test_home)
    assert other["valid_loss"] != pytest.approx(metrics["valid_loss"], abs=1e-6)


def test_under_ffa_lora_a_client_scores_the_b_only_global_adapter(tiny_model_dir, tmp_path,
                                                                   test_home) -> None:
    """Under FFA-LoRA the server sends only the B matrices; the client's evaluation freezes A
    as its training does, instead of refusing the adapter as another LoRA setup's."""
    from tunesmith.errors import ModelError
    from tunesmith.flows.federated.local import evaluate_locally, freeze_lora_a

    cfg, data = _classification_client(tiny_model_dir, tmp_path)
    model, _ = _lora_model(cfg, tiny_model_dir)
    freeze_lora_a(model)
    state = {k: v + 0.05 for k, v in trainable_state_copy(model).items()}
    assert state and all("lora_B" in k for k in state)
    n, metrics = evaluate_locally(cfg, data, tmp_path / "work", state, home=test_home, ffa=True)
    assert n > 0 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["valid_loss"] > 0
    with pytest.raises(ModelError, match="lacks"):
        evaluate_locally(cfg, data, tmp_path / "work", state, home=test_home)


def _eval_replies(results: dict[int, dict[str, float] | str]):
    from flwr.app import Error, Message

    replies = []
    for node, found in results.items():
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                       message_type="evaluate")
        replies.append(Message(Error(code=2, reason=found), reply_to=sent)
                       if isinstance(found, str) else
                       Message(RecordDict({"metrics": MetricRecord(found)}), reply_to=sent))
    return replies


def test_the_sites_scores_are_kept_per_client_with_their_spread(flower_task, tmp_path,
                                                                caplog) -> None:
    strategy = _strategy(tmp_path, min_clients=1)
    strategy.pending = {"round": 2, "clients": {}, "failures": []}
    replies = _eval_replies({1: {"num-examples": 10, "accuracy": 0.9, "valid_loss": 0.5},
                             2: {"num-examples": 30, "accuracy": 0.5, "valid_loss": 1.5},
                             3: "killed"})
    with caplog.at_level("WARNING", logger="tunesmith"):
        strategy.aggregate_evaluate(2, replies)
    sites = strategy.pending["sites"]
    assert sites == {"1": {"num_examples": 10, "accuracy": 0.9, "valid_loss": 0.5},
                     "2": {"num_examples": 30, "accuracy": 0.5, "valid_loss": 1.5}}
    assert strategy.pending["site_accuracy_mean"] == pytest.approx(0.6)  # (9 + 15) / 40
    assert (strategy.pending["site_accuracy_min"], strategy.pending["site_accuracy_max"]) \
        == (0.5, 0.9)
    assert "client 3 failed to evaluate: killed" in caplog.text


def test_the_report_shows_accuracy_per_round_and_per_site(tmp_path) -> None:
    from tunesmith.flows.federated import rounds

    for r, accs in ((1, (0.6, 0.8)), (2, (0.7, 0.9))):
        sites = {"101": {"num_examples": 10, "accuracy": accs[0]},
                 "202": {"num_examples": 10, "accuracy": accs[1]}}
        rounds.append_round(tmp_path, {
            "round": r, "clients": {}, "failures": [], "examples": 20, "train_loss": 1.0,
            "global_accuracy": sum(accs) / 2, "sites": sites,
            "site_accuracy_mean": sum(accs) / 2, "site_accuracy_min": accs[0],
            "site_accuracy_max": accs[1]})
    report = rounds.write_report(tmp_path, "fed", "tiny", {"rounds": 2}).read_text()
    assert (tmp_path / "sites.png").stat().st_size > 0
    assert "## Sites" in report and "sites.png" in report
    assert "| 2 | 202 | 10 | 0.9000 |" in report
    assert "0.8000 (0.7000-0.9000)" in report


def test_local_epochs_give_each_client_steps_in_proportion_to_its_data(tiny_cfg, tmp_path,
                                                                        test_home) -> None:
    """With local_epochs a client takes ceil(local_epochs x its training rows / batch) steps
    (the loop's own count), so the larger client does more of the round's work."""
    from tests.helpers import review_rows, write_jsonl
    from tunesmith.flows.federated.local import client_config, train_locally
    from tunesmith.flows.steps import load_splits

    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(
        update={"batch_size": 4})})
    initial = trainable_state_copy(_lora_model(cfg, tiny_cfg.model.base)[0])
    taken = []
    for name, n in (("small", 16), ("large", 48)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", review_rows(n))
        n_train = len(load_splits(client_config(cfg, data, tmp_path / name), with_test=False,
                                  carve_test=False).train)
        update = train_locally(cfg, data, tmp_path / name, initial, home=test_home,
                               local_steps=99,
                               local_epochs=0.5, round_number=1)
        assert update.steps == -(-n_train // 8)  # ceil(0.5 * n / 4)
        assert update.num_examples == n_train
        taken.append(update.steps)
    assert taken[1] > taken[0] >= 1


def test_local_steps_and_local_epochs_are_not_both_set() -> None:
    from tunesmith.config.federated import FederatedConfig

    by_epochs = FederatedConfig(local_epochs=0.25)
    assert (by_epochs.local_epochs, by_epochs.local_steps) == (0.25, None)
    assert FederatedConfig().local_steps == 10
    # the configuration a run writes (every field) loads again
    for cfg in (by_epochs, FederatedConfig(local_steps=5)):
        assert FederatedConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ValueError, match="local_steps or local_epochs"):
        FederatedConfig(local_steps=5, local_epochs=0.25)
