"""Differential privacy (DP-SGD) as a wrapper around the loop's parts, built on Opacus.

``Privacy(plan).wrap`` replaces three parts before the loop starts, and the loop does not
change (see ``setup``):

- the **batch source** by ``PoissonBatches``: every example joins every step independently
  with probability q = batch_size / n, the sampling the accountant's amplification assumes;
- the **objective** by ``PrivateObjective``: one example per row (no packing), each example's
  loss its own mean over its target tokens, the sum divided by the *expected* batch size (a
  constant, so no example's gradient depends on how many others were drawn), the batch cut
  into physical micro-batches whose per-example gradients are clipped and folded into a
  running sum as soon as the next one starts, so memory stays flat at any logical batch
  (what Opacus' ``BatchMemoryManager`` does for a DataLoader);
- the **optimiser** by ``PrivateOptimizer``, Opacus' ``DPOptimizer``: per-example clipping to
  ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` on the sum,
  then the wrapped optimiser's step (AdamW or SGD). It owns the accountant, whose history
  travels in the optimiser's state dict, so a resumed run never forgets the steps it spent.

Per-example gradients come from Opacus' ``GradSampleModule`` hooks, which it puts only on
modules with trainable parameters: with LoRA the frozen base computes none.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.training.batches import PoissonBatches
from tunesmith.training.objectives import ObjectiveOutput, summarise
from tunesmith.training.setup import TrainParts

# Opacus calls ``logging.basicConfig`` when imported (opacus/utils/module_utils.py), which hangs
# a stderr handler on the root logger: every tunesmith record then printed twice on the screen,
# once in Opacus' format, in every run, private or not. Take that one handler back off; a root
# handler the application set up itself has another format and stays.
OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def _drop_opacus_root_handler() -> None:
    for handler in list(logging.root.handlers):
        formatter = handler.formatter
        if formatter is not None and formatter._fmt == OPACUS_ROOT_FORMAT:
            logging.root.removeHandler(handler)


_drop_opacus_root_handler()

# Below this expected batch the noise (std sigma*C/B per coordinate of the averaged gradient)
# drowns the signal at any useful epsilon; DP-SGD work uses batches of hundreds.
MIN_BATCH_SIZE = 16
# delta 'auto': well below 1/n (the chance of a total failure for one of n examples), and no
# larger than the 1e-5 DP fine-tuning papers use.
AUTO_DELTA_CAP = 1e-5
# PRV accountant: the epsilon it reports is an upper bound within this error.
PRV_EPS_ERROR = 0.01


@dataclass(frozen=True)
class PrivacySettings:
    """What a run asks for (``train.privacy`` of the run configuration)."""

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None  # None: auto
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    physical_batch_size: int = 16


@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved mechanism: everything the accountant and the report need."""

    noise_multiplier: float
    delta: float
    delta_auto: bool
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    planned_steps: int
    n_examples: int
    accountant: str
    physical_batch_size: int
    target_epsilon: float | None = None


def auto_delta(n: int) -> float:
    return min(AUTO_DELTA_CAP, 1.0 / (10 * n))


def plan_privacy(s: PrivacySettings, *, n_examples: int, batch_size: int, steps: int,
                 epochs: int) -> PrivacyPlan:
    """Check the settings against the data and find the noise for ``target_epsilon``."""
    n = n_examples
    if batch_size < MIN_BATCH_SIZE:
        raise ConfigError(
            f"train.batch_size {batch_size} is too small for differential privacy: the noise "
            f"on the averaged gradient shrinks as 1/batch, and below {MIN_BATCH_SIZE} it drowns "
            f"what the model learns; use {MIN_BATCH_SIZE} or more (DP-SGD usually uses hundreds)")
    if batch_size >= n:
        raise ConfigError(
            f"train.batch_size {batch_size} is not below the {n} training examples: every step "
            "would see every example and sampling gives no privacy amplification; use a "
            "smaller batch or more data")
    delta = auto_delta(n) if s.delta is None else s.delta
    if delta >= 1.0 / n:
        raise ConfigError(
            f"train.privacy.delta {delta:g} is not below 1/n = {1.0 / n:g} for the {n} "
            "training examples: a mechanism may then publish one example outright and still "
            "meet it; use a delta well below 1/n, or 'auto'")
    q = batch_size / n
    sigma = s.noise_multiplier
    if sigma is None:
        assert s.target_epsilon is not None
        try:
            sigma = get_noise_multiplier(target_epsilon=s.target_epsilon, target_delta=delta,
                                         sample_rate=q, steps=steps, accountant=s.accountant,
                                         **_eps_kwargs(s.accountant))
        except ValueError as e:
            raise ConfigError(
                f"train.privacy.target_epsilon {s.target_epsilon:g} cannot be reached with "
                f"delta {delta:g}, {n} examples, train.batch_size {batch_size} and "
                f"{epochs} epoch(s) ({steps} steps): no noise is enough ({e}). Raise "
                "target_epsilon, or train fewer epochs, with a smaller batch, or on more "
                "data") from e
    return PrivacyPlan(noise_multiplier=float(sigma), delta=delta, delta_auto=s.delta is None,
                       max_grad_norm=s.max_grad_norm, sample_rate=q,
                       expected_batch_size=batch_size, planned_steps=steps, n_examples=n,
                       accountant=s.accountant, physical_batch_size=s.physical_batch_size,
                       target_epsilon=s.target_epsilon)


