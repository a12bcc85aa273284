"""Checks to run before evaluating, so a mismatch fails with a message instead of garbage.

Each raises ``DataError`` or ``ModelError`` saying what to change, and returns quietly (or
with warnings) when all is well. ``check_labels`` and ``check_references`` live with the
code they protect and are re-exported here so the flow finds every check in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ModelError
from tunesmith.evaluation.metrics import check_references
from tunesmith.evaluation.task import check_labels
from tunesmith.models.load import unwrap

__all__ = ["check_adapter", "check_labels", "check_model_tokenizer", "check_references",
           "training_warnings"]


def check_model_tokenizer(model: Any, tokenizer: Any) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding and head."""
    lm = unwrap(model)
    rows = lm.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size > rows:
        raise ModelError(f"the tokenizer has {size} tokens but the model's embedding only {rows} "
                         "rows: they do not belong together; load the tokenizer saved with this "
                         "model (the same model directory)")
    head = lm.get_output_embeddings()
    if head is not None and head.weight.shape[0] < size:
        raise ModelError(f"the model's output head scores {head.weight.shape[0]} tokens but the "
                         f"tokenizer has {size}; load the tokenizer saved with this model")
    specials = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id}
    bad = {k: v for k, v in specials.items() if v is not None and v >= rows}
    if bad:
        raise ModelError(f"special token id(s) {bad} are past the model's {rows} embedding rows; "
                         "the tokenizer belongs to another model")


def _adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    st, binary = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors import safe_open

        # shapes from the header only; safe_open is not a dict, so .keys() it is
        with safe_open(str(st), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    if binary.is_file():
        weights = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in weights.items()}
    raise ModelError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin; is this "
                     "a PEFT adapter directory?")


def _features(module: Any) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can wrap: Linear (weight [out, in]) or Embedding ([num, dim])."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def _same_name(a: str, b: str) -> bool:
    # paths move when run directories are copied; the last component names the model
    return Path(a.rstrip("/")).name.casefold() == Path(b.rstrip("/")).name.casefold()


def check_adapter(adapter_dir: Path, model: Any, *, strict_name: bool = False) -> list[str]:
    """Check that a PEFT LoRA adapter fits ``model``; returns warnings, raises on a misfit.

    Every adapted module must exist in the model with the in/out sizes the adapter's lora_A
    and lora_B were trained for. A different ``base_model_name_or_path`` is only a warning
    (the same model may live at another path) unless ``strict_name``.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{adapter_dir}: no adapter_config.json; point at the adapter directory "
                         "a run saved (runs/NAME/adapter)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{cfg_path}: not valid JSON ({err})") from err
    lm = unwrap(model)
    modules = dict(lm.named_modules())
    recorded = cfg.get("base_model_name_or_path") or "an unrecorded base model"
    for key, shape in sorted(_adapter_shapes(adapter_dir).items()):
        for part, axis in ((".lora_A.", 1), (".lora_B.", 0), (".lora_embedding_A.", 1),
                           (".lora_embedding_B.", 0)):
            if part not in key:
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            features = _features(modules[name]) if name in modules else None
            if features is None:
                raise ModelError(f"{adapter_dir}: the adapter adapts '{name}', which this model "
                                 f"does not have; it was trained for {recorded}")
            want = features[0] if axis == 1 else features[1]
            if shape[axis] != want:
                raise ModelError(
                    f"{adapter_dir}: '{name}' has {'input' if axis == 1 else 'output'} size "
                    f"{want} in this model but {shape[axis]} in the adapter; the adapter was "
                    f"trained for {recorded}, so load that base model")
    warnings = []
    ours = str(getattr(lm.config, "_name_or_path", "") or "")
    theirs = cfg.get("base_model_name_or_path")
    if theirs and ours and not _same_name(theirs, ours):
        message = (f"{adapter_dir}: the adapter was trained on '{theirs}' but is being applied "
                   f"to '{ours}'")
        if strict_name:
            raise ModelError(message + "; load the base model it was trained on")
        warnings.append(message + "; the shapes fit, so check it is the same model")
    return warnings


def training_warnings(*, best_step: int | None, last_step: int,
                      predicted: list[str] | None = None,
                      labels: list[str] | None = None) -> list[str]:
    """What about a finished training should make a reader stop: a "best" model that is the
    untrained start, or a classifier that answers one class for every example."""
    out = []
    if best_step == 0 and last_step > 0:
        out.append("training never improved on the starting point: the best validation loss "
                   "was at step 0, so the saved model is the untrained one; lower "
                   "train.learning_rate or raise train.early_stopping_patience")
    if predicted and labels and len(labels) > 1:
        seen = {p for p in predicted if p in labels}
        if len(seen) == 1:
            out.append(f"degenerate classifier: it predicted '{next(iter(seen))}' for every "
                       f"one of the {len(predicted)} test examples")
    return out
