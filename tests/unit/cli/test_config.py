"""`tunesmith config init|check`: the commented defaults it writes; the memory estimate."""

import yaml

from tunesmith.cli.config import default_config_text
from tunesmith.config import RunConfig, TrainConfig, load_config


def test_config_init_text_is_commented_and_loads(tmp_path):
    text = default_config_text("train.jsonl")
    assert "# Peak learning rate." in text
    data = yaml.safe_load(text)
    assert RunConfig.model_validate(data).train.epochs == "auto"
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.data.train_file == tmp_path / "train.jsonl"


def test_every_field_is_written_under_its_description():
    # the descriptions in tunesmith.config are the only documentation: none may go missing
    lines = default_config_text().splitlines()
    for name, field in TrainConfig.model_fields.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {name}:"))
        assert lines[at - 1] == f"  # {field.description}"


def test_config_init_for_dpo_writes_a_loadable_preference_config(tmp_path, cli):
    path = tmp_path / "dpo.yaml"
    code, out, err = cli("config", "init", str(path), "--objective", "dpo")
    assert code == 0, err
    text = path.read_text()
    assert "preferred_output" in text and "prompt" in text  # both formats shown
    cfg = load_config(path)
    assert cfg.train.objective == "dpo" and cfg.train.preference.beta == "auto"
    code, out, err = cli("config", "init", str(tmp_path / "x.yaml"), "--objective", "dpx")
    assert code == 2 and "sft, dpo, ipo, simpo, orpo" in out + err


def test_check_prints_the_memory_estimate(cli, make_config):
    code, out, err = cli("config", "check", str(make_config()))
    assert code == 0, err
    line = next(x for x in out.splitlines() if "estimated peak memory" in x)
    assert line.startswith("# estimated peak memory for training: ")
    for part in ("weights", "adapters/trainable", "gradients+optimizer", "activations",
                 "runtime"):
        assert part in line
    assert yaml.safe_load(out)["train"]["method"] == "lora"  # still a loadable config


def test_check_says_when_the_model_is_unknown(cli, make_config):
    code, out, err = cli("config", "check", str(make_config(model={"base": "no-such-model"})))
    assert code == 0, err
    assert "# estimated peak memory for training: unknown (unknown model 'no-such-model'" in out
