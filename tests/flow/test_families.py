"""The pipeline on other architecture families: Qwen2, Mistral, Gemma 3, Phi-3, GPT-NeoX.

One `tunesmith run` per family (LoRA on all linear layers, a few steps) and one with a
classification head, through the CLI; then what the run wrote is checked: the loss fell,
every LoRA tensor moved, the adapters sit on the family's own linear layers (fused ones
included) and not on the head, the merged model gives the adapter model's logits, the model
chats, and the GGUF export round-trips (Mistral, Qwen2, Phi-3, GPT-NeoX: the last through
tunesmith's own reader, transformers' GGUF loader having no gptneox) or is refused with a
message naming the settings llama.cpp would run otherwise (this Gemma 3).
Packing, and the loss's own use of the head (Gemma's soft-capping), are checked on the loss
directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.families import FAMILIES, GGUF_EXPORTS
from tests.helpers import TEST_HOME, review_rows, write_jsonl

# the adapters' modules per family: fused qkv / gate-up layers included, never the head
LORA_TARGETS = {
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
}
SEED = 7


def invoke(*args: str) -> tuple[int, str, str]:
    from tunesmith.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def one_line(text: str) -> str:
    """The console wraps long messages; compare them with the wrapping undone."""
    return " ".join(text.split())


def write_config(folder: Path, base: Path, rows: list, **train: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", rows)
    cfg = {
        "energy": {"enabled": False},
        "name": "fam", "output_dir": str(folder / "run"), "model": {"base": str(base)},
        "data": {"train_file": "train.jsonl", "validation_fraction": 0.15,
                 "test_fraction": 0.1, "max_length": 64},
        "train": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "epochs": 1, "batch_size": 6, "learning_rate": 2e-2, "eval_every": 2,
                  "early_stopping_patience": None, "seed": SEED, **train},
        "eval": {"task": "classification", "labels": ["good", "bad"], "positive_label": "bad",
                 "batch_size": 16, "compare_base": False, "calibration": False,
                 "forgetting": False},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "config.yaml"


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tiny_family_dir, tmp_path_factory):
    """(family, base dir, run dir, stderr) of one finished LoRA run of the family."""
    family = request.param
    base = tiny_family_dir(family)
    folder = tmp_path_factory.mktemp(f"run-{family}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(TEST_HOME))
        mp.setenv("HF_HUB_OFFLINE", "1")
        code, out, err = invoke("run", str(write_config(folder, base, review_rows(40))),
                                "--no-progress")
    assert code == 0, err
    return family, base, folder / "run", out + err


def test_lora_run_trains(family_run):
    family, _, run, log = family_run
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"], evals
    if family == "gemma3":  # Gemma's template has no system role: folded, and said so
        assert "folded into the first user message (data.system_fallback: fold)" in log


def test_lora_targets_the_family_layers_and_every_tensor_moved(family_run):
    from tunesmith.models.load import add_lora, load_model

    family, base, run, _ = family_run
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trained if ".lora_" in k}
    assert targets == LORA_TARGETS[family]
    assert len({k.split(".lora_")[0] for k in trained}) == 2 * len(targets)  # both layers
    # the adapters as the run drew them (train.seed), before training
    torch.manual_seed(SEED)
    start = add_lora(load_model(base), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    initial = {n.replace(".default", ""): p.detach() for n, p in start.named_parameters()
               if p.requires_grad}
    assert set(initial) == set(trained)
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert unchanged == []


def test_merged_model_gives_the_adapter_model_logits(family_run):
    from peft import PeftModel

    from tunesmith.models.load import load, load_model

    _, base, run, _ = family_run
    merged, tokenizer = load(run / "merged")
    adapted = PeftModel.from_pretrained(load_model(base), run / "adapter").eval()
    ids = torch.tensor([tokenizer("great product, works well")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapted(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_the_tuned_model_chats(family_run, cli):
    _, _, run, _ = family_run
    # a system message too: folded into the user turn where the template has no system role
    code, out, err = cli("chat", str(run), "--prompt", "I love it", "--system",
                         "Label the review.", "--max-new-tokens", "8")
    assert code == 0, err
    assert out  # a random model may well answer 8 tokens of white space


def test_gguf_export_round_trips_or_is_refused_by_name(family_run, cli):
    family, _, run, _ = family_run
    code, out, err = cli("export", str(run), "--format", "gguf", "--check", "1")
    err = one_line(err)
    if family in GGUF_EXPORTS:
        assert code == 0, err
        assert (run / "export" / "fam-f16.gguf").is_file()
        assert "same" in (out + err).lower(), out + err
    else:  # this Gemma 3: its head is soft-capped, its layer pattern is not llama.cpp's
        assert family == "gemma3"
        assert code == 2
        assert "llama.cpp's gemma3 architecture fixes in its code" in err
        assert "final_logit_softcapping 30.0" in err and "--format hf" in err
        assert not (run / "export").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_head_trains(family, tiny_family_dir, tmp_path, cli):
    cfg = write_config(tmp_path, tiny_family_dir(family), review_rows(40), head="classifier",
                       learning_rate=3e-3, epochs=2)
    code, out, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    arch = json.loads((run / "merged" / "config.json").read_text())["architectures"]
    assert arch[0].endswith("ForSequenceClassification")
    assert any("score" in k for k in load_file(run / "adapter" / "adapter_model.safetensors"))
    # the new head starts from a random draw and its first steps overshoot; on 5 validation
    # examples the validation loss is noise, so the training loss has to fall
    losses = [json.loads(x)["train_loss"] for x in
              (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert sum(losses[-3:]) < sum(losses[:3]), losses


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_losses_equal_unpacked_and_the_model_logits(family, tiny_family_dir):
    from tunesmith.data.encode import encode_chat
    from tunesmith.data.packing import collate_packed, pack_rows
    from tunesmith.models.load import load
    from tunesmith.training.batches import collate
    from tunesmith.training.loss import TargetLoss

    model, tok = load(tiny_family_dir(family))
    loss = TargetLoss(model.eval())
    # longer than Gemma's 16-token sliding window, so that mask is packed too
    examples = [encode_chat(tok, r["messages"]) for r in review_rows(4)]
    with torch.no_grad():
        alone = [loss(**collate([e], pad_id=tok.pad_token_id)) for e in examples]
        rows = pack_rows(examples, capacity=10_000)
        assert len(rows) == 1
        packed = loss(**collate_packed(rows, pad_id=tok.pad_token_id, multiple=64))
        # the loss runs the head on hidden states itself: it must give the model's own
        # logits (Gemma soft-caps them)
        e = examples[0]
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        expected = F.cross_entropy(logits, torch.tensor(e.labels[1:]), reduction="sum")
    assert packed.n_tokens == sum(a.n_tokens for a in alone)
    assert float(packed.loss_sum) == pytest.approx(sum(float(a.loss_sum) for a in alone),
                                                   rel=1e-5)
    assert float(alone[0].loss_sum) == pytest.approx(float(expected), rel=1e-5)


def test_gemma_refuses_a_system_message_when_told(tiny_family_dir, tmp_path, cli):
    cfg = write_config(tmp_path, tiny_family_dir("gemma3"), review_rows(12))
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["system_fallback"] = "refuse"
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = cli("run", str(cfg), "--no-progress")
    err = one_line(err)
    assert code == 2
    assert "the model's chat template has no system role, and " in err
    assert "set data.system_fallback: fold" in err
    assert "train.jsonl line 1: messages[0]: system_role_unsupported" in err


def test_gemma_names_the_lines_whose_roles_do_not_alternate(tiny_family_dir, tmp_path, cli):
    rows = [{"messages": r["messages"][1:]} for r in review_rows(12)]
    rows[0]["messages"].insert(1, {"role": "user", "content": "and another thing"})
    cfg = write_config(tmp_path, tiny_family_dir("gemma3"), rows)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].update(validation_file="valid.jsonl", test_file="valid.jsonl")
    write_jsonl(tmp_path / "valid.jsonl", rows[6:])
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = cli("run", str(cfg), "--no-progress")
    err = one_line(err)
    assert code == 2
    assert "train: the model's chat template cannot be trained on 1 example(s)" in err
    assert "train.jsonl line 1: messages: template_error: the model's chat template refuses " \
        "this conversation (Conversation roles must alternate" in err
    assert "its roles are user, user, assistant" in err
