import copy
import dataclasses

import torch

from tunesmith.config import TrainConfig
from tunesmith.training.setup import LoopSettings, build_optimizer


def test_layer_wise_lr_decay_slows_earlier_layers(tiny):
    model, _ = tiny
    opt = build_optimizer(model, lr=1.0, weight_decay=0.1, layer_lr_decay=0.5, n_layers=2)
    by_lr = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            by_lr[names[id(p)]] = g["lr"]
    layer0 = {lr for n, lr in by_lr.items() if ".layers.0." in n}
    layer1 = {lr for n, lr in by_lr.items() if ".layers.1." in n}
    assert layer0 == {0.5} and layer1 == {1.0}


def test_no_weight_decay_on_norms_and_biases(tiny):
    model, _ = tiny
    for p in model.parameters():
        p.requires_grad_(True)
    opt = build_optimizer(model, lr=1.0, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            plain = p.ndim < 2 or "norm" in names[id(p)]
            assert group["weight_decay"] == (0.0 if plain else 0.1), names[id(p)]


def test_loop_defaults_are_the_run_configs():
    config_defaults = {n: f.default for n, f in TrainConfig.model_fields.items()}
    shared = [f for f in dataclasses.fields(LoopSettings) if f.name in config_defaults
              and f.default is not dataclasses.MISSING]
    assert len(shared) >= 12
    for f in shared:
        assert f.default == config_defaults[f.name], f.name


def test_sgd_keeps_the_groups_rates_with_momentum(tiny):
    model, _ = tiny
    for p in model.parameters():
        p.requires_grad_(True)
    adam = build_optimizer(model, lr=0.3, weight_decay=0.1, lr_overrides=(("layers.0.", 0.7),))
    sgd = build_optimizer(model, lr=0.3, weight_decay=0.1, lr_overrides=(("layers.0.", 0.7),),
                          kind="sgd")
    assert isinstance(adam, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in sgd.param_groups] == \
        [(g["lr"], g["weight_decay"], len(g["params"])) for g in adam.param_groups]
    assert {g["lr"] for g in sgd.param_groups} == {0.3, 0.7}
    assert all(g["momentum"] == 0.9 for g in sgd.param_groups)


def test_adamw_on_the_cpu_is_fused_and_updates_as_the_loop_does(tiny):
    model, _ = tiny
    for p in model.parameters():
        p.requires_grad_(True)
    fused = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert all(g["fused"] for g in fused.param_groups)
    twin = copy.deepcopy(model)
    loop = build_optimizer(twin, lr=1e-2, weight_decay=0.1)
    for group in loop.param_groups:  # PyTorch's per-parameter loop, its CPU default
        group.update(fused=None, foreach=False)
    start = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    moved = [(p - q).abs().max().item()
             for p, q in zip(model.parameters(), twin.parameters(), strict=True)]
    assert max(moved) < 1e-6
    assert min((p.detach() - s).abs().max().item()
               for p, s in zip(model.parameters(), start, strict=True)) > 1e-3
