"""Privacy audit: how much a fine-tuned causal LM gives away about its training examples.

Two measures, meant to be taken on a differentially private run and on its non-DP twin:

- **Canary exposure** (Carlini et al., "The Secret Sharer", USENIX Security 2019). An audit run
  adds a few *canaries* to its training data, each a chat whose answer holds a random secret of
  space-separated digits (``canary_training_rows``). After training, each canary's secret is
  ranked by log-perplexity among ``m`` random candidate secrets put in the same sentence; its
  exposure ``log2(m + 1) - log2(rank)`` is at most ``log2(m + 1)`` bits (the secret is the most
  likely of all), and about ``log2(e)`` ≈ 1.44 bits for a secret the model did not learn
  (``chance_exposure``).
- **Loss-based membership inference** (Yeom et al., CSF 2018): the ROC AUC of telling training
  examples from held-out ones by their loss alone (lower loss: guessed a member). 0.5 is chance.

Scores are natural-log negative log-likelihoods of the assistant tokens, computed with the
training loss's own machinery (``encode_chat`` and ``sequence_log_probs``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from tunesmith.data.encode import encode_chats
from tunesmith.errors import DataError
from tunesmith.training.batches import collate
from tunesmith.training.loss import sequence_log_probs

QUESTION_TEMPLATE = "What is {name}'s account code?"
ANSWER_TEMPLATE = "{name}'s account code is {secret}."
CANARY_NAMES = ("Alice Moreau", "Bilal Haddad", "Chiara Rossi", "Dmitri Volkov", "Elena Santos",
                "Farid Nasser", "Greta Lindqvist", "Hiroshi Tanaka")


@dataclass(frozen=True)
class Canary:
    """A chat example whose answer holds ``secret``; its messages are built from the templates."""

    name: str
    secret: str

    @property
    def messages(self) -> list[dict]:
        return self.with_secret(self.secret)

    def with_secret(self, secret: str) -> list[dict]:
        """This canary's conversation with another secret in its place."""
        return [{"role": "user", "content": QUESTION_TEMPLATE.format(name=self.name)},
                {"role": "assistant",
                 "content": ANSWER_TEMPLATE.format(name=self.name, secret=secret)}]


def canary_name(index: int) -> str:
    """The name of the canary at ``index``: the fixed names, then numbered repeats of them."""
    base = CANARY_NAMES[index % len(CANARY_NAMES)]
    lap = index // len(CANARY_NAMES)
    return base if lap == 0 else f"{base} {lap + 1}"


def _random_secrets(rng: random.Random, n: int, digits: int, exclude: set[str]) -> list[str]:
    if digits < 1:
        raise DataError(f"a secret needs at least one digit (got digits={digits})")
    space = 10 ** digits
    excluded = {s for s in exclude if len(s.split()) == digits}
    if n > space - len(excluded):
        raise DataError(f"cannot draw {n} distinct {digits}-digit secrets ({space} exist, "
                        f"{len(excluded)} excluded); use more digits or fewer secrets")
    # sampling integers without replacement: distinct, and never materialises the whole space
    drawn = (" ".join(f"{x:0{digits}d}") for x in rng.sample(range(space), n + len(excluded)))
    return [s for s in drawn if s not in excluded][:n]


def make_canaries(k: int, *, digits: int = 8, seed: int) -> list[Canary]:
    """``k`` canaries with distinct random secrets of ``digits`` space-separated digits."""
    secrets = _random_secrets(random.Random(seed), k, digits, set())
    return [Canary(canary_name(i), s) for i, s in enumerate(secrets)]


def canary_training_rows(canaries: Sequence[Canary], repeats: int) -> list[dict]:
    """Each canary's ``{"messages": [...]}`` row ``repeats`` times, to add to training data."""
    return [{"messages": c.messages} for c in canaries for _ in range(repeats)]


def candidate_secrets(n: int, *, digits: int, seed: int, exclude: set[str]) -> list[str]:
    """``n`` distinct random secrets in the canaries' format, none of them in ``exclude``."""
    return _random_secrets(random.Random(seed), n, digits, set(exclude))


