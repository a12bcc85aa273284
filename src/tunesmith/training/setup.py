"""Setup: build what the loop receives (model, objective, optimiser, scheduler, batches).

As litgpt's ``fit(fabric, model, optimizer, scheduler, train_dataloader, ...)`` receives its
parts, ``tunesmith.training.loop.fit`` receives a ``TrainParts``; ``setup`` builds one from
plain arguments. Between the two, a *wrapper* (any ``TrainParts -> TrainParts`` function) may
replace any part: differential privacy swaps in a private optimiser and a Poisson batch source,
a federated client loads the global adapter. Nothing is handed to Accelerate until ``fit``
starts, so wrappers see plain torch objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from tunesmith.config import TrainConfig
from tunesmith.errors import TrainingError
from tunesmith.models.fused_layers import use_fused_layers
from tunesmith.models.packed_attention import use_packed_attention
from tunesmith.models.sizing import layer_index
from tunesmith.training.batches import BatchSource, ShuffledBatches
from tunesmith.training.objectives import Objective, frozen_models
from tunesmith.training.precision import cast_frozen, resolve_precision
from tunesmith.training.processes import accelerator as make_accelerator


def _default(name: str) -> Any:
    # One definition per hyperparameter: the run config's field is the source of its default.
    return TrainConfig.model_fields[name].default


@dataclass(frozen=True)
class LoopSettings:
    """Concrete hyperparameters of one training run (no 'auto' left).

    Defaults are ``TrainConfig``'s; ``tunesmith.flows.steps.loop_settings`` fills every field
    from a run configuration.
    """

    learning_rate: float
    epochs: int
    batch_size: int
    total_steps: int
    eval_every: int
    warmup_steps: int = 0
    micro_batch_size: int | None = _default("micro_batch_size")
    weight_decay: float = _default("weight_decay")
    optimizer: str = _default("optimizer")
    max_grad_norm: float | None = _default("max_grad_norm")
    early_stopping_patience: int | None = _default("early_stopping_patience")
    best_metric: str = _default("best_metric")
    keep_checkpoints: int = _default("keep_checkpoints")
    schedule: str = _default("schedule")
    layer_lr_decay: float = _default("layer_lr_decay")
    packing: bool = _default("packing")
    pack_capacity: int = 512
    group_by_length: bool = _default("group_by_length")
    precision: str = _default("precision")
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    seed: int = _default("seed")
    eval_batch_size: int = 16
    restore_best: bool = True
    # (name fragment, learning rate): parameters whose name holds the fragment learn at that
    # rate instead, e.g. a new classification layer (("score.", 3e-5),)
    lr_overrides: tuple[tuple[str, float], ...] = ()


ObjectiveFactory = Callable[[torch.nn.Module, str], Objective]


@dataclass
class TrainParts:
    """Everything the loop runs with. ``objective`` wraps ``model``; the optimiser holds the
    model's trainable parameters and nothing an objective keeps frozen."""

    model: torch.nn.Module
    objective: Any  # an Objective and an nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: BatchSource
    accelerator: Accelerator
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)  # what wrappers want to pass on
    module: Any = None  # the objective as Accelerate prepared it (DDP-wrapped); set by fit

    def replace(self, **changes: Any) -> TrainParts:
        return replace(self, **changes)


Wrapper = Callable[[TrainParts], TrainParts]


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def _layer_scale(name: str, n_layers: int, decay: float) -> float:
    """lr multiplier: decay^(n-1-i) for layer i, decay^n for embeddings, 1 for the head."""
    if decay == 1.0:
        return 1.0
    index = layer_index(name)
    if index is not None:
        return decay ** (n_layers - 1 - index)
    return decay ** n_layers if "embed" in name else 1.0


