import copy

import pytest
import torch

from tests.helpers import train_tiny
from tunesmith.data.encode import Encoded
from tunesmith.errors import DataError
from tunesmith.evaluation.forgetting import (
    GENERAL_PROMPTS_FILE,
    GENERAL_TEXT_FILE,
    compare_snapshots,
    general_snapshot,
    general_text_dir,
    kl_divergences,
    read_general_prompts,
)


@pytest.fixture(scope="module")
def general():
    d = general_text_dir()
    text = (d / GENERAL_TEXT_FILE).read_text(encoding="utf-8")
    return text, read_general_prompts(d / GENERAL_PROMPTS_FILE)


def snapshot(model, tokenizer, general):
    text, prompts = general
    # a small slice keeps the test fast; the flow measures more
    return general_snapshot(model, tokenizer, text=text, prompts=prompts[:8], window=64,
                            max_tokens=256)


def test_the_bundled_prompts_are_diverse_chat_prompts(general):
    _, prompts = general
    assert len(prompts) >= 20
    assert all(p[-1]["role"] == "user" and len(p[-1]["content"]) > 20 for p in prompts)
    assert len({p[-1]["content"] for p in prompts}) == len(prompts)


def test_bad_prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_general_prompts(path)


def test_kl_of_a_distribution_with_itself_is_zero():
    logp = torch.log_softmax(torch.randn(5, 11), -1)
    assert float(kl_divergences([logp], [logp.clone()])[0].max()) == pytest.approx(0, abs=1e-6)


def test_an_unchanged_model_is_not_flagged(tiny_model, tokenizer, general):
    base = snapshot(tiny_model, tokenizer, general)
    same = snapshot(copy.deepcopy(tiny_model), tokenizer, general)
    result = compare_snapshots(base, same)
    assert result.perplexity_ratio == pytest.approx(1.0)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-5)
    assert not result.flagged and result.warning is None
    assert result.n_prompts == 8 and result.n_text_tokens > 200


def test_a_collapsed_model_is_flagged(tiny_model, tokenizer, general):
    base = snapshot(tiny_model, tokenizer, general)
    # fine-tune a copy to say " the" whatever came before: the classic collapse
    text, _ = general
    ids = tokenizer(text[:4000], add_special_tokens=False)["input_ids"][:256]
    the = tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    rows = [Encoded(ids[i:i + 64], [the] * 64) for i in range(0, 256, 64)]
    collapsed = train_tiny(copy.deepcopy(tiny_model), tokenizer, rows, steps=4, lr=1e-2,
                           batch_size=4)
    result = compare_snapshots(base, snapshot(collapsed, tokenizer, general))
    assert result.flagged
    assert result.perplexity_ratio > 1.2 and result.kl_mean > 0.5
    assert "perplexity on general text rose" in result.warning
    assert "nats" in result.warning
    assert result.to_dict()["flagged"] is True


def test_thresholds_are_configurable(tiny_model, tokenizer, general):
    base = snapshot(tiny_model, tokenizer, general)
    nudged = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in nudged.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tuned = snapshot(nudged, tokenizer, general)
    loose = compare_snapshots(base, tuned, max_perplexity_ratio=1e9, max_kl=1e9)
    assert not loose.flagged and loose.kl_mean > 0
    strict = compare_snapshots(base, tuned, max_perplexity_ratio=1e9, max_kl=loose.kl_mean / 2)
    assert strict.flagged and "perplexity" not in strict.warning
