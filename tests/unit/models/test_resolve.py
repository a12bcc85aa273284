import pytest

from tunesmith.errors import ModelError
from tunesmith.models.resolve import resolve_model


def test_unknown_model_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelError) as exc:
        resolve_model("no-such-model", home=tmp_path)
    text = str(exc.value)
    assert "unknown model 'no-such-model'" in text
    assert "bundled model name (known: smollm2-135m-instruct)" in text
    assert "local .gguf file" in text and "Hub id" in text


def test_missing_paths_and_empty_dirs(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "x.gguf"), home=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no model"):
        resolve_model(str(tmp_path / "empty"), home=tmp_path)


def test_local_dir_and_run_dir(tmp_path, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir), home=tmp_path) == tiny_model_dir


def test_bundled_model_is_imported_as_plain_safetensors(bundled_dir):
    import json

    config = json.loads((bundled_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert list(bundled_dir.glob("*.safetensors"))
    assert (bundled_dir / "tokenizer.json").is_file()


def test_locate_finds_the_bundled_gguf_without_importing_it(tmp_path, bundled_dir):
    from tunesmith.models.resolve import locate_model

    # an empty home: the bundled model is not imported there, so its GGUF file is returned
    found = locate_model("smollm2-135m-instruct", home=tmp_path)
    assert found.suffix == ".gguf" and found.is_file()
    assert not (tmp_path / "models").exists()
    assert locate_model("smollm2-135m-instruct", home=bundled_dir.parents[1]) == bundled_dir
