"""`tunesmith export` end to end: a finished tiny run exported as GGUF and as a Hugging Face
directory through the CLI, and every bad input refused with one message and nothing written."""

import json
import shutil

import pytest
import yaml

from tests.helpers import SYSTEM


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """One finished tiny run (classification through the LM head) the tests export."""
    from typer.testing import CliRunner

    from tests.helpers import review_rows, write_jsonl
    from tunesmith.cli import app

    tmp = tmp_path_factory.mktemp("export")
    write_jsonl(tmp / "train.jsonl", review_rows(80))
    cfg = {
        "energy": {"enabled": False},  # codecarbon costs seconds per phase
        "name": "tiny", "output_dir": str(tmp / "run"), "model": {"base": str(tiny_model_dir)},
        "data": {"train_file": "train.jsonl", "max_length": 128},
        "train": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "epochs": 2, "batch_size": 8,
                  "learning_rate": 2e-2, "eval_every": 10, "early_stopping_patience": None,
                  "seed": 7},
        "eval": {"task": "classification", "labels": ["good", "bad"], "positive_label": "bad",
                 "compare_base": False, "forgetting": False},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(tmp / "config.yaml"), "--no-progress"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tmp / "run"


def copy_run(run_dir, dst):
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("checkpoints", "export"))
    return dst


def test_gguf_export_with_check(cli, run_dir):
    code, out, err = cli("export", str(run_dir), "--format", "gguf", "--quantize", "f16",
                         "--check", "8", "--json")
    assert code == 0, err
    result = json.loads(out)
    path = run_dir / "export" / "tiny-f16.gguf"
    assert result["path"] == str(path) and path.is_file()
    assert result["bytes"] == path.stat().st_size and result["tensor_type"] == "f16"
    assert result["seconds"] > 0
    check = result["check"]
    assert check["n"] == 8 and check["compared"] == "label"
    assert check["agreement"] == check["same"] / 8 >= 0.75
    assert check["same_tokenization"] == 4 and check["max_logit_diff"] < 0.5
    modelfile = (run_dir / "export" / "tiny-f16.Modelfile").read_text()
    assert result["modelfile"] == str(run_dir / "export" / "tiny-f16.Modelfile")
    assert "FROM ./tiny-f16.gguf\n" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert f'SYSTEM """{SYSTEM}"""' in modelfile  # every training example shares it
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "PARAMETER temperature 0" in modelfile


def test_gguf_default_name_no_check_and_overwrite(cli, run_dir):
    code, out, err = cli("export", str(run_dir), "--format", "gguf", "--quantize", "q8_0",
                         "--check", "0")
    assert code == 0, err
    path = run_dir / "export" / "tiny-q8_0.gguf"
    assert path.is_file() and "check on" not in out
    assert f"wrote {path}" in out and "ollama create tiny-q8_0" in out
    code, _, err = cli("export", str(run_dir), "--format", "gguf", "--quantize", "q8_0",
                       "--check", "0")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, err = cli("export", str(run_dir), "--format", "gguf", "--quantize", "q8_0",
                       "--check", "0", "--overwrite")
    assert code == 0, err
    leftovers = [p.name for p in (run_dir / "export").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_hf_export(cli, run_dir, tmp_path):
    target = tmp_path / "hf"
    code, out, err = cli("export", str(run_dir), "--format", "hf", "-o", str(target),
                         "--check", "4")
    assert code == 0, err
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json", "calibration.json"} <= names
    assert not any(n.startswith("adapter") for n in names)
    assert "the same label as the merged model on 4 (100.0%)" in out
    assert "max |logit difference| 0.0000" in out


def test_classification_head_run_exports_hf(cli, make_config, tmp_path):
    cfg = make_config(train={"head": "classifier", "epochs": 1},
                      eval={"compare_base": False, "forgetting": False})
    code, _, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = cli("export", str(run), "--format", "gguf")
    assert code == 2 and "classification head" in err and "--format hf" in err
    assert not (run / "export").exists()
    code, out, err = cli("export", str(run), "--format", "hf", "--check", "4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["check"]["agreement"] == 1.0 and result["check"]["max_prob_diff"] == 0.0
    config = json.loads((run / "export" / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_yaml(path, section, **changes):
    data = yaml.safe_load(path.read_text())
    data[section].update(changes)
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(("case", "args", "message"), [
    ("not a run", ["--format", "gguf"], "not a finished run (missing merged/config.json)"),
    ("missing", ["--format", "gguf"], "no such run directory"),
    ("ok", ["--format", "onnx"], "unknown export format 'onnx'"),
    ("ok", ["--format", "hf", "--quantize", "q8_0"], "--quantize is for --format gguf"),
    ("ok", ["--format", "gguf", "--quantize", "q4_k"], "--quantize 'q4_k': one of"),
    ("ok", ["--format", "gguf", "--check", "-1"], "--check -1"),
    ("ok", ["--format", "gguf", "-o", "{tmp}/model.bin"], "ending in .gguf"),
    ("ok", ["--format", "gguf", "-o", "{tmp}/exists.gguf"], "already exists"),
    ("ok", ["--format", "hf", "-o", "{tmp}/exists.gguf"], "already exists"),
    ("falcon", ["--format", "gguf"], "this model is FalconForCausalLM"),
    ("head", ["--format", "gguf"], "trained a classification head"),
])
def test_bad_input_is_refused_and_nothing_written(cli, run_dir, tmp_path, case, args, message):
    if case == "not a run":  # a run that never finished: no merged model
        shutil.rmtree(copy_run(run_dir, tmp_path / "src") / "merged")
    elif case == "missing":
        pass
    elif case == "ok":
        copy_run(run_dir, tmp_path / "src")
    else:
        copy_run(run_dir, tmp_path / "src")
        if case == "falcon":  # an architecture the GGUF export does not write
            _edit_json(tmp_path / "src" / "merged" / "config.json",
                       architectures=["FalconForCausalLM"])
        else:
            _edit_yaml(tmp_path / "src" / "config.yaml", "train", head="classifier")
    (tmp_path / "exists.gguf").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = cli("export", str(tmp_path / "src"),
                         *[a.format(tmp=tmp_path) for a in args])
    assert code == 2, out + err
    # one message (rich may wrap it to the terminal's width), no traceback
    assert message in " ".join(err.split()) and err.startswith("error: ")
    assert "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "exists.gguf").read_text() == "keep me"
