import numpy as np
import pytest
import torch

from tests.helpers import decoder_passes
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


def scored_with_widths(model, tokenizer, ps, labels, batch_size):
    """The label scores, and the [rows, columns] of every pass the decoder ran for them."""
    with decoder_passes(model.model) as widths:
        scores = label_probabilities(model, tokenizer, ps, labels, batch_size=batch_size)
    return scores, widths


def test_a_batch_is_one_pass_after_its_shared_prefix(tiny_model, tokenizer):
    # the system prompt and chat header every context starts with run once (a pass of their
    # length alone), then the whole batch in one pass holding only the rest of each context
    # and every label's tokens: nothing runs twice, and the scores are those of whole passes
    from tunesmith.models.prefix_pass import shared_prefix

    # contexts of one length (no padding: one batch) that differ after the system prompt
    ps = [[SYSTEM, {"role": "user", "content": text}]
          for text in ("so so product", "so ok product", "ok so product", "ok ok product")]
    labels = ["good", "very bad indeed"]
    contexts = [answer_tokens(tokenizer, p, labels[0])[0] for p in ps]
    assert len({len(c) for c in contexts}) == 1
    shared = shared_prefix(contexts)
    assert 0 < shared < len(contexts[0])
    scores, widths = scored_with_widths(tiny_model, tokenizer, ps, labels, batch_size=4)
    tails = sum(len(answer_tokens(tokenizer, ps[0], lab)[1]) - 1 for lab in labels)
    assert widths == [(1, shared), (4, max(len(c) for c in contexts) - shared + tails)]
    want = [[naive_log_prob(tiny_model, tokenizer, p, lab) for lab in labels] for p in ps]
    np.testing.assert_allclose(scores.log_probs, want, atol=1e-4)


def test_contexts_with_different_system_prompts_and_one_alone(tiny_model, tokenizer):
    ps = [*prompts(3), [{"role": "system", "content": "Another task."},
                        {"role": "user", "content": "fine"}], [{"role": "user", "content": "x"}]]
    ps.append(ps[1])  # a repeated prompt: scored once, its scores given to both
    labels = ["good", "bad"]
    want = [[naive_log_prob(tiny_model, tokenizer, p, lab) for lab in labels] for p in ps]
    for batch_size in (1, 2, 6):
        got = label_probabilities(tiny_model, tokenizer, ps, labels, batch_size=batch_size)
        np.testing.assert_allclose(got.log_probs, want, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma3", "phi3", "gpt_neox",
                                    "llama-eager"])
def test_every_family_scores_like_whole_passes(family, tiny_family_dir, tiny_model_dir,
                                               tokenizer):
    # gemma3's tiny model has a 16-token sliding window, shorter than these sequences: it
    # scores each sequence whole; the others, and eager attention, take the tree
    from transformers import AutoModelForCausalLM

    from tunesmith.models.load import load

    if family == "llama-eager":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
        tok = tokenizer
    else:
        model, tok = load(tiny_family_dir(family))
    model.eval()
    users = [{"role": "user", "content": "so so " * i + "product"} for i in range(4)]
    ps = [[u] for u in users] if family == "gemma3" else [[SYSTEM, u] for u in users]
    labels = ["good", "very bad indeed"]
    got = label_probabilities(model, tok, ps, labels, batch_size=3)
    want = [[naive_log_prob(model, tok, p, lab) for lab in labels] for p in ps]
    np.testing.assert_allclose(got.log_probs, want, atol=1e-4)


def test_a_longer_prefix_of_a_batch_goes_on_from_the_sets(tiny_model, tokenizer):
    # every context shares the system prompt; the second batch's also share "so so": that
    # batch's prefix pass runs only those tokens, after the set's prefix cache
    ps = [[SYSTEM, {"role": "user", "content": text}]
          for text in ("ok ok ok ok ok ok ok ok good", "ok ok ok ok ok ok ok ok bad",
                       "so so yes", "so so no")]
    labels = ["good", "bad"]
    contexts = [answer_tokens(tokenizer, p, labels[0])[0] for p in ps]
    scores, widths = scored_with_widths(tiny_model, tokenizer, ps, labels, batch_size=2)
    from tunesmith.models.prefix_pass import shared_prefix

    whole, first, second = (shared_prefix(c) for c in (contexts, contexts[:2], contexts[2:]))
    assert whole < first and whole < second
    prefix_passes = [w for w in widths if w[0] == 1]
    assert prefix_passes == [(1, whole), (1, first - whole), (1, second - whole)]
    want = [[naive_log_prob(tiny_model, tokenizer, p, lab) for lab in labels] for p in ps]
    np.testing.assert_allclose(scores.log_probs, want, atol=1e-4)
