"""A classification head pools each sequence at its own last prompt token, packed or padded."""

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
