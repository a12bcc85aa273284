"""A classification head trained on its input scaled by public prompts' feature RMS."""

import copy

import pytest
import torch
from opacus import GradSampleModule

from tunesmith.data.encode import encode_prompt
from tunesmith.errors import TrainingError
from tunesmith.models.classifier import class_logits, load_classifier
from tunesmith.models.load import add_lora
from tunesmith.training.head_scale import (
    ScaledHeadInput,
    public_feature_rms,
    trainable_head,
)

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("What is the capital of France?", "Write a haiku about rain.", "Add 2 and 3.")]


@pytest.fixture
def classifier(tiny_model_dir, tokenizer):
    model = load_classifier(tiny_model_dir, ["good", "bad"], pad_token_id=tokenizer.pad_token_id,
                            seed=3)
    return add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                    task_type="SEQ_CLS")


def _pooled(model, ids):
    clf = model.get_base_model()
    with torch.no_grad():
        return clf.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]


def test_the_scale_is_the_rms_of_the_head_input_over_the_prompts(classifier, tokenizer):
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    classifier.train()
    scale = public_feature_rms(classifier, ids)
    assert classifier.training  # left as it was
    pooled = torch.stack([_pooled(classifier, i) for i in ids])
    torch.testing.assert_close(scale, pooled.pow(2).mean(0).sqrt())
    assert scale.shape == (64,) and (scale > 0).all()
    with pytest.raises(TrainingError, match="at least one public prompt"):
        public_feature_rms(classifier, [])


def test_the_head_reads_scaled_input_and_folding_keeps_its_outputs(classifier, tokenizer):
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[0])])
    classifier.eval()
    head = trainable_head(classifier)
    w = head.weight.detach().clone()
    scale = torch.linspace(0.5, 4.0, 64)
    scaled = ScaledHeadInput(classifier, scale)
    x = _pooled(classifier, ids[0].tolist())
    logits = class_logits(classifier, ids, None)
    torch.testing.assert_close(logits[0], (x / scale) @ w.T)
    scaled.fold()
    assert not head._forward_pre_hooks
    torch.testing.assert_close(head.weight.detach(), w / scale)
    torch.testing.assert_close(class_logits(classifier, ids, None), logits)
    scaled.fold()  # a second fold changes nothing
    torch.testing.assert_close(class_logits(classifier, ids, None), logits)


def test_opacus_per_example_gradients_are_taken_in_the_scaled_parametrisation(
        classifier, tokenizer):
    classifier.eval()
    scale = torch.linspace(0.5, 4.0, 64)
    ScaledHeadInput(classifier, scale)
    rows = [torch.tensor([encode_prompt(tokenizer, p)]) for p in PROMPTS[:2]]
    labels = torch.tensor([0, 1])
    head = trainable_head(classifier)
    # one example at a time, plain autograd, with the scaling hook in place
    expected = []
    for ids, y in zip(rows, labels, strict=True):
        classifier.zero_grad()
        loss = torch.nn.functional.cross_entropy(class_logits(classifier, ids, None), y[None],
                                                 reduction="sum")
        loss.backward()
        expected.append(head.weight.grad.detach().clone())
    classifier.zero_grad()
    gsm = GradSampleModule(copy.deepcopy(classifier), batch_first=True, loss_reduction="sum")
    gsm.train()  # Opacus records activations in training mode only (no dropout here)
    twin_head = trainable_head(gsm._module)
    width = max(r.shape[1] for r in rows)
    padded = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, :r.shape[1]], mask[i, :r.shape[1]] = r[0], 1
    loss = torch.nn.functional.cross_entropy(class_logits(gsm._module, padded, mask), labels,
                                             reduction="sum")
    loss.backward()
    torch.testing.assert_close(twin_head.weight.grad_sample, torch.stack(expected),
                               rtol=1e-4, atol=1e-5)
    gsm.remove_hooks()
