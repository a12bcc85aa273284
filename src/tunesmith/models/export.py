"""Export a tuned model: a GGUF file for llama.cpp and Ollama, or a clean Hugging Face directory.

The GGUF writer follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2Model``,
``Phi3MiniModel``, ``Gemma3Model`` and ``GPTNeoXModel``), so the file loads in llama.cpp and back
through transformers' GGUF loader, the one ``tunesmith.models.resolve.import_gguf`` imports the
bundled model with (a gptneox file, which that loader does not know, through
``models.gguf_neox``):

- tensor names from gguf's own name map (``blk.N.attn_q.weight``, ...); Phi-3's fused
  ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``, ``ffn_up``), as llama.cpp reads them;
  GPT-NeoX's fused ``query_key_value`` too, its rows regrouped as llama.cpp splits them;
- q and k projections permuted the way llama.cpp's llama architecture lays out rotary halves
  (``permute``); qwen2, phi3 and gemma3 rotate halves as Hugging Face does and keep its order;
- Gemma's norms are stored as ``1 + weight`` (llama.cpp multiplies by the stored value; Gemma's
  RMSNorm scales by ``1 + weight``);
- tied embeddings write no ``output.weight``: llama.cpp (and transformers) then use
  ``token_embd.weight`` for the head;
- 1-D tensors (norms) and biases stay f32; matrices become f16 or q8_0, and a matrix whose rows
  are not whole q8_0 blocks of 32 falls back to f16, as llama.cpp does;
- the tokenizer is the one the run trained with (``models.load.load_tokenizer``: its chat
  template, its pad token), as llama.cpp's byte-level BPE ("gpt2") or sentencepiece ("llama")
  vocabulary (``models.gguf_vocab``).

What llama.cpp fixes in its code rather than reading from the file (Gemma 3's pattern of one
full-attention layer in six and its local rotary base, its attention scale, Gemma 2's soft
caps it no longer applies; GPT-NeoX's GELU) is checked before anything is written: a model
that differs is refused with the setting that differs, never exported to answer differently.

Files are written to a temporary name in the target directory and renamed when complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.errors import ModelError
from tunesmith.models import gguf_neox
from tunesmith.models.gguf_layout import (
    FIXED_IN_CODE,
    GGUF_LAYOUTS,
    SUPPORTED_ARCHITECTURES,
    Layout,
    add_parameters,
    as_llama_cpp,
    ropes,
    sliding_window,
)
from tunesmith.models.gguf_vocab import Vocabulary, add_tokenizer, vocabulary
from tunesmith.models.load import LOCAL_CODE

TENSOR_TYPES = ("f32", "f16", "q8_0")
# What a clean Hugging Face directory holds besides the tokenizer, which is written afresh.
# calibration.json (a few hundred bytes) stays: it is the temperature that turns this model's
# label scores into calibrated probabilities, fitted for these very weights; transformers
# ignores it, and without it nobody can reproduce the run's reported confidences.
HF_FILES = ("config.json", "generation_config.json", "calibration.json")
HF_WEIGHT_GLOBS = ("model*.safetensors", "model.safetensors.index.json")

@dataclass(frozen=True)
class Written:
    """An exported file or directory: where, how many bytes, which tensor type."""

    path: Path
    bytes: int
    tensor_type: str
    tensor_types: dict[str, int]  # GGML type name -> tensor count (GGUF only)


def readable(path: Path) -> None:
    """Give a file or directory made by ``tempfile`` (private: 0600 / 0700) the permissions an
    ordinary one gets, so Ollama's service user, say, can read the export."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def model_architecture(model_dir: Path) -> str:
    """The class a model directory's ``config.json`` names (``LlamaForCausalLM``)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}: cannot read config.json ({err})") from err
    return (config.get("architectures") or [config.get("model_type", "unknown")])[0]


def check_gguf_exportable(model_dir: Path) -> None:
    """A ``ModelError`` saying why ``model_dir`` cannot become a GGUF file, or nothing."""
    _check_architecture(model_dir)
    _gguf_inputs(model_dir)


def _check_architecture(model_dir: Path) -> None:
    arch = model_architecture(model_dir)
    if arch.endswith("ForSequenceClassification"):
        raise ModelError(f"{model_dir} is a {arch}: its classification head (score) has no "
                         "place in llama.cpp's llama architecture, which ends in a vocabulary "
                         "head; export it with --format hf, or train with train.head: lm")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{model_dir}: GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}"
                         " (llama.cpp's llama, qwen2, phi3, gemma3 and gptneox architectures); "
                         f"this model is {arch}. "
                         "Export it with --format hf, or convert it with llama.cpp's "
                         "convert_hf_to_gguf.py")


def _gguf_inputs(model_dir: Path) -> tuple[Any, Any, Vocabulary]:
    """Configuration, tokenizer and GGUF vocabulary, or a ``ModelError`` before anything is
    written."""
    from tunesmith.models.load import load_tokenizer

    config = _config(model_dir)
    layout = GGUF_LAYOUTS[model_architecture(model_dir)]
    for rope in ropes(config).values():
        if rope.get("rope_type", "default") != "default":
            raise ModelError(f"{model_dir}: rope scaling {rope.get('rope_type')!r} is not "
                             "supported by the GGUF export (plain rotary embeddings only); use "
                             "--format hf")
    window = sliding_window(config)
    if layout.arch in ("LLAMA", "QWEN2"):
        if window is not None and window < config.max_position_embeddings:
            raise ModelError(f"{model_dir}: a sliding attention window ({window} tokens) is not "
                             "supported by the GGUF export (llama.cpp's llama architecture "
                             "attends to the whole context); use --format hf")
    elif layout.arch in FIXED_IN_CODE:
        differences = FIXED_IN_CODE[layout.arch](config)
        if differences:
            raise ModelError(f"{model_dir}: llama.cpp's {layout.arch.lower()} architecture fixes "
                             "in its code what this model sets otherwise: "
                             + "; ".join(differences)
                             + ". The GGUF file would answer differently; use --format hf")
    tokenizer = load_tokenizer(model_dir)
    return config, tokenizer, vocabulary(tokenizer, config.vocab_size)


def export_gguf(model_dir: Path, target: Path, *, tensor_type: str = "f16",
                name: str | None = None) -> Written:
    """Write the model in ``model_dir`` as one GGUF file at ``target``."""
    import gguf

    if tensor_type not in TENSOR_TYPES:
        raise ModelError(f"tensor type {tensor_type!r}: one of {', '.join(TENSOR_TYPES)}")
    _check_architecture(model_dir)
    config, tokenizer, vocab = _gguf_inputs(model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    layout = GGUF_LAYOUTS[model_architecture(model_dir)]
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[layout.arch]])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        writer.add_file_type(_FILE_TYPES[tensor_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_parameters(writer, config, layout)
        add_tokenizer(writer, tokenizer, vocab)
        counts: dict[str, int] = {}
        for gguf_name, array in _tensors(model_dir, config, layout):
            data, qtype = _encode(gguf_name, array, tensor_type)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        readable(tmp)
        os.replace(tmp, target)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return Written(target, target.stat().st_size, tensor_type, counts)


def export_hf(model_dir: Path, target: Path) -> Written:
    """A standalone Hugging Face directory at ``target``: config, safetensors weights,
    generation config, and the tokenizer with the chat template the run trained with."""
    from tunesmith.models.load import load_tokenizer

    weights = sorted({p for pattern in HF_WEIGHT_GLOBS for p in model_dir.glob(pattern)})
    if not any(p.suffix == ".safetensors" for p in weights):
        raise ModelError(f"{model_dir}: no safetensors weights (model.safetensors) to export")
    tokenizer = load_tokenizer(model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for path in [*weights, *(model_dir / f for f in HF_FILES)]:
            if path.is_file():  # the contents only: an ordinary file's permissions
                shutil.copyfile(path, tmp / path.name)
        tokenizer.save_pretrained(tmp)
        readable(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    dtype = json.loads((target / "config.json").read_text()).get("dtype", "float32")
    return Written(target, size, str(dtype), {})


def load_gguf(path: Path) -> tuple[Any, Any]:
    """``read_gguf``'s model (in eval mode) and tokenizer, with a pad token (the end-of-text
    one where the file names none), ready to run."""
    model, tokenizer = read_gguf(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def read_gguf(path: Path) -> tuple[Any, Any]:
    """Model and tokenizer of a GGUF file, through transformers' GGUF loader (dequantised), with
    the settings llama.cpp derives that the loader leaves at its defaults (``as_llama_cpp``);
    a gptneox file, which that loader does not know, through ``models.gguf_neox``. What
    ``tunesmith.models.resolve`` imports a base model with, and what the export check reads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # the GGUF loader draws its own tqdm bar, deaf to transformers' switch: keep it off the
    # screen whenever the caller (the command line) turned progress bars off
    quiet = contextlib.nullcontext() if hf_logging.is_progress_bar_enabled() else \
        contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            if gguf_neox.file_architecture(path) == gguf_neox.ARCH:  # no loader: by hand
                config, weights, tokenizer = gguf_neox.read_gptneox(path)
                model = _built(config, weights)
            else:
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             **LOCAL_CODE)
                config = as_llama_cpp(model.config, path)
                if config is not None:  # built again, as llama.cpp runs the file: the settings
                    # change no weight's shape, so the weights read once move over (reading and
                    # dequantising the file a second time cost as long as the first)
                    model = _built(config, model.state_dict(), dtype=model.dtype)
    except Exception as err:  # transformers raises many kinds here
        raise ModelError(f"{path}: cannot read this GGUF file ({err})") from err
    return model, tokenizer