def exposure_rank(canary_score: float, candidate_scores: Sequence[float]) -> float:
    """1 + the candidates scoring strictly lower (more likely) than the canary; ties count half."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    return 1 + float((scores < canary_score).sum()) + 0.5 * float((scores == canary_score).sum())


def exposure(canary_score: float, candidate_scores: Sequence[float]) -> float:
    """Exposure in bits, estimated by sampling (Carlini et al. §4.2): log2(m + 1) - log2(rank).

    Scores are log-perplexities (lower: more likely); ``m`` is the number of candidates. The
    ceiling is log2(m + 1) bits (the canary beats every candidate). A canary that scores like
    a random candidate has a rank uniform on 1..m+1 and an expected exposure of about
    log2(e) = 1/ln 2 ≈ 1.44 bits (exactly ``chance_exposure(m)``).
    """
    if len(candidate_scores) == 0:
        raise DataError("exposure needs at least one candidate score")
    m = len(candidate_scores)
    return math.log2(m + 1) - math.log2(exposure_rank(canary_score, candidate_scores))


def chance_exposure(m: int) -> float:
    """Expected exposure of a canary indistinguishable from ``m`` candidates, in bits.

    The mean of log2(m + 1) - log2(r) over r = 1..m+1, i.e. log2(m + 1) - log2((m + 1)!)/(m + 1),
    which tends to log2(e) ≈ 1.44 bits as m grows.
    """
    if m < 1:
        raise DataError(f"chance exposure needs at least one candidate (got m={m})")
    return math.log2(m + 1) - math.lgamma(m + 2) / ((m + 1) * math.log(2))


@torch.no_grad()
def answer_log_probs(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
                     batch_size: int = 64) -> tuple[list[float], list[int]]:
    """Per conversation, the summed natural-log probability of its assistant tokens, and how
    many there are. Batches are right-padded and grouped by length; the order is kept."""
    if not conversations:
        raise DataError("no conversations to score")
    encoded = encode_chats(tokenizer, conversations)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = [0.0] * len(encoded)
    counts = [0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([encoded[i] for i in rows], pad_id=tokenizer.pad_token_id)
        labels = batch["labels"].to(device)
        sequence = torch.arange(len(rows), device=device)[:, None].expand_as(labels)
        lp, n = sequence_log_probs(model, batch["input_ids"].to(device), labels, sequence,
                                   len(rows), attention_mask=batch["attention_mask"].to(device))
        for row, value, count in zip(rows, lp.tolist(), n.tolist(), strict=True):
            sums[row], counts[row] = value, int(count)
    model.train(was_training)
    return sums, counts


def secret_log_perplexities(model: Any, tokenizer: Any, canary: Canary, secrets: Sequence[str],
                            *, batch_size: int = 64) -> list[float]:
    """Log-perplexity (summed NLL in nats of the answer's tokens) of each secret in ``canary``.

    Each secret replaces the canary's own in its conversation. The answer's words before the
    secret are the same for every secret, so they shift all scores alike and leave ranks as
    they are.
    """
    if not secrets:
        raise DataError("no secrets to score")
    sums, _ = answer_log_probs(model, tokenizer, [canary.with_secret(s) for s in secrets],
                               batch_size=batch_size)
    return [-s for s in sums]


def canary_exposures(model: Any, tokenizer: Any, canaries: Sequence[Canary], *,
                     n_candidates: int = 2000, seed: int, batch_size: int = 64) -> list[dict]:
    """Each canary's exposure among ``n_candidates`` random secrets in its own sentence.

    The candidates are drawn once per secret length from ``seed``, excluding every canary's
    secret, and shared by the canaries of that length.
    """
    if not canaries:
        raise DataError("no canaries to measure exposure on")
    exclude = {c.secret for c in canaries}
    pools: dict[int, list[str]] = {}
    results = []
    for canary in canaries:
        digits = len(canary.secret.split())
        if digits not in pools:
            pools[digits] = candidate_secrets(n_candidates, digits=digits, seed=seed,
                                              exclude=exclude)
        scores = secret_log_perplexities(model, tokenizer, canary, [canary.secret, *pools[digits]],
                                         batch_size=batch_size)
        own, others = scores[0], scores[1:]
        results.append({"name": canary.name, "exposure": exposure(own, others),
                        "rank": exposure_rank(own, others), "n_candidates": len(others),
                        "log_perplexity": own, "chance": chance_exposure(len(others)),
                        "ceiling": math.log2(len(others) + 1)})
    return results


def summarize_exposures(results: Sequence[dict]) -> dict:
    """Mean and max exposure of ``canary_exposures`` results, with chance and the ceiling."""
    if not results:
        raise DataError("no canary exposures to summarise")
    values = [r["exposure"] for r in results]
    return {"mean_exposure": float(np.mean(values)), "max_exposure": float(max(values)),
            "chance_exposure": float(np.mean([r["chance"] for r in results])),
            "ceiling": float(max(r["ceiling"] for r in results)), "n_canaries": len(results)}


def membership_auc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """ROC AUC of guessing membership from the loss (score ``-loss``); 0.5 is chance."""
    if len(member_losses) == 0 or len(nonmember_losses) == 0:
        raise DataError(f"membership inference needs members and non-members (got "
                        f"{len(member_losses)} and {len(nonmember_losses)})")
    labels = [1] * len(member_losses) + [0] * len(nonmember_losses)
    scores = -np.concatenate([np.asarray(member_losses, dtype=np.float64),
                              np.asarray(nonmember_losses, dtype=np.float64)])
    return float(roc_auc_score(labels, scores))


def membership_auc_interval(member_losses: Sequence[float], nonmember_losses: Sequence[float],
                            *, level: float = 0.95, n_resamples: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``membership_auc``: members and non-members are
    resampled separately (each set keeps its size), so the interval shows how much the AUC of a
    few hundred examples moves by which examples were drawn."""
    members = np.asarray(member_losses, dtype=np.float64)
    nonmembers = np.asarray(nonmember_losses, dtype=np.float64)
    membership_auc(members, nonmembers)  # the same checks
    rng = np.random.default_rng(seed)
    draws = [membership_auc(rng.choice(members, members.size),
                            rng.choice(nonmembers, nonmembers.size))
             for _ in range(n_resamples)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def example_losses(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
                   batch_size: int = 16) -> list[float]:
    """Each conversation's mean natural-log loss per assistant token."""
    sums, counts = answer_log_probs(model, tokenizer, conversations, batch_size=batch_size)
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{len(empty)} conversation(s) have no assistant tokens to score "
                        f"(first at index {empty[0]}); give each an assistant answer")
    return [-s / n for s, n in zip(sums, counts, strict=True)]


@dataclass
class AuditResult:
    """Canary exposure (bits) and loss-based membership inference AUC of one model."""

    mean_exposure: float
    max_exposure: float
    chance_exposure: float
    exposure_ceiling: float
    n_candidates: int
    canaries: list[dict]
    membership_auc: float
    membership_auc_ci: list[float]  # 95% bootstrap interval (membership_auc_interval)
    n_members: int
    n_nonmembers: int

    def to_dict(self) -> dict:
        return asdict(self)


def audit_model(model: Any, tokenizer: Any, *, canaries: Sequence[Canary],
                members: Sequence[Sequence[dict]], nonmembers: Sequence[Sequence[dict]],
                n_candidates: int = 2000, seed: int, batch_size: int = 64) -> AuditResult:
    """Canary exposures of ``canaries`` and the membership AUC of ``members`` (training
    conversations) against ``nonmembers`` (held-out ones) for one model."""
    if not members or not nonmembers:
        raise DataError(f"membership inference needs members and non-members (got "
                        f"{len(members)} and {len(nonmembers)})")
    per_canary = canary_exposures(model, tokenizer, canaries, n_candidates=n_candidates,
                                  seed=seed, batch_size=batch_size)
    summary = summarize_exposures(per_canary)
    member_losses = example_losses(model, tokenizer, members, batch_size=batch_size)
    nonmember_losses = example_losses(model, tokenizer, nonmembers, batch_size=batch_size)
    return AuditResult(
        mean_exposure=summary["mean_exposure"], max_exposure=summary["max_exposure"],
        chance_exposure=summary["chance_exposure"], exposure_ceiling=summary["ceiling"],
        n_candidates=n_candidates, canaries=per_canary,
        membership_auc=membership_auc(member_losses, nonmember_losses),
        membership_auc_ci=list(membership_auc_interval(member_losses, nonmember_losses,
                                                       seed=seed)),
        n_members=len(members), n_nonmembers=len(nonmembers))
