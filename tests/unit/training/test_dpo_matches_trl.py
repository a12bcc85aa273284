"""tunesmith's DPO and IPO losses against TRL's ``DPOTrainer`` on the same batch.

One LoRA model serves both: TRL wraps the tiny Llama with its adapters, their B matrices get
random values (so the policy differs from the reference and the loss is not log 2), then TRL's
``compute_loss`` and tunesmith's ``PreferenceObjective`` score the same four pairs. The
reference is the model with its adapters off in both (TRL: during the loss; tunesmith: once,
beforehand, by ``reference_log_probs``). TRL tokenizes the chat itself; the test checks that its
prompt and answer tokens are exactly tunesmith's ``encode_pair`` sequences and targets.
"""

from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from tunesmith.data.encode import IGNORE_INDEX, encode_pair  # noqa: E402
from tunesmith.models.load import load  # noqa: E402
from tunesmith.training.preference import (  # noqa: E402
    PreferenceObjective,
    reference_log_probs,
    with_reference,
)

SYSTEM = "Classify the SMS as spam or ham. Answer with one word."
MESSAGES = [
    ("WINNER!! Claim your free prize now, text WIN to 80086", "spam"),
    ("Are we still on for lunch tomorrow?", "ham"),
    ("URGENT: your account is suspended, call 0800 123 456", "spam"),
    ("ok see you at 7", "ham"),
]
BETA = 0.1


def _rows() -> list[dict]:
    rows = []
    for i, (sms, label) in enumerate(MESSAGES):
        wrong = "ham" if label == "spam" else "spam"
        # rejected answers of different lengths, so padding and packing really differ
        rejected = wrong if i % 2 else f"I would say this message is {wrong}, most likely."
        rows.append({"prompt": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": sms}],
                     "chosen": [{"role": "assistant", "content": label}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def _trainer(model_dir, tmp_path, loss_type: str) -> DPOTrainer:
    model, tok = load(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=[loss_type],
                     per_device_train_batch_size=len(MESSAGES), max_length=None,
                     report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                     bf16=False, gradient_checkpointing=False)  # TRL's defaults: both on
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows()),
                         processing_class=tok, peft_config=lora)
    # a policy away from the reference: random adapters (B starts at zero)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return trainer


@pytest.mark.parametrize(("ours", "theirs"), [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_loss_and_rewards_match_trl(tiny_model_dir, tmp_path, ours, theirs):
    trainer = _trainer(tiny_model_dir, tmp_path, theirs)
    model, tok = trainer.model, trainer.processing_class
    rows = _rows()
    pairs = [encode_pair(tok, r["prompt"], r["chosen"], r["rejected"]) for r in rows]

    # the same tokens: TRL's prompt + answer ids are our sequences, its answers our targets
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    for ex, pair in zip(examples, pairs, strict=True):
        for answer, enc in ((ex["chosen_ids"], pair.chosen), (ex["rejected_ids"], pair.rejected)):
            assert ex["prompt_ids"] + answer == enc.input_ids
            assert enc.labels == [IGNORE_INDEX] * len(ex["prompt_ids"]) + answer
    batch = trainer.data_collator(examples)

    model.train()  # as in training; no dropout anywhere (LoRA dropout 0, TRL disables the rest)
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(model, batch))
        trl_ref = trainer.compute_ref_log_probs(model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    reference = reference_log_probs(model, pairs, pad_id=tok.pad_token_id)
    # tunesmith's reference (adapters off, computed up front) is TRL's
    assert [a for a, _ in reference] == pytest.approx(trl_ref[0].tolist(), abs=1e-4)
    assert [b for _, b in reference] == pytest.approx(trl_ref[1].tolist(), abs=1e-4)

    objective = PreferenceObjective(model, loss=ours, beta=BETA, pad_id=tok.pad_token_id,
                                    packing=True, pack_capacity=256)
    passes = objective.collate(with_reference(pairs, reference))  # packed: not TRL's rows
    with torch.no_grad():
        outs = [objective(**inputs) for inputs in passes]
    out = SimpleNamespace(loss_sum=sum(o.loss_sum for o in outs),
                          metrics={k: sum(o.metrics[k] for o in outs) for k in outs[0].metrics})
    n = len(pairs)
    loss = out.loss_sum.item() / n
    assert loss == pytest.approx(trl_loss, abs=1e-4)
    # the policy really moved away from the reference: the rewards are not all 0
    assert abs(out.metrics["reward_margin"]) / n > 1e-2
    if ours == "dpo":  # IPO's rewards are per-token averages here, TRL's sums: not comparable
        assert out.metrics["reward_chosen"] / n == pytest.approx(metrics["rewards/chosen"],
                                                                 abs=1e-4)
        assert out.metrics["reward_rejected"] / n == pytest.approx(metrics["rewards/rejected"],
                                                                   abs=1e-4)
        assert out.metrics["reward_margin"] / n == pytest.approx(metrics["rewards/margins"],
                                                                 abs=1e-4)
        assert out.metrics["pair_accuracy"] / n == pytest.approx(metrics["rewards/accuracies"])

