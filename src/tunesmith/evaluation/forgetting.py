"""Forgetting: what the fine-tune cost the model's general language ability.

Two measures, each taken on the base model before fine-tuning and on the tuned model after:

- perplexity on a general English text (by default the opening of *Pride and Prejudice* in
  ``tunesmith/resources/general_text``), in fixed windows (``lm.lm_loss``);
- the mean KL divergence KL(base || tuned) of the next-token distributions at every position of
  a fixed set of general chat prompts (``general_prompts.jsonl``), rendered with the chat
  template and its generation prompt. ``kl_reply_start`` is the KL at the last position alone,
  where the answer's first token is chosen: it shows whether the model now answers everything
  the way it was tuned to (a classifier that says "spam" to a recipe request).

A snapshot of the base is taken before training (``general_snapshot``) and compared with one
of the tuned model (``compare_snapshots``), so the base weights need not stay in memory. The
warning thresholds are heuristics: a perplexity rise over 1.2x or a mean KL over 0.5 nats is
much more than a LoRA fine-tune on a narrow task usually costs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.encode import encode_prompt
from tunesmith.errors import DataError
from tunesmith.evaluation.lm import LMResult, lm_loss
from tunesmith.models.generation import pad_batch

GENERAL_TEXT_FILE = "pride_and_prejudice_opening.txt"
GENERAL_PROMPTS_FILE = "general_prompts.jsonl"


def general_text_dir() -> Path:
    """The general text and prompts shipped with tunesmith (package data)."""
    path = Path(__file__).resolve().parents[1] / "resources" / "general_text"
    if not path.is_dir():
        raise DataError(f"{path}: the bundled general text is missing; reinstall tunesmith or "
                        "pass the general text and prompt files explicitly")
    return path


def read_general_prompts(path: Path) -> list[list[dict]]:
    """The conversations of a JSONL file with one ``{"messages": [...]}`` per line."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f'expected {{"messages": [...]}} ({err})', path=path,
                            line=number) from err
        prompts.append(messages)
    if not prompts:
        raise DataError("no prompts in the file; add one conversation per line", path=path)
    return prompts


@torch.no_grad()
def next_token_log_probs(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict]], *,
                         batch_size: int = 8) -> list[torch.Tensor]:
    """Per prompt, [positions, vocab] next-token log-probabilities (float32, on the CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    out: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = pad_batch(chunk, pad_id=tokenizer.pad_token_id, side="right")
        logits = model(input_ids=batch.input_ids.to(device),
                       attention_mask=batch.attention_mask.to(device)).logits
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        out += [logp[row, :len(e)] for row, e in enumerate(chunk)]
    model.train(was_training)
    return out


def kl_divergences(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]
                   ) -> list[torch.Tensor]:
    """Per prompt, KL(reference || other) at each position, in nats."""
    if len(reference) != len(other):
        raise DataError(f"{len(reference)} reference prompts but {len(other)} to compare; take "
                        "both snapshots on the same prompts")
    kls = []
    for ref, oth in zip(reference, other, strict=True):
        if ref.shape != oth.shape:
            raise DataError(f"next-token distributions of shape {tuple(ref.shape)} and "
                            f"{tuple(oth.shape)}: the models use different tokenizers")
        kls.append((ref.exp() * (ref - oth)).sum(-1).clamp(min=0))
    return kls


@dataclass
class GeneralSnapshot:
    """One model's general-ability measurements, to compare before and after fine-tuning."""

    lm: LMResult
    prompt_log_probs: list[torch.Tensor]


def general_snapshot(model: Any, tokenizer: Any, *, text: str, prompts: Sequence[Sequence[dict]],
                     window: int = 512, max_tokens: int | None = 4096, batch_size: int = 8
                     ) -> GeneralSnapshot:
    """Perplexity on ``text`` (its first ``max_tokens`` tokens) and next-token log-probs."""
    return GeneralSnapshot(
        lm=lm_loss(model, tokenizer, [text], window=window, max_tokens=max_tokens,
                   batch_size=batch_size),
        prompt_log_probs=next_token_log_probs(model, tokenizer, prompts, batch_size=batch_size))


@dataclass(frozen=True)
class ForgettingResult:
    """Base vs tuned general ability; ``warning`` says what crossed a threshold, else None."""

    base_perplexity: float
    tuned_perplexity: float
    perplexity_ratio: float
    kl_mean: float
    kl_reply_start: float
    n_text_tokens: int
    n_prompts: int
    max_perplexity_ratio: float
    max_kl: float
    warning: str | None

    @property
    def flagged(self) -> bool:
        return self.warning is not None

    def to_dict(self) -> dict:
        return {**asdict(self), "flagged": self.flagged}


def compare_snapshots(base: GeneralSnapshot, tuned: GeneralSnapshot, *,
                      max_perplexity_ratio: float = 1.2, max_kl: float = 0.5
                      ) -> ForgettingResult:
    """Perplexity ratio tuned/base and mean KL(base || tuned), flagged past the thresholds."""
    kls = kl_divergences(base.prompt_log_probs, tuned.prompt_log_probs)
    kl_mean = float(torch.cat(kls).mean())
    kl_reply = float(torch.stack([k[-1] for k in kls]).mean())
    ratio = tuned.lm.perplexity / base.lm.perplexity
    problems = []
    if ratio > max_perplexity_ratio:
        problems.append(f"perplexity on general text rose {ratio:.2f}x "
                        f"({base.lm.perplexity:.4g} -> {tuned.lm.perplexity:.4g}; threshold "
                        f"{max_perplexity_ratio}x)")
    if kl_mean > max_kl:
        problems.append(f"next-token distributions on general prompts moved {kl_mean:.3f} nats "
                        f"from the base model (threshold {max_kl})")
    warning = None
    if problems:
        warning = ("the fine-tune may have damaged general ability: " + "; ".join(problems)
                   + ". Try a lower learning rate, fewer epochs, a smaller LoRA rank, or mix "
                   "general data into the training set")
    return ForgettingResult(
        base_perplexity=base.lm.perplexity, tuned_perplexity=tuned.lm.perplexity,
        perplexity_ratio=ratio, kl_mean=kl_mean, kl_reply_start=kl_reply,
        n_text_tokens=tuned.lm.n_tokens, n_prompts=len(kls),
        max_perplexity_ratio=max_perplexity_ratio, max_kl=max_kl, warning=warning)
