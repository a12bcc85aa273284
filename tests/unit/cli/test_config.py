"""`tunesmith config init`: the commented defaults it writes."""

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
