"""DP-SGD on Opacus: per-example clipping, noise scale, seeds, LoRA-only updates, accounting."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from tests.helpers import review_rows
from tunesmith.data.encode import encode_chat
from tunesmith.errors import ConfigError
from tunesmith.training.loop import LoopSettings, train
from tunesmith.training.privacy import (
    Privacy,
    PrivacyPlan,
    PrivacySettings,
    PrivateOptimizer,
    epsilon_for,
    plan_privacy,
)


def _plan(**kw) -> PrivacyPlan:
    base = dict(noise_multiplier=0.0, delta=1e-5, delta_auto=False, max_grad_norm=1.0,
                sample_rate=0.1, expected_batch_size=8, planned_steps=10, n_examples=80,
                accountant="rdp", physical_batch_size=4)
    return PrivacyPlan(**{**base, **kw})


def _toy(seed=0):
    """A linear model with Opacus' per-example hooks, and a hook-free copy of it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 3))
    plain = copy.deepcopy(model)
    GradSampleModule(model, batch_first=True, loss_reduction="sum")
    return model, plain


def test_each_example_is_clipped_to_the_bound_before_noise():
    model, plain = _toy()
    plan = _plan(max_grad_norm=0.5, expected_batch_size=8)
    opt = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), plan)
    torch.manual_seed(1)
    x = torch.randn(8, 5) * torch.linspace(0.1, 20, 8)[:, None]  # small and large gradients
    y = torch.randn(8, 3)
    losses = ((model(x) - y) ** 2).sum(-1)
    (losses.sum() / plan.expected_batch_size).backward()  # what the loop backpropagates
    # the per-example gradients, one example at a time, independently of Opacus
    per_example = []
    for i in range(8):
        m = copy.deepcopy(plain)
        ((m(x[i:i + 1]) - y[i:i + 1]) ** 2).sum().backward()
        per_example.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    g = torch.stack(per_example)
    opt.fold()
    clipped = g * opt.last_clip_factors[:, None]
    norms = clipped.norm(dim=1)
    assert (norms <= plan.max_grad_norm + 1e-5).all()
    assert (g.norm(dim=1) > plan.max_grad_norm).sum() >= 4  # the bound really bites
    small = g.norm(dim=1) <= plan.max_grad_norm
    torch.testing.assert_close(clipped[small], g[small])  # and leaves small ones alone
    summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(summed * plan.expected_batch_size, clipped.sum(0), rtol=1e-4,
                               atol=1e-5)


def test_noise_has_the_configured_standard_deviation():
    model, _ = _toy()
    plan = _plan(noise_multiplier=2.0, max_grad_norm=0.7, expected_batch_size=16)
    opt = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), plan)
    torch.manual_seed(3)
    draws = []
    x = torch.zeros(4, 5)
    for _ in range(300):
        (model(x).sum() * 0.0).backward()  # zero per-example gradients: the update is noise
        opt.step()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt.zero_grad()
    noise = torch.stack(draws).flatten() * plan.expected_batch_size
    expected = plan.noise_multiplier * plan.max_grad_norm  # sigma * C on the summed gradient
    assert noise.mean().abs() < 0.05 * expected
    assert noise.std().item() == pytest.approx(expected, rel=0.04)  # 5400 draws: se ~1%
    assert opt.steps == 300


def test_reported_epsilon_equals_opacus_accountants():
    for accountant, cls, kw in (("rdp", RDPAccountant, {}),
                                ("prv", PRVAccountant, {"eps_error": 0.01})):
        plan = _plan(noise_multiplier=1.1, sample_rate=0.05, accountant=accountant)
        independent = cls()
        for _ in range(40):
            independent.step(noise_multiplier=1.1, sample_rate=0.05)
        assert epsilon_for(plan, 40) == pytest.approx(
            independent.get_epsilon(delta=1e-5, **kw), abs=1e-6)