def _built(config: Any, weights: dict[str, Any], dtype: Any = None) -> Any:
    """A model of ``config`` holding ``weights``, left uninitialised before they are loaded (a
    random init of every weight would be overwritten)."""
    from transformers import AutoModelForCausalLM

    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(weights)
    return model


def _no_init_weights() -> Any:
    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


# ----------------------------------------------------------------------------- metadata


def _config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as err:
        raise ModelError(f"{model_dir}: cannot read the model configuration ({err})") from err


# ----------------------------------------------------------------------------- tensors


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rows of each head from HF's [first half | second
    half] rotary layout to llama.cpp's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensors(model_dir: Path, config: Any, layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every weight, in llama.cpp's layout for ``layout``."""
    import gguf
    from safetensors import safe_open

    arch = gguf.MODEL_ARCH[layout.arch]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no safetensors weights (model.safetensors) to export")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if hf_name.endswith(".rotary_emb.inv_freq"):
                    continue  # recomputed from rope.freq_base
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ModelError(f"{file}: tensor {hf_name} has no llama.cpp name in its "
                                     f"{arch.name.lower()} architecture")
                if gguf_name == "output.weight" and config.tie_word_embeddings:
                    continue  # tied: llama.cpp reads the head from token_embd (gptneox:
                    # from output.weight alone, written again from it by gguf_neox)
                array = f.get_tensor(hf_name).float().numpy()
                if layout.arch == "GPTNEOX":
                    yield from gguf_neox.gptneox_tensors(gguf_name, hf_name, array, config)
                    continue
                if layout.interleaved_rope and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    array = permute(array, n_head, n_head)
                elif layout.interleaved_rope and hf_name.endswith(("k_proj.weight",
                                                                   "k_proj.bias")):
                    array = permute(array, n_head, n_kv)
                elif layout.norm_offset and hf_name.endswith("norm.weight"):
                    array = array + np.float32(layout.norm_offset)
                yield gguf_name, array
    if layout.arch == "GPTNEOX":
        yield from gguf_neox.absent_biases(config)


def _ggml_types() -> dict[str, Any]:
    import gguf

    q = gguf.GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "q8_0": q.Q8_0}


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType ALL_F32, MOSTLY_F16, _Q8_0


def _encode(gguf_name: str, array: np.ndarray, tensor_type: str) -> tuple[np.ndarray, Any]:
    """The tensor's bytes and GGML type, chosen as llama.cpp's ``prepare_tensors`` does."""
    import gguf
    from gguf.quants import QuantError, quantize

    q = gguf.GGMLQuantizationType
    qtype = _ggml_types()[tensor_type]
    if array.ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        qtype = q.F32  # norms and biases: small, and precision-sensitive
    if qtype == q.Q8_0:
        try:
            return quantize(array, q.Q8_0), q.Q8_0
        except QuantError:  # rows not a whole number of 32-value blocks
            qtype = q.F16
    return quantize(array, qtype), qtype
