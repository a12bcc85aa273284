"""QLoRA (``train.quantize_base: nf4``): refused where there is no CUDA GPU, before anything is
read or written; on a GPU with bitsandbytes, a run trains LoRA on the 4-bit base and merges the
adapters into the unquantised weights."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tunesmith.config import parse_config


def _cuda_and_bitsandbytes() -> str | None:
    if not torch.cuda.is_available():
        return "QLoRA's 4-bit kernels (bitsandbytes) run on CUDA only; this machine has no GPU"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install 'tunesmith[qlora]')"
    return None


@pytest.mark.parametrize("train", [{"method": "full"}, {"head": "classifier"}])
def test_a_4bit_base_trains_lora_adapters_only(make_config, train):
    raw = yaml.safe_load(make_config(train={"quantize_base": "nf4", **train}).read_text())
    with pytest.raises(Exception) as err:
        parse_config(raw)
    assert "train.quantize_base: nf4 trains LoRA adapters on a 4-bit base" in str(err.value)
    assert "quantize_base: none" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_is_refused_without_a_gpu_before_anything_is_written(make_config, cli, tmp_path):
    code, _, err = cli("run", str(make_config(train={"quantize_base": "nf4"})), "--no-progress")
    err = " ".join(err.split())
    assert code == 2, err
    assert "train.quantize_base: nf4 (QLoRA) needs a CUDA GPU" in err
    assert "Set train.quantize_base: none" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(_cuda_and_bitsandbytes() is not None,
                    reason=_cuda_and_bitsandbytes() or "")
def test_qlora_trains_on_the_4bit_base_and_merges_into_the_full_weights(make_config, cli,
                                                                         tmp_path):
    from peft import PeftModel

    from tunesmith.models.load import load, load_model, stored_dtype

    cfg = make_config(train={"quantize_base": "nf4", "precision": "bf16", "epochs": 2})
    code, _, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"]
    merged_config = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config  # a plain model, loadable anywhere
    # the adapters trained over the 4-bit base go onto the base as stored (fp32 here), so the
    # merged model is that base with the adapters, compared in fp32 as the CPU merge test does
    # (tests/unit/models/test_merge_precision.py). In bf16 two roundings of the same sums
    # differ by a few units in the last place of logits of this size: on an H200, 0.14 at most
    assert stored_dtype(run / "merged") == "float32"
    merged, tok = load(run / "merged", dtype="float32")
    adapted = PeftModel.from_pretrained(
        load_model(yaml.safe_load(cfg.read_text())["model"]["base"], dtype="float32"),
        run / "adapter").eval()
    ids = torch.tensor([tok("great product, works well")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapted(ids).logits,
                                   rtol=1e-4, atol=1e-4)
