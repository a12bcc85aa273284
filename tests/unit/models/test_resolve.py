from pathlib import Path

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


def test_importers_of_one_gguf_at_once_take_turns(tmp_path, tiny_model_dir):
    """The first imports; the others wait on the lock and use its import (before the lock,
    one importer deleted the directory another had just imported and was loading). Threads
    stand in for processes: the lock is a lock file, which they contend for alike."""
    import threading

    from tunesmith.models.export import export_gguf
    from tunesmith.models.load import load

    gguf = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", tensor_type="f32",
                       name="tiny").path
    found: list[tuple[Path, int]] = []
    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def use() -> None:
        try:
            go.wait()
            path = resolve_model(str(gguf), home=tmp_path / "home")
            load(path)
            found.append((path, path.stat().st_ino))
        except BaseException as err:  # reported by the test's thread
            errors.append(err)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    # one import: both loaded the same directory (the same inode), not one that the other
    # then replaced with its own import
    assert len(set(found)) == 1, found
    imported = found[0][0]
    assert (imported / "config.json").is_file()
    # nothing half-written is left beside it, only the lock file
    assert sorted(p.name for p in imported.parent.iterdir()) == \
        sorted([imported.name, f".{imported.name}.lock"])
