"""The FSDP helpers that need no second process (the two-process runs: tests/flow/test_fsdp.py)."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from tunesmith.errors import TrainingError
from tunesmith.training.sharding import is_fsdp, unshard, wrap_layers_of


def _accelerator(kind, version=2, names=None):
    plugin = SimpleNamespace(fsdp_version=version, transformer_cls_names_to_wrap=names)
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=plugin))


def test_only_fsdp2_counts_as_sharded_and_fsdp1_is_refused_with_what_to_change():
    assert not is_fsdp(_accelerator(DistributedType.MULTI_GPU))
    assert is_fsdp(_accelerator(DistributedType.FSDP))
    with pytest.raises(TrainingError, match="fsdp_version: 2"):
        is_fsdp(_accelerator(DistributedType.FSDP, version=1))


def test_each_decoder_layer_is_a_unit_unless_the_config_names_the_classes():
    model = SimpleNamespace(_no_split_modules=["LlamaDecoderLayer"])
    acc = _accelerator(DistributedType.FSDP)
    wrap_layers_of(acc, model)
    assert acc.state.fsdp_plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    named = _accelerator(DistributedType.FSDP, names=["MyLayer"])
    wrap_layers_of(named, model)
    assert named.state.fsdp_plugin.transformer_cls_names_to_wrap == ["MyLayer"]


def test_a_plain_module_is_left_as_it_is_by_unshard():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    before = list(model.parameters())
    unshard(model)
    assert list(model.parameters()) == before and type(model) is torch.nn.Sequential


def test_the_fsdp2_plugin_exists_in_this_accelerate():
    assert FullyShardedDataParallelPlugin(fsdp_version=2).fsdp_version == 2
