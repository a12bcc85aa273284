"""The steps of a preference run (``train.objective`` dpo, ipo, simpo or orpo).

Pairs are read, split and cleaned like chat examples (``flows.steps``); here they become the
objective's rows, get the reference model's log-probabilities (computed once, kept in the run
directory so ``--resume`` does not recompute them), and are scored on held-out pairs for the
base and the tuned model with the objective's own metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import REFERENCE_LOSSES, ResolvedHyperparameters, RunConfig
from tunesmith.data.encode import PairEncoded
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.split import Splits
from tunesmith.flows.steps import encode_examples, training_encoder, write_json
from tunesmith.training.loop import evaluate_objective
from tunesmith.training.preference import (
    PreferenceObjective,
    reference_log_probs,
    with_reference,
)

log = logging.getLogger("tunesmith")

REFERENCE_FILE = "reference_logps.json"
def is_preference(cfg: RunConfig) -> bool:
    return cfg.train.objective != "sft"


def preference_objective(cfg: RunConfig, hp: ResolvedHyperparameters, pad_id: int
                         ) -> Callable[[Any, str], PreferenceObjective]:
    p = cfg.train.preference
    if hp.beta is None:
        raise ValueError("a preference objective needs its resolved beta")
    beta = hp.beta
    return lambda model, precision: PreferenceObjective(
        model, loss=cfg.train.objective, beta=beta, pad_id=pad_id, precision=precision,
        sft_weight=p.sft_weight, label_smoothing=p.label_smoothing, simpo_gamma=p.simpo_gamma,
        packing=cfg.train.packing, pack_capacity=cfg.data.max_length)


def _fingerprint(rows: Sequence[PairEncoded]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        for seq in (r.chosen, r.rejected):
            h.update(json.dumps([seq.input_ids, seq.labels]).encode())
    return h.hexdigest()


def with_references(cfg: RunConfig, run_dir: Path, model: Any,
                    named: dict[str, Sequence[PairEncoded]], *, pad_id: int, batch_size: int,
                    write: bool = True) -> dict[str, list[PairEncoded]]:
    """Each split's pairs with the reference log-probabilities attached.

    The reference is ``model`` as it is now, before training (with LoRA adapters, switched
    off). Values found in ``reference_logps.json`` for the same tokens are reused, so a
    resumed run, and the held-out evaluation after training, use the very same numbers.
    Reference-free objectives get the rows back unchanged. ``write=False`` (a process other
    than a distributed run's main one) reads the file but leaves writing it to the main one.
    """
    if cfg.train.objective not in REFERENCE_LOSSES:
        return {k: list(v) for k, v in named.items()}
    path = run_dir / REFERENCE_FILE
    stored: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    out: dict[str, list[PairEncoded]] = {}
    changed = False
    for name, rows in named.items():
        if rows and all(r.reference is not None for r in rows):
            out[name] = list(rows)
            continue
        key = _fingerprint(rows)
        found = stored.get(name)
        if not found or found.get("fingerprint") != key:
            values = reference_log_probs(model, rows, pad_id=pad_id,
                                         batch_size=batch_size)
            stored[name] = found = {"fingerprint": key, "values": values}
            changed = True
        out[name] = with_reference(rows, found["values"])
    if changed and write:
        write_json(path, stored)
    return out


def pair_metrics(objective: Any, rows: Sequence[PairEncoded], *, batch_size: int
                 ) -> dict[str, float]:
    """The objective's loss and metrics on held-out pairs: pair accuracy (chosen reward above
    rejected), rewards and margin, mean per-token log-probs, and likelihood accuracy (the
    model gives the chosen answer the higher mean log-prob: meaningful for the base too)."""
    device = next(objective.parameters()).device
    found = evaluate_objective(objective, rows, batch_size=batch_size, device=device)
    return {"pairs": len(rows), **{k.removeprefix("valid_"): v for k, v in found.items()}}


@dataclass
class HeldOut:
    """The held-out pairs of a preference run, with the base model's scores on them."""

    rows: list[PairEncoded]
    split: str  # where they come from: "test" when the test data holds pairs, else "validation"
    base: dict[str, float | None]


def held_out(cfg: RunConfig, run_dir: Path, model: Any, tokenizer: Any, splits: Splits,
             hp: ResolvedHyperparameters, *, write: bool = True) -> HeldOut:
    """Score the base model (as loaded, before training) on the held-out pairs: the test
    split's pairs when the test data has pairs, else the whole validation split.
    ``write``: as ``with_references``'s."""
    in_test = [e for e in splits.test if isinstance(e, PreferenceExample)]
    split, items = ("test", in_test) if in_test else ("validation", splits.validation)
    rows, too_long = encode_examples(training_encoder(tokenizer, cfg, None), items,
                                     max_length=cfg.data.max_length, split=split)
    if too_long:
        log.info("%d held-out pair(s) are over data.max_length and not scored", len(too_long))
    rows = with_references(cfg, run_dir, model, {f"held-out {split}": rows},
                           pad_id=tokenizer.pad_token_id,
                           batch_size=cfg.eval.batch_size, write=write)[f"held-out {split}"]
    make = preference_objective(cfg, hp, tokenizer.pad_token_id)
    base = pair_metrics(make(model, "fp32"), rows, batch_size=cfg.eval.batch_size)
    if cfg.train.objective in REFERENCE_LOSSES:
        # the base is the reference: its rewards are 0 by definition (what is measured is
        # float noise between batch layouts) and its pair accuracy is undefined
        base.update(reward_chosen=0.0, reward_rejected=0.0, reward_margin=0.0,
                    pair_accuracy=None)
    return HeldOut(rows, split, base)


def preference_results(cfg: RunConfig, hp: ResolvedHyperparameters, held: HeldOut,
                       tuned_model: Any, tokenizer: Any) -> dict[str, Any]:
    """The tuned model on the same held-out pairs, next to the base: the report's section."""
    make = preference_objective(cfg, hp, tokenizer.pad_token_id)
    tuned = pair_metrics(make(tuned_model, "fp32"), held.rows, batch_size=cfg.eval.batch_size)
    return {"objective": cfg.train.objective, "beta": hp.beta,
            "sft_weight": cfg.train.preference.sft_weight, "split": held.split,
            "pairs": len(held.rows), "base": held.base, "tuned": tuned}
