"""Mean-pooled hidden states: the hook that stops at a block gives what the full pass gives."""

from __future__ import annotations

import pytest
import torch

from tunesmith.errors import ModelError
from tunesmith.models.embed import decoder_layers, embed_texts
from tunesmith.models.load import load

TEXTS = ["short", "a somewhat longer text with more tokens in it", "mid length text", "x"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.mark.parametrize("layer", [1, 2])
def test_pooled_block_output_matches_the_full_forward(tiny, layer: int) -> None:
    model, tokenizer = tiny
    got = embed_texts(model, tokenizer, TEXTS, layer=layer, batch_tokens=16)
    with torch.no_grad():
        for k, text in enumerate(TEXTS):  # one text at a time: no padding at all
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            # hidden_states[k] is block k's output, except the last entry, which is normed:
            # catch the last block's raw output with a hook of our own
            caught: list[torch.Tensor] = []
            handle = decoder_layers(model)[layer - 1].register_forward_hook(
                lambda _m, _i, o, into=caught: into.append(o[0] if isinstance(o, tuple) else o))
            model(input_ids=ids)
            handle.remove()
            block = hidden[layer] if layer < len(decoder_layers(model)) else caught[0]
            torch.testing.assert_close(caught[0], block)
            torch.testing.assert_close(torch.from_numpy(got[k]), block[0].mean(0),
                                       atol=1e-5, rtol=1e-4)


def test_default_layer_is_the_middle_and_bad_layers_fail(tiny) -> None:
    model, tokenizer = tiny
    model.train()
    assert (embed_texts(model, tokenizer, TEXTS) ==
            embed_texts(model, tokenizer, TEXTS, layer=1)).all()
    assert model.training  # left in the mode it was in
    with pytest.raises(ModelError, match="2 decoder blocks"):
        embed_texts(model, tokenizer, TEXTS, layer=3)
    model.eval()
    seen = []
    embed_texts(model, tokenizer, TEXTS * 3, batch_tokens=20, advance=seen.append)
    assert sum(seen) == 12 and len(seen) > 1


def test_a_model_without_blocks_is_named() -> None:
    with pytest.raises(ModelError, match="decoder blocks"):
        decoder_layers(torch.nn.Linear(2, 2))
