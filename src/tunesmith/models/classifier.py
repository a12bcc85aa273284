"""Sequence classification: a new head on a base model, and its logits."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ModelError
from tunesmith.models.generation import pad_batch
from tunesmith.models.load import DTYPES, LOCAL_CODE, unwrap
from tunesmith.models.packed_attention import packed_kwargs
from tunesmith.models.prefix_pass import PrefixCache, mask_kind, tree_pass


def load_classifier(path: Path, labels: list[str], *, pad_token_id: int,
                    dtype: str = "float32", seed: int | None = None) -> Any:
    """The base model with a new sequence-classification head for ``labels``.

    With ``seed`` the new head's initial weights come from that seed alone, not from whatever
    drew from torch's global generator earlier in the process; the global generator's state
    is left as it was.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    try:
        # "score.weight MISSING ... newly initialized": the new head is the point here
        hf_logging.set_verbosity_error()
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            if seed is not None:
                torch.manual_seed(seed)
            return AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={lab: i for i, lab in enumerate(labels)}, pad_token_id=pad_token_id,
                dtype=DTYPES[dtype], **LOCAL_CODE)
    except Exception as err:
        raise ModelError(f"{path}: cannot put a classification head on this model ({err})") \
            from err
    finally:
        hf_logging.set_verbosity(level)


def load_trained_classifier(path: Path) -> Any:
    """A saved *ForSequenceClassification model (the merged model of a classifier run)."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **LOCAL_CODE)
    except Exception as err:
        raise ModelError(f"{path}: cannot load the classifier ({err})") from err


def _head(clf: Any, pooled: torch.Tensor) -> torch.Tensor:
    # the head may be fp32 (trained) on top of bf16 frozen layers
    head_dtype = next(clf.score.parameters()).dtype
    return clf.score(pooled.to(head_dtype)).float()


def class_logits_at(model: Any, input_ids: torch.Tensor, marks: torch.Tensor, *,
                    attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, classes] at the ``n`` positions where ``marks`` is true, in row order.

    Training marks each sequence's last prompt token (where its class label sits), so one
    function pools padded rows and packed rows alike: in a packed row (``position_ids``
    restarting per sequence, no mask) every sequence is pooled at its own last token, never
    at its neighbour's.
    """
    clf = unwrap(model)
    hidden = clf.base_model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False,
                            **packed_kwargs(clf, attention_mask, position_ids)).last_hidden_state
    return _head(clf, hidden[marks])


def class_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> torch.Tensor:
    """Logits [batch, classes] of a *ForSequenceClassification model at each last real token."""
    clf = unwrap(model)
    hidden = clf.base_model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).last_hidden_state
    if attention_mask is None:
        last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    else:
        # rightmost attended position: works for left and right padding alike
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * attention_mask).argmax(-1)
    return _head(clf, hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last])


def prompt_class_logits(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int,
                        prefixes: PrefixCache) -> torch.Tensor:
    """Logits [n, classes] at each prompt's last token (token ids), in one pass after the
    prefix the set's prompts share (``models.prefix_pass``); right-padded whole prompts where
    the model's attention cannot take the pass's mask."""
    clf = unwrap(model)
    device = next(clf.parameters()).device
    kind = mask_kind(clf.config, max(len(p) for p in prompts))
    if kind is None:
        batch = pad_batch(prompts, pad_id=pad_id, side="right")
        return class_logits(model, batch.input_ids.to(device), batch.attention_mask.to(device))
    hidden, laid = tree_pass(clf.base_model, prompts, [[] for _ in prompts], pad_id=pad_id,
                             device=device, kind=kind, prefixes=prefixes)
    rows = torch.arange(len(prompts), device=device)
    return _head(clf, hidden[rows, laid.last.to(device)])