def test_plan_finds_the_noise_for_the_target_and_checks_the_data():
    plan = plan_privacy(PrivacySettings(target_epsilon=8.0), n_examples=1000, batch_size=50,
                        steps=60, epochs=3)
    assert plan.delta == 1e-5 and plan.sample_rate == 0.05
    assert epsilon_for(plan, 60) == pytest.approx(8.0, abs=0.05)
    assert epsilon_for(plan, 60) <= 8.0
    with pytest.raises(ConfigError, match="target_epsilon 0.01 cannot be reached"):
        plan_privacy(PrivacySettings(target_epsilon=0.01, accountant="rdp"), n_examples=1000,
                     batch_size=50, steps=600, epochs=30)
    with pytest.raises(ConfigError, match="delta 0.01 is not below 1/n"):
        plan_privacy(PrivacySettings(noise_multiplier=1.0, delta=0.01), n_examples=1000,
                     batch_size=50, steps=60, epochs=3)
    with pytest.raises(ConfigError, match="batch_size 4 is too small"):
        plan_privacy(PrivacySettings(noise_multiplier=1.0), n_examples=1000, batch_size=4,
                     steps=60, epochs=3)


def _dp_train(tiny_model_dir, tmp_path, *, seed, steps=4, sigma=1.0):
    from tunesmith.models.load import add_lora, load

    torch.manual_seed(0)
    model, tok = load(tiny_model_dir)
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [encode_chat(tok, r["messages"]) for r in review_rows(64)]
    plan = plan_privacy(PrivacySettings(noise_multiplier=sigma, max_grad_norm=1.0,
                                        physical_batch_size=5),
                        n_examples=len(data), batch_size=16, steps=steps, epochs=1)
    privacy = Privacy(plan, seed=seed)
    torch.manual_seed(seed)
    settings = LoopSettings(learning_rate=5e-2, epochs=1, batch_size=16, total_steps=steps,
                            eval_every=100, packing=False, max_grad_norm=None, seed=seed,
                            restore_best=False)
    train(model, data, data[:8], settings=settings, pad_id=tok.pad_token_id,
          checkpoint_dir=tmp_path / f"ckpt-{seed}-{len(list(tmp_path.iterdir()))}",
          wrappers=[privacy.wrap])
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return before, after, privacy


def test_dp_changes_only_the_lora_weights_and_follows_the_seed(tiny_model_dir, tmp_path):
    before, after, privacy = _dp_train(tiny_model_dir, tmp_path, seed=1)
    lora = [n for n in after if "lora_" in n]
    assert lora
    changed = [n for n in lora if not torch.equal(before[n], after[n])]
    assert len(changed) == len(lora)  # opacus issue 820: adapters must really move
    for n in after:
        if "lora_" not in n:  # frozen: at most cast to the loop's precision (bf16 where native)
            assert torch.equal(before[n].to(after[n].dtype), after[n]), n
    summary = privacy.summary()
    assert summary["steps"] == 4
    assert summary["epsilon"] == pytest.approx(epsilon_for(privacy.plan, 4), abs=1e-6)
    assert math.isfinite(summary["epsilon"]) and summary["epsilon"] > 0
    _, again, _ = _dp_train(tiny_model_dir, tmp_path, seed=1)
    _, other, _ = _dp_train(tiny_model_dir, tmp_path, seed=2)
    for n in lora:
        assert torch.equal(after[n], again[n]), n
    assert any(not torch.equal(after[n], other[n]) for n in lora)


def test_layers_opacus_cannot_handle_are_a_config_error(tiny_model_dir, tmp_path):
    class Odd(nn.Module):  # a trainable layer with a buffer: Opacus refuses it
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)
            self.lin = nn.Linear(4, 4)

    from accelerate import Accelerator

    from tunesmith.training.setup import TrainParts

    model = Odd()
    obj = type("Obj", (nn.Module,), {"example_losses": lambda self, **k: None})()
    parts = TrainParts(model=model, objective=obj,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                       batches=None, accelerator=Accelerator(), precision="fp32")
    with pytest.raises(ConfigError, match="Opacus cannot compute per-example gradients"):
        Privacy(_plan(), seed=0).wrap(parts)


def test_importing_privacy_leaves_the_root_logger_alone():
    """Opacus' import-time basicConfig would print every tunesmith record twice on the screen."""
    code = (
        "import logging, tunesmith.training.privacy\n"
        "assert logging.root.handlers == [], logging.root.handlers\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
