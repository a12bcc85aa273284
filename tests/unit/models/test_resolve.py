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
    one process deleted the directory another had just imported and was loading). Processes,
    not threads: transformers' loading patches process-wide state that threads loading at
    once leave broken for every later model of the process."""
    import subprocess
    import sys

    from tunesmith.models.export import export_gguf

    gguf = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", tensor_type="f32",
                       name="tiny").path
    code = ("import sys; from pathlib import Path\n"
            "from tunesmith.models.resolve import resolve_model\n"
            "from tunesmith.models.load import load\n"
            "path = resolve_model(sys.argv[1], home=Path(sys.argv[2]))\n"
            "load(path)\n"
            "print(path, path.stat().st_ino)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(gguf), str(tmp_path / "home")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    found = {out.strip() for out, _ in outs}
    # one import: both loaded the same directory (the same inode), not one that the other
    # then replaced with its own import
    assert len(found) == 1, found
    imported = Path(found.pop().rsplit(" ", 1)[0])
    assert (imported / "config.json").is_file()
    # nothing half-written is left beside it, only the lock file
    assert sorted(p.name for p in imported.parent.iterdir()) == \
        sorted([imported.name, f".{imported.name}.lock"])
