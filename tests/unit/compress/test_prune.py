"""Pruning: the requested sparsity in every layer, the 2:4 pattern, Wanda's scores by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunesmith.compress.prune import (
    check_pattern,
    input_norms,
    prunable_linears,
    prune,
    prune_mask,
    scores,
)
from tunesmith.errors import ConfigError


@pytest.fixture
def tiny(tiny_model_dir):
    from tunesmith.models.load import load_model

    return load_model(tiny_model_dir).eval()


def random_rows(n: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 5000, (int(torch.randint(5, 30, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def zero_share(layer: nn.Linear) -> float:
    return float((layer.weight == 0).float().mean())


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.25, 0.75])
def test_every_linear_layer_gets_exactly_the_requested_sparsity(tiny, method, sparsity):
    norms = input_norms(tiny, random_rows(), pad_id=0) if method == "wanda" else None
    report = prune(tiny, sparsity=sparsity, method=method, norms=norms)
    linears = prunable_linears(tiny)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert {name: zero_share(m) for name, m in linears.items()} == {n: sparsity for n in linears}
    assert report.layers == {n: sparsity for n in linears}
    if method == "wanda":  # and per output row, as in the paper
        for m in linears.values():
            per_row = (m.weight == 0).float().mean(dim=1)
            assert torch.equal(per_row, torch.full_like(per_row, sparsity))


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_the_2_4_pattern_holds_in_every_group_of_four(tiny, method):
    norms = input_norms(tiny, random_rows(), pad_id=0) if method == "wanda" else None
    prune(tiny, sparsity=0.5, method=method, pattern="2:4", norms=norms)
    for name, m in prunable_linears(tiny).items():
        kept = (m.weight != 0).reshape(m.out_features, -1, 4).sum(-1)
        assert torch.equal(kept, torch.full_like(kept, 2)), name


def test_non_linear_parameters_are_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    prune(tiny, sparsity=0.5, method="wanda", norms=input_norms(tiny, random_rows(), pad_id=0))
    pruned = {f"{name}.weight" for name in prunable_linears(tiny)}
    after = tiny.state_dict()
    for key, value in after.items():
        if key in pruned:
            assert not torch.equal(value, before[key]), key
        else:  # embeddings, norms, the (tied) LM head
            assert torch.equal(value, before[key]), key
    assert "lm_head.weight" not in pruned and "model.embed_tokens.weight" not in pruned


class Toy(nn.Module):
    """Embedding -> one 'block' holding one linear layer: inputs we know exactly."""

    def __init__(self, vectors: list[list[float]], weight: list[list[float]]) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(torch.tensor(vectors, dtype=torch.float32))
        linear = nn.Linear(len(vectors[0]), len(weight), bias=False)
        linear.weight.data = torch.tensor(weight, dtype=torch.float32)
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": linear})])

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.layers[0]["proj"](self.embed(input_ids))


def test_wanda_scores_equal_a_hand_computation():
    # tokens 0, 1, 2 have known vectors; token 3 is padding with huge values that must not count
    toy = Toy([[1, 2, 0], [2, 0, 0], [2, 0, 3], [100, 100, 100]],
              [[1, -4, 2], [-3, 1, 1]])
    norms = input_norms(toy, [[0, 1], [2]], pad_id=3, batch_size=2)
    # ||X_j||^2 over the three real tokens: [1+4+4, 4+0+0, 0+0+9]
    assert torch.equal(norms["layers.0.proj"], torch.tensor([9.0, 4.0, 9.0]))
    got = scores(toy.layers[0]["proj"].weight, "wanda", norms["layers.0.proj"])
    # |W_ij| * ||X_j||_2 with norms [3, 2, 3]
    assert torch.equal(got, torch.tensor([[3.0, 8.0, 6.0], [9.0, 2.0, 3.0]]))
    prune(toy, sparsity=1 / 3, method="wanda", norms=norms)  # one weight per row
    assert toy.layers[0]["proj"].weight.tolist() == [[0.0, -4.0, 2.0], [-3.0, 0.0, 1.0]]


def test_magnitude_and_wanda_choose_differently_when_input_norms_differ():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0])  # input 0 is 10x larger than the others
    magnitude = prune_mask(scores(weight, "magnitude"), 0.5, "unstructured", per_row=False)
    wanda = prune_mask(scores(weight, "wanda", norms), 0.5, "unstructured", per_row=True)
    assert magnitude.tolist() == [[True, True, False, False]]
    assert wanda.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize(("sparsity", "method", "pattern"), [
    (0.0, "wanda", "unstructured"), (1.0, "wanda", "unstructured"),
    (1.5, "magnitude", "unstructured"), (-0.2, "wanda", "unstructured"),
    (0.3, "wanda", "2:4"), (0.5, "random", "unstructured"), (0.5, "wanda", "1:4")])
def test_bad_settings_are_refused(tiny, sparsity, method, pattern):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(ConfigError):
        prune(tiny, sparsity=sparsity, method=method, pattern=pattern, norms={})
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


def test_2_4_needs_input_sizes_divisible_by_four():
    toy = Toy([[1.0] * 6] * 3, [[1.0] * 6] * 2)
    with pytest.raises(ConfigError, match="divisible by 4"):
        check_pattern(prunable_linears(toy), "2:4")
    check_pattern(prunable_linears(toy), "unstructured")  # fine