def _eps_kwargs(accountant: str) -> dict[str, float]:
    return {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}


def epsilon_for(plan: PrivacyPlan, steps: int) -> float:
    """Epsilon spent after ``steps`` steps of ``plan`` (Opacus' accountant)."""
    if steps == 0:
        return 0.0
    accountant = create_accountant(mechanism=plan.accountant)
    accountant.history = [(plan.noise_multiplier, plan.sample_rate, steps)]
    return float(accountant.get_epsilon(delta=plan.delta, **_eps_kwargs(plan.accountant)))


class PrivateOptimizer(DPOptimizer):
    """Opacus' DP optimiser, with its accountant, for a loss divided by the expected batch.

    The loop divides the summed loss by the objective's normaliser, which under DP is the
    expected batch size B, so the per-example gradients Opacus captures are g_i / B. Clipping
    them at C/B and adding noise of std sigma*C/B gives (sum_i clip_C(g_i) + N(0, (sigma*C)^2))
    / B: exactly DP-SGD at clipping bound C and noise multiplier sigma (Opacus' own "mean"
    reduction computes the same, dividing after the noise). ``fold`` clips and sums a physical
    micro-batch's per-example gradients and frees them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: PrivacyPlan) -> None:
        b = plan.expected_batch_size
        super().__init__(optimizer, noise_multiplier=plan.noise_multiplier,
                         max_grad_norm=plan.max_grad_norm / b, expected_batch_size=b,
                         loss_reduction="sum")
        self.plan = plan
        self.accountant = create_accountant(mechanism=plan.accountant)
        self.last_clip_factors: torch.Tensor | None = None  # of the last folded micro-batch

    def _pending(self) -> bool:
        return any(getattr(p, "grad_sample", None) is not None for p in self.params)

    def fold(self) -> None:
        """Clip the pending per-example gradients, add them to the running sum, free them."""
        if not self._pending():
            return
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples],
                            dim=1).norm(2, dim=1)
        self.last_clip_factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.clip_and_accumulate()
        for p in self.params:
            p.grad_sample = None

    def pre_step(self, closure: Any = None) -> bool:
        self.fold()
        for p in self.params:
            if p.summed_grad is None:  # an empty Poisson batch: noise only, still a step
                p.summed_grad = torch.zeros_like(p)
        self.add_noise()
        self.accountant.step(noise_multiplier=self.noise_multiplier,
                             sample_rate=self.plan.sample_rate)
        self._is_last_step_skipped = False
        return True

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.accountant.history)

    def epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.plan.delta,
                                                 **_eps_kwargs(self.plan.accountant)))

    def state_dict(self) -> dict[str, Any]:
        return {**self.original_optimizer.state_dict(),
                "privacy_accountant": self.accountant.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        accountant = state.pop("privacy_accountant", None)
        self.original_optimizer.load_state_dict(state)
        if accountant is not None and accountant.get("history"):
            self.accountant.load_state_dict(accountant)


class PrivateObjective(nn.Module):
    """An objective under DP: per-example losses, physical micro-batches, constant normaliser.

    In training the summed loss is divided by the expected batch size (DP-SGD's estimator of
    the mean); in evaluation by the number of examples, so ``valid_loss`` is the mean of the
    examples' own mean token losses.
    """

    def __init__(self, inner: nn.Module, plan: PrivacyPlan) -> None:
        super().__init__()
        self.inner = inner
        self.plan = plan
        self.optimizer: PrivateOptimizer | None = None  # set by the wrapper
        self.drawn = 0  # examples through training forwards since the last step's report

    def collate(self, examples: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        """Physical micro-batches of similar lengths, so each pads little: the step's clipped
        per-example gradients are summed whatever the order, so sorting changes nothing but
        the float rounding of that sum."""
        size = self.plan.physical_batch_size
        ordered = sorted(examples, key=self.inner.size)
        return [p for i in range(0, len(ordered), size)
                for p in self.inner.collate(ordered[i:i + size])]

    def normaliser(self, examples: Sequence[Any]) -> float:
        if self.training:
            return float(self.plan.expected_batch_size)
        return float(len(examples))

    def size(self, example: Any) -> int:
        return self.inner.size(example)

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        return summarise(self.inner, sums)

    def forward(self, **inputs: torch.Tensor) -> ObjectiveOutput:
        if self.training and torch.is_grad_enabled() and self.optimizer is not None:
            self.optimizer.fold()  # the previous micro-batch's gradients, before new ones
            self.drawn += int(inputs["input_ids"].shape[0])
        losses, metrics = self.inner.example_losses(**inputs)
        return ObjectiveOutput(losses.sum(), metrics)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


class Privacy:
    """DP-SGD for one run: the wrapper (``wrap``), a callback putting the epsilon spent on
    every evaluation, and the figures for the report and ``privacy.json`` (``summary``)."""

    def __init__(self, plan: PrivacyPlan, *, seed: int) -> None:
        self.plan, self.seed = plan, seed
        self.optimizer: PrivateOptimizer | None = None
        self.objective: PrivateObjective | None = None
        self.grad_sample_module: GradSampleModule | None = None
        self._hooks: list[Any] = []

    def wrap(self, parts: TrainParts) -> TrainParts:
        if parts.accelerator.num_processes > 1:
            raise ConfigError("train.privacy runs in one process: per-example clipping across "
                              "processes is not supported yet; launch without accelerate/torchrun")
        if getattr(parts.objective, "packing", False):
            raise ConfigError("train.privacy needs train.packing: false: DP-SGD clips each "
                              "example's gradient, and a packed row mixes several examples")
        if not hasattr(parts.objective, "example_losses"):
            raise ConfigError(
                f"train.privacy does not support the {type(parts.objective).__name__} "
                "objective: DP-SGD needs one example per row (use objective: sft, or head: "
                "classifier)")
        # the first adapters' inputs (frozen embeddings) need no gradient, so torch says the
        # hook sees only output gradients: exactly what Opacus' per-example gradients use
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            self.grad_sample_module = GradSampleModule(parts.model, batch_first=True,
                                                       loss_reduction="sum", strict=True)
        except NotImplementedError as e:
            raise ConfigError(f"train.privacy: Opacus cannot compute per-example gradients "
                              f"for this model's trainable layers ({e}); train LoRA adapters "
                              "(train.method: lora) on linear layers") from e
        self.optimizer = PrivateOptimizer(parts.optimizer, self.plan)
        objective = PrivateObjective(parts.objective, self.plan)
        objective.optimizer = self.optimizer
        data = getattr(parts.batches, "data", None)
        if data is None:
            raise ConfigError("train.privacy needs a batch source over a list of examples")
        if getattr(parts.batches, "batch_size", self.plan.expected_batch_size) != \
                self.plan.expected_batch_size:
            raise ConfigError(f"train.privacy was planned for batches of "
                              f"{self.plan.expected_batch_size}, the loop has "
                              f"{parts.batches.batch_size}; plan with the loop's batch size")
        # the batch gradient is never formed: each parameter's .grad is dropped as soon as
        # autograd fills it (the per-example gradients are Opacus'), so nothing non-private,
        # such as a batch-gradient norm, can be computed or logged, and no memory is held
        self._hooks = [p.register_post_accumulate_grad_hook(_drop_grad)
                       for p in self.optimizer.params]
        self.objective = objective
        batches = PoissonBatches(data, expected_batch_size=self.plan.expected_batch_size,
                                 seed=self.seed)
        callbacks = [*parts.extra.get("callbacks", ()), self]
        return parts.replace(objective=objective, optimizer=self.optimizer, batches=batches,
                             extra={**parts.extra, "callbacks": callbacks})

    # -- callback ---------------------------------------------------------------------------
    def on_step(self, loop: Any, metrics: dict[str, Any]) -> None:
        # the loop divided by the expected batch (DP-SGD's estimator); the log shows the mean
        # over the examples this step drew, comparable with valid_loss
        drawn = self.objective.drawn if self.objective is not None else 0
        if self.objective is not None:
            self.objective.drawn = 0
        scale = self.plan.expected_batch_size / drawn if drawn else 0.0
        for k in [k for k in metrics if k.startswith("train_")]:
            metrics[k] *= scale
        metrics.update(batch_examples=drawn, grad_norm=None)

    def on_evaluate(self, loop: Any, metrics: dict[str, Any]) -> None:
        if self.optimizer is not None:
            metrics["epsilon"] = self.optimizer.epsilon()

    def on_train_end(self, loop: Any) -> None:
        if self.grad_sample_module is not None:
            self.grad_sample_module.remove_hooks()  # evaluation and merging run hook-free
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- figures ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """(epsilon, delta) spent and the mechanism, for metrics.json and privacy.json."""
        p = self.plan
        steps = self.optimizer.steps if self.optimizer is not None else 0
        epsilon = self.optimizer.epsilon() if self.optimizer is not None else 0.0
        return {
            "epsilon": epsilon, "delta": p.delta,
            "delta_rule": ("auto: min(1e-5, 1/(10 n))" if p.delta_auto else "given"),
            "target_epsilon": p.target_epsilon, "noise_multiplier": p.noise_multiplier,
            "max_grad_norm": p.max_grad_norm, "sample_rate": p.sample_rate,
            "expected_batch_size": p.expected_batch_size, "steps": steps,
            "planned_steps": p.planned_steps, "n_examples": p.n_examples,
            "accountant": p.accountant, "sampling": "poisson",
            "unit": "one training example (add/remove)",
            "epsilon_is_finite": math.isfinite(epsilon),
        }
