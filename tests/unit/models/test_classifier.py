"""A classification head pools each sequence at its own last prompt token, packed or padded."""

import pytest
import torch

from tests.helpers import review_rows
from tunesmith.data.encode import IGNORE_INDEX, encode_class_example
from tunesmith.data.packing import collate_packed, pack_rows
from tunesmith.models.classifier import class_logits, class_logits_at, load_classifier
from tunesmith.training.batches import collate


def test_packed_rows_pool_each_sequence_at_its_own_last_token(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = load_classifier(tiny_model_dir, ["good", "bad"],
                            pad_token_id=tokenizer.pad_token_id).eval()
    rows = review_rows(3)
    examples = [encode_class_example(tokenizer, r["messages"][:2], i % 2)
                for i, r in enumerate(rows)]
    with torch.no_grad():
        alone = [class_logits(model, torch.tensor([e.input_ids]), None) for e in examples]
        packed = collate_packed(pack_rows(examples, 10_000), pad_id=tokenizer.pad_token_id,
                                multiple=64)
        assert packed["input_ids"].shape[0] == 1  # all three in one row
        marks = packed["labels"] != IGNORE_INDEX
        in_row = class_logits_at(model, packed["input_ids"], marks,
                                 position_ids=packed["position_ids"])
        padded = collate(examples, pad_id=tokenizer.pad_token_id)
        in_batch = class_logits_at(model, padded["input_ids"], padded["labels"] != IGNORE_INDEX,
                                   attention_mask=padded["attention_mask"])
    expected = torch.cat(alone)
    assert in_row.shape == (3, 2)
    torch.testing.assert_close(in_row, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(in_batch, expected, rtol=1e-4, atol=1e-5)
    # the label positions are the sequences' last tokens, one per sequence
    ends = marks[0].nonzero().flatten().tolist()
    lengths = [len(e) for e in examples]
    assert ends == [sum(lengths[:i + 1]) - 1 for i in range(3)]
    # attending sequence by sequence: the objective's passes are one row (rows of 16 tokens
    # would be one a sequence), pooled the same
    from tunesmith.models.packed_attention import use_packed_attention
    from tunesmith.training.objectives import ClassifierObjective

    objective = ClassifierObjective(model, pad_id=tokenizer.pad_token_id, packing=True,
                                    pack_capacity=16)
    assert [p["input_ids"].shape[0] for p in objective.collate(examples)] == [3]  # SDPA
    assert use_packed_attention(model)
    (one,) = objective.collate(examples)
    with torch.no_grad():
        by_sequence = class_logits_at(model, one["input_ids"], one["labels"] != IGNORE_INDEX,
                                      position_ids=one["position_ids"])
    longest_first = sorted(range(3), key=lambda i: lengths[i], reverse=True)  # pack_rows' order
    torch.testing.assert_close(by_sequence, expected[longest_first], rtol=1e-4, atol=1e-5)


def test_the_new_head_starts_from_the_seed_alone(tiny_model_dir, tokenizer):
    pad = tokenizer.pad_token_id

    def head(seed: int, *, draw_first: bool) -> torch.Tensor:
        if draw_first:  # whatever drew from the global generator earlier must not matter
            torch.rand(1000)
        return load_classifier(tiny_model_dir, ["a", "b"], pad_token_id=pad,
                               seed=seed).score.weight.detach().clone()

    first = head(7, draw_first=False)
    torch.testing.assert_close(head(7, draw_first=True), first, rtol=0, atol=0)
    assert not torch.equal(head(8, draw_first=False), first)
    torch.manual_seed(123)
    untouched = torch.rand(3)
    torch.manual_seed(123)
    head(7, draw_first=False)
    # the global generator is where it would be without the head: loading it drew nothing
    torch.testing.assert_close(torch.rand(3), untouched, rtol=0, atol=0)


def test_validation_macro_f1_is_scikit_learns_over_the_heads_predictions(tiny_model_dir,
                                                                         tokenizer):
    """``valid_macro_f1`` from summed confusion counts (batched, class-weighted loss) equals
    scikit-learn's macro F1 of the head's argmax predictions, example by example."""
    from sklearn.metrics import f1_score

    from tunesmith.training.loop import evaluate_objective
    from tunesmith.training.objectives import ClassifierObjective

    torch.manual_seed(0)
    labels = ["a", "b", "c"]
    model = load_classifier(tiny_model_dir, labels, pad_token_id=tokenizer.pad_token_id).eval()
    rows = review_rows(14)
    truth = [i % 3 if i < 12 else 0 for i in range(len(rows))]  # class 0 most common
    examples = [encode_class_example(tokenizer, r["messages"][:2], y)
                for r, y in zip(rows, truth, strict=True)]
    with torch.no_grad():
        predicted = [int(class_logits(model, torch.tensor([e.input_ids]), None).argmax())
                     for e in examples]
    assert len(set(predicted)) > 1  # a random head that still tells some classes apart
    objective = ClassifierObjective(model, pad_id=tokenizer.pad_token_id,
                                    class_weights=torch.tensor([0.5, 2.0, 1.0]))
    metrics = evaluate_objective(objective, examples, batch_size=4, device=torch.device("cpu"))
    assert metrics["valid_macro_f1"] == pytest.approx(f1_score(truth, predicted,
                                                               average="macro"))
    assert not any(k.startswith(("valid_tp_", "valid_fp_", "valid_fn_")) for k in metrics)
    # in training the objective reports no counts (they would only be summed per batch)
    objective.train()
    out = objective(**collate(examples[:4], pad_id=tokenizer.pad_token_id))
    assert set(out.metrics) == {"accuracy"}


def test_macro_f1_counts_only_classes_that_occur():
    """A class neither true nor predicted anywhere is left out, as scikit-learn does."""
    from sklearn.metrics import f1_score

    from tunesmith.training.objectives import ClassifierObjective

    truth, predicted = [0, 0, 1, 1, 0], [0, 1, 1, 1, 0]
    sums = {"accuracy": 0.8}
    for c in range(3):  # class 2 never occurs
        sums[f"tp_{c}"] = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        sums[f"fp_{c}"] = sum(t != c and p == c for t, p in zip(truth, predicted, strict=True))
        sums[f"fn_{c}"] = sum(t == c and p != c for t, p in zip(truth, predicted, strict=True))
    out = ClassifierObjective.summarise({k: v / 7.0 for k, v in sums.items()})
    assert out == {"accuracy": pytest.approx(0.8 / 7.0),
                   "macro_f1": pytest.approx(f1_score(truth, predicted, average="macro"))}
