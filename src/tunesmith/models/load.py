"""Load a resolved model directory, and wrap it with LoRA adapters."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ModelError

# ChatML: used when a model ships no chat template of its own (plain base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise ModelError(f"{path}: cannot load the tokenizer ({err})") from err
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{path}: tunesmith needs a fast (Rust) tokenizer for loss masks; "
                         "this model only has a slow one")
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, *, dtype: str = "float32") -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as err:
        raise ModelError(f"{path}: cannot load the model ({err})") from err
    return model


def load(path: Path, *, dtype: str = "float32") -> tuple[Any, Any]:
    """Model and tokenizer of a local model directory."""
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding only {model.get_input_embeddings().weight.shape[0]}; they do "
                         "not belong together")
    return model, tokenizer


def add_lora(model: Any, *, r: int, alpha: float, dropout: float,
             target_modules: list[str] | str, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with fresh LoRA adapters (PEFT); only the adapters are trainable.

    With ``task_type="SEQ_CLS"`` the classification head is trained in full as well.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules, task_type=task_type)
    try:
        with warnings.catch_warnings():
            # PEFT probes a property transformers has deprecated; nothing for users to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(f"cannot add LoRA adapters: {err}; check train.lora.target_modules") \
            from err


def save_merged(model: Any, tokenizer: Any, out_dir: Path) -> Any:
    """Fold LoRA adapters into the weights and save a plain model directory; returns the model."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return merged
