"""``chat``: a model's reply to a conversation; loading a run or a checkpoint for chatting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.errors import ModelError
from tunesmith.flows.steps import base_dtype, prepare_model_for_training, run_config
from tunesmith.models.load import load
from tunesmith.models.resolve import default_home, resolve_model


def load_for_chat(model: str, *, home: Path | None = None) -> tuple[Any, Any]:
    """Model and tokenizer for chatting: a model reference or a finished run directory."""
    path = resolve_model(model, home=home or default_home())
    config = json.loads((path / "config.json").read_text())
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise ModelError(f"{path}: this model has a classification head; it labels text and "
                         "cannot chat. Chat with a run trained with train.head: lm")
    return load(path)


def load_checkpoint_for_chat(run_dir: Path, step: int, *, home: Path | None = None
                             ) -> tuple[Any, Any]:
    """Model and tokenizer of checkpoint ``step-N`` of a run: the base model plus its adapter."""
    from tunesmith.models.adapters import load_trainable_state
    from tunesmith.training.checkpoint import load_weights

    cfg = run_config(Path(run_dir))
    if cfg is None:
        raise ModelError(f"{run_dir}: not a tunesmith run directory (no config.yaml)")
    model, tokenizer = load(resolve_model(cfg.model.base, home=home or default_home()),
                            dtype=base_dtype(cfg))
    model = prepare_model_for_training(model, cfg)
    load_trainable_state(model, load_weights(Path(run_dir) / "checkpoints" / f"step-{step}"))
    model.eval()
    return model, tokenizer


def chat(model: str, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 256,
         temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
         stop: Sequence[str] = (), json_schema: dict[str, Any] | None = None,
         home: Path | None = None, loaded: tuple[Any, Any] | None = None) -> str:
    """The model's reply to a conversation (``[{"role": "user", "content": ...}]``).

    Greedy when ``temperature`` is 0; the same generation as the service's chat completions,
    so the same model, messages and parameters give the same reply. ``json_schema`` holds the
    reply to a JSON schema (``models.constrained``; ``{"type": "object"}``: any object).
    """
    from tunesmith.data.encode import encode_prompt
    from tunesmith.models.constrained import check_schema
    from tunesmith.models.generation import GenerationParams, generate

    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, stop=tuple(stop),
                              schema=None if json_schema is None else check_schema(json_schema))
    m, tok = loaded or load_for_chat(model, home=home)
    return generate(m, tok, [encode_prompt(tok, messages)], params, batch_size=1)[0].text
