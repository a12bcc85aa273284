import numpy as np
import pytest
import torch

from tunesmith.errors import DataError
from tunesmith.evaluation.scoring import answer_tokens, label_probabilities

SYSTEM = {"role": "system", "content": "Label the review."}


def prompts(n):
    return [[SYSTEM, {"role": "user", "content": "so so " * i + "product"}] for i in range(n)]


def test_answer_is_label_then_end_of_turn(tokenizer):
    context, answer = answer_tokens(tokenizer, prompts(1)[0], "very bad")
    assert tokenizer.decode(answer) == "very bad<|im_end|>"
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(context).endswith("<|im_start|>assistant\n")


def naive_log_prob(model, tokenizer, prompt, label):
    context, answer = answer_tokens(tokenizer, prompt, label)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context + answer])).logits[0].float(), -1)
    return sum(logp[len(context) - 1 + t, a].item() for t, a in enumerate(answer))


def test_matches_one_full_forward_pass_per_label(tiny_model, tokenizer):
    # labels of different token lengths, prompts of different lengths, small batches: the
    # shared-cache path with left padding must give what one plain forward pass gives
    labels = ["good", "very bad indeed", "ok"]
    ps = prompts(5)
    scores = label_probabilities(tiny_model, tokenizer, ps, labels, batch_size=2)
    want = np.array([[naive_log_prob(tiny_model, tokenizer, p, lab) for lab in labels]
                     for p in ps])
    np.testing.assert_allclose(scores.log_probs, want, atol=1e-4)
    assert scores.probs.shape == (5, 3)
    np.testing.assert_allclose(scores.probs.sum(axis=1), 1.0, atol=1e-9)
    assert (scores.probs > 0).all()


def test_lora_wrapped_model_scores_like_the_model(tiny_model, tokenizer):
    from tunesmith.models.load import add_lora

    ps, labels = prompts(3), ["good", "bad"]
    plain = label_probabilities(tiny_model, tokenizer, ps, labels)
    wrapped = add_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    # fresh LoRA adapters start as a no-op (B = 0)
    np.testing.assert_allclose(label_probabilities(wrapped, tokenizer, ps, labels).log_probs,
                               plain.log_probs, atol=1e-5)


def test_prefers_the_trained_label(trained_reviewer, tokenizer):
    model, rows = trained_reviewer
    expected = [r["messages"][-1]["content"] for r in rows]
    scores = label_probabilities(model, tokenizer, [r["messages"][:-1] for r in rows],
                                 ["good", "bad"])
    p_right = scores.probs[np.arange(len(rows)), [["good", "bad"].index(e) for e in expected]]
    assert p_right.mean() > 0.9
    assert scores.predicted == expected
    np.testing.assert_allclose(scores.probs.sum(axis=1), 1.0, atol=1e-9)


def test_nothing_to_score(tiny_model, tokenizer):
    with pytest.raises(DataError, match="no labels"):
        label_probabilities(tiny_model, tokenizer, prompts(1), [])
    with pytest.raises(DataError, match="empty"):
        label_probabilities(tiny_model, tokenizer, [], ["good"])
