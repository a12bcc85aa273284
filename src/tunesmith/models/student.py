"""Layer surgery for distillation: a student that keeps some of a teacher's decoder blocks.

The student is the teacher with only ``keep`` of its blocks, evenly spaced and always
including the first and the last, each initialised with the teacher's own weights (as
DistilBERT starts from every other layer of BERT). Embeddings, the final norm and the head
(the LM head, or a classification head) are the teacher's. The kept blocks are renumbered
``0..keep-1`` (``config.num_hidden_layers``, per-layer config lists such as
``config.layer_types``, and each attention module's ``layer_idx``, which the KV cache is
indexed by), so the student saves, loads and generates like any model of its architecture.
``config.tunesmith_student_layers`` records which teacher blocks it kept (saved in
``config.json``; for a student of a student, the blocks of the first teacher).

    from tunesmith.models.student import make_student
    student = make_student(tuned, keep=4)  # of a 30-layer model: blocks 0, 10, 19, 29
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from tunesmith.errors import ConfigError

# config attributes holding one entry per decoder block (Qwen2/3, Gemma, SmolLM3, ...)
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
STUDENT_LAYERS = "tunesmith_student_layers"


def keep_layers(n_layers: int, keep: int) -> list[int]:
    """Indices of ``keep`` evenly spaced blocks of ``n_layers``: ``round(i * (n - 1) /
    (keep - 1))`` (halves rounded up), so the first and last are always kept; ``keep=1``
    keeps block 0 alone. ``keep`` must be at least 1 and below ``n_layers``."""
    if not 1 <= keep < n_layers:
        raise ConfigError(f"a student of {keep} layers: the model has {n_layers}, so give "
                          f"between 1 and {n_layers - 1} layers to keep")
    if keep == 1:
        return [0]
    # exact integer rounding: floats would round 2.5 differently on different paths
    step, half = n_layers - 1, keep - 1
    return sorted({(2 * i * step + half) // (2 * half) for i in range(keep)})


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the list of a decoder-only model's blocks (``model.layers`` in Llama and
    its sequence-classification model, ``transformer.h`` in GPT-2)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h") \
                and len(module) > 0:
            return name, module
    raise ConfigError(f"{type(model).__name__}: no list of decoder blocks (model.layers) found; "
                      "students and pruning support decoder-only transformers such as Llama, "
                      "Qwen, Mistral")


def make_student(teacher: nn.Module, keep: int) -> nn.Module:
    """A copy of ``teacher`` holding only ``keep_layers(depth, keep)`` of its blocks, with the
    teacher's weights; the teacher is not changed."""
    name, blocks = decoder_layers(teacher)
    kept = keep_layers(len(blocks), keep)
    # the dropped blocks are never copied: the memo hands deepcopy None for them
    memo: dict[int, Any] = {id(block): None for i, block in enumerate(blocks) if i not in kept}
    student = copy.deepcopy(teacher, memo)
    copied = student.get_submodule(name)
    layers = nn.ModuleList([copied[i] for i in kept])
    parent, _, attr = name.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, attr, layers)
    for index, block in enumerate(layers):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    _renumber_config(student.config, len(blocks), kept)
    return student


def _renumber_config(config: Any, depth: int, kept: list[int]) -> None:
    previous = getattr(config, STUDENT_LAYERS, None)  # a student of a student
    config.num_hidden_layers = len(kept)
    for attr in PER_LAYER_LISTS:
        values = getattr(config, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == depth:
            setattr(config, attr, [values[i] for i in kept])
    setattr(config, STUDENT_LAYERS,
            [previous[i] for i in kept] if isinstance(previous, list) else kept)
