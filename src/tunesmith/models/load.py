"""Load a resolved model directory, and wrap it with LoRA adapters."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ConfigError, ModelError
from tunesmith.models.lora_dropout import use_fast_dropout
from tunesmith.models.sizing import decoder_linear_names


def unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (adapters stay injected), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


# Every model tunesmith loads computes with the code installed on this machine. transformers
# (>= 5.2x, with the `kernels` package, which it now requires) otherwise replaces layers on a GPU
# with kernels fetched from the Hugging Face Hub at load and at `.train()`: code downloaded at
# run time, which fails outright on a machine without the Hub (seen on an H200: "Version 2 of
# 'kernels-community/rotary' is not available in the local cache") and would make a run depend
# on what the Hub served that day. Passed to every `from_pretrained`.
LOCAL_CODE = {"use_kernels": False}


def check_quantization(choice: str) -> None:
    """Refuse ``train.quantize_base`` early where it cannot run: 4-bit NormalFloat weights are
    bitsandbytes' CUDA kernels (QLoRA), so there is no CPU fallback to fall into silently."""
    if choice == "none":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"train.quantize_base: {choice} (QLoRA) needs a CUDA GPU: the 4-bit "
                          "base weights are bitsandbytes' CUDA kernels, and this machine has no "
                          "GPU torch can use. Set train.quantize_base: none to train LoRA on "
                          "the unquantised base (train.precision: bf16 halves its memory where "
                          "the hardware computes bf16).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"train.quantize_base: {choice} needs the bitsandbytes package: "
                          "pip install 'tunesmith[qlora]' (or set train.quantize_base: none)"
                          ) from err


def quantization_config(choice: str) -> Any:
    """QLoRA's recipe (Dettmers et al., 2023): NF4 base weights with double quantisation,
    computing in bf16 (fp16 on GPUs without bf16)."""
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=choice,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def load_model(path: Path, *, dtype: str = "float32", quantize: str = "none") -> Any:
    """The causal LM in ``path``; ``quantize="nf4"``: its linear layers in 4 bits on the GPU
    (``check_quantization`` first)."""
    from transformers import AutoModelForCausalLM

    extra: dict[str, Any] = {}
    if quantize != "none":
        check_quantization(quantize)
        extra = {"quantization_config": quantization_config(quantize),
                 "device_map": {"": torch.cuda.current_device()}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **extra,
                                                     **LOCAL_CODE)
    except Exception as err:
        raise ModelError(f"{path}: cannot load the model ({err})") from err
    return model


def load(path: Path, *, dtype: str = "float32", quantize: str = "none") -> tuple[Any, Any]:
    """Model and tokenizer of a local model directory."""
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype, quantize=quantize)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embedding only {model.get_input_embeddings().weight.shape[0]}; they do "
                         "not belong together")
    return model, tokenizer


def add_lora(model: Any, *, r: int, alpha: float, dropout: float,
             target_modules: list[str] | str, task_type: str = "CAUSAL_LM",
             layers: Sequence[int] | None = None, shared_dropout: bool = True) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (PEFT); only the adapters are trainable.

    The adapters' dropout is ``FastDropout`` (``models.lora_dropout``); with
    ``shared_dropout`` adapters that read the same tensor share one dropped copy of it. With
    ``task_type="SEQ_CLS"`` the classification head is trained in full as well. With
    ``layers`` only those decoder layers (negative: from the top) get adapters.
    """
    from peft import LoraConfig, get_peft_model

    only: dict[str, Any] = {}
    if layers is not None:
        n = int(model.config.get_text_config().num_hidden_layers)
        wrong = [i for i in layers if not -n <= i < n]
        if wrong or not layers:
            raise ModelError(f"train.lora.layers {list(layers)}: this model has {n} decoder "
                             f"layers; give indexes from 0 to {n - 1}, or from -{n} to -1 "
                             "counting from the top")
        if target_modules == "all-linear":  # PEFT takes layers only with a list of names
            target_modules = decoder_linear_names(model)
        only = {"layers_to_transform": sorted({i % n for i in layers})}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules, task_type=task_type, **only)
    try:
        with warnings.catch_warnings():
            # PEFT probes a property transformers has deprecated; nothing for users to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(f"cannot add LoRA adapters: {err}; check train.lora.target_modules") \
            from err
    # the same dropout, its masks drawn faster on CPU (and one per input where shared)
    use_fast_dropout(peft_model, shared=shared_dropout)
    return peft_model


def stored_dtype(path: Path) -> str:
    """The dtype a model directory's weights are stored in, read from its first safetensors
    file (what ``from_pretrained(dtype="auto")`` would also go by); float32 where they are not
    bf16 (fp32 holds fp16 weights exactly) or no safetensors file is there."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if files:
        with safe_open(files[0], framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                kind = f.get_slice(name).get_dtype()
                if kind in ("F32", "BF16", "F16", "F64"):
                    return "bfloat16" if kind == "BF16" else "float32"
    return "float32"


def onto_stored_base(model: Any, base_dir: Path, reload: Callable[[str], Any]) -> Any:
    """The trained LoRA adapters of ``model`` on the base as it is stored, when training held
    the frozen base in lower precision (bf16 copies of fp32 weights, or 4-bit under QLoRA):
    merged into those weights, a small update is rounded away and the merged model would not
    give the adapter model's outputs, so the adapters go onto the base reloaded in its stored
    dtype (``reload(dtype)`` loads it: the causal LM, or the classifier). ``model`` itself
    when its frozen weights are already in that dtype."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    stored = stored_dtype(base_dir)
    if {p.dtype for p in model.parameters() if not p.requires_grad} <= {DTYPES[stored]}:
        return model
    adapters = get_peft_model_state_dict(model)
    config = model.peft_config["default"]
    with torch.random.fork_rng(devices=[]):  # the fresh adapters are overwritten anyway
        plain = get_peft_model(reload(stored), config)
    set_peft_model_state_dict(plain, adapters)
    return plain.to(next(model.parameters()).device)


def save_merged(model: Any, tokenizer: Any, out_dir: Path) -> Any:
    """Fold LoRA adapters into the weights and save a plain model directory; returns the model."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return merged