# SGD's momentum: what DP-SGD work (and Opacus' examples) use
SGD_MOMENTUM = 0.9


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    layer_lr_decay: float = 1.0, n_layers: int = 0,
                    lr_overrides: Sequence[tuple[str, float]] = (),
                    kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum) over the trainable parameters; no decay on norms/biases;
    optional layer-wise lr; ``lr_overrides`` give parameters whose name holds a fragment their
    own rate."""
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            rate = next((r for frag, r in lr_overrides if frag in name),
                        lr * _layer_scale(name, n_layers, layer_lr_decay))
            groups.setdefault((_no_decay(name, p), rate), []).append(p)
    if not groups:
        raise TrainingError("the model has no trainable parameters; check train.method and "
                            "train.lora.target_modules")
    param_groups = [{"params": ps, "weight_decay": 0.0 if plain else weight_decay, "lr": rate}
                    for (plain, rate), ps in groups.items()]
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=SGD_MOMENTUM)
    return torch.optim.AdamW(param_groups, lr=lr, fused=_fused_on_cpu(param_groups))


def _fused_on_cpu(groups: list[dict[str, Any]]) -> bool | None:
    """``fused=True`` where every trainable tensor is a plain float tensor on the CPU.

    PyTorch's default there is a Python loop over the parameters (its foreach kernels are for
    GPUs): for LoRA's 420 adapter matrices on the bundled model the step took 20 ms in the
    loop against 7 ms fused (docs/benchmarks.md), the same update to 1e-6 (tests/unit/
    training/test_setup.py). FSDP shards the parameters after this (its DTensors step fused
    too: tests/flow/test_fsdp.py); on CUDA PyTorch's own choice is kept."""
    params = [p for g in groups for p in g["params"]]
    plain = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type == "cpu"
                and p.is_floating_point() for p in params)
    return True if plain else None


def prepare_model(model: torch.nn.Module, *, precision: str, gradient_checkpointing: bool,
                  device: torch.device) -> str:
    """Cast frozen weights for the resolved precision, switch on checkpointing; the precision."""
    resolved = resolve_precision(precision, device)
    if resolved == "bf16":
        cast_frozen(model, torch.bfloat16)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return resolved


def _n_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def setup(model: torch.nn.Module, make_objective: ObjectiveFactory, train_data: Sequence[Any],
          *, settings: LoopSettings, accelerator: Accelerator | None = None) -> TrainParts:
    """The parts of a run: model cast for its precision, objective, optimiser, schedule, batches."""
    s = settings
    accelerator = accelerator or make_accelerator()
    precision = prepare_model(model, precision=s.precision,
                              gradient_checkpointing=s.gradient_checkpointing,
                              device=accelerator.device)
    objective = make_objective(model, precision)
    for frozen in frozen_models(objective):
        frozen.to(accelerator.device)
        if precision == "bf16":
            cast_frozen(frozen.module, torch.bfloat16)
        if s.packing:
            use_packed_attention(frozen.module)
    if s.packing:  # packed rows attend within each sequence (models.packed_attention)
        use_packed_attention(model)
    if accelerator.device.type == "cpu":  # RMSNorm and LoRA layers as one function each
        use_fused_layers(model)
    # only the trainable parameters of the model: a frozen model an objective holds is not
    # reachable through objective.parameters() (see objectives.Frozen)
    optimizer = build_optimizer(objective, lr=s.learning_rate, weight_decay=s.weight_decay,
                                layer_lr_decay=s.layer_lr_decay, n_layers=_n_layers(model),
                                lr_overrides=s.lr_overrides, kind=s.optimizer)
    scheduler = get_scheduler(s.schedule, optimizer, num_warmup_steps=s.warmup_steps,
                              num_training_steps=max(1, s.total_steps))
    size = getattr(objective, "size", len)
    batches = ShuffledBatches(train_data, batch_size=s.batch_size, seed=s.seed,
                              group_by_length=s.group_by_length and not s.packing, size=size)
    return TrainParts(model=model, objective=objective, optimizer=optimizer,
                      scheduler=scheduler, batches=batches, accelerator=accelerator,
                      precision=precision)
