"""The GGUF files tunesmith writes, run by llama.cpp itself (through llama-cpp-python).

The other GGUF tests read the files back with gguf's reader and transformers (or tunesmith's
own GPT-NeoX reader): they show the file holds what was written, not that llama.cpp computes
the same model from it. Here llama.cpp loads each file, tokenises with the vocabulary and
pre-tokenizer the file names, and computes logits for every position of a chat prompt, which
must match the Hugging Face model's: f32 files to float rounding, f16 within 1% of the largest
logit. Tiny random models of each family tunesmith exports (Llama, Mistral, Qwen2, Phi-3,
GPT-NeoX; 2 layers, hidden 64, the real 49,152-token tokenizer); the bundled SmolLM2 in f16
and q8_0 in the slow test.

llama-cpp-python compiles llama.cpp when installed (`make llama-cpp`, about 30 minutes on 2
cores); without it these tests are skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (`make llama-cpp` builds it)")

from tunesmith.models.export import export_gguf  # noqa: E402
from tunesmith.models.load import load, load_tokenizer  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gpt_neox")
CHAT = [{"role": "system", "content": "Classify the SMS message as spam or ham."},
        {"role": "user", "content": "WINNER!! Call 09061701461 now to claim £1000. "
                                    "日本語 🚀 émojis\tand  spaces"},
        {"role": "assistant", "content": "spam"}]


def family_dir(family: str, tiny_model_dir: Path, tiny_family_dir) -> Path:
    return tiny_model_dir if family == "llama" else tiny_family_dir(family)


def prompt_text(model_dir: Path) -> str:
    return load_tokenizer(model_dir).apply_chat_template(CHAT, tokenize=False)


@contextmanager
def in_llama_cpp(path: Path) -> Iterator[Any]:
    """The file loaded by llama.cpp, logits kept for every position, the KV cache in f32
    (llama.cpp's default f16 cache alone moves logits by about 0.2% of the largest)."""
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True,
                          n_threads=2, verbose=False, type_k=f32, type_v=f32)
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids``, from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def run_in_llama_cpp(path: Path, text: str) -> tuple[list[int], np.ndarray]:
    """llama.cpp's token ids for ``text`` (special tokens parsed, no BOS added) and its
    logits at every position."""
    with in_llama_cpp(path) as llm:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids, llama_cpp_logits(llm, ids)


@torch.no_grad()
def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    model, _ = load(model_dir)
    return model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenises_and_computes_as_transformers(family, tiny_model_dir,
                                                          tiny_family_dir, tmp_path) -> None:
    model_dir = family_dir(family, tiny_model_dir, tiny_family_dir)
    path = tmp_path / f"{family}-f32.gguf"
    # llama.cpp picks Phi-3's SentencePiece token fixes by the model's name ("phi3" in it), and
    # these tiny models speak SmolLM2's BPE vocabulary, which has none of those tokens
    export_gguf(model_dir, path, tensor_type="f32", name="tiny")
    text = prompt_text(model_dir)
    ids, ours = run_in_llama_cpp(path, text)
    assert ids == load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"]
    theirs = hf_logits(model_dir, ids)
    assert ours.shape == theirs.shape
    scale = float(np.abs(theirs).max())
    worst = float(np.abs(ours - theirs).max())
    assert worst <= 1e-3 * scale, family
    # the same next token wherever the top two are further apart than the differences
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * worst
    assert clear.sum() >= len(ids) // 2
    assert (ours.argmax(-1) == theirs.argmax(-1))[clear].all()


def test_f16_file_stays_within_one_percent(tiny_model_dir, tmp_path) -> None:
    path = tmp_path / "llama-f16.gguf"
    export_gguf(tiny_model_dir, path, tensor_type="f16")
    text = prompt_text(tiny_model_dir)
    ids, ours = run_in_llama_cpp(path, text)
    theirs = hf_logits(tiny_model_dir, ids)
    assert float(np.abs(ours - theirs).max()) <= 0.01 * float(np.abs(theirs).max())


@pytest.mark.slow
@pytest.mark.parametrize("tensor_type", ["f16", "q8_0"])
def test_the_bundled_model_in_llama_cpp(tensor_type, bundled_dir, tmp_path) -> None:
    """SmolLM2-135M-Instruct as llama.cpp runs it: the same tokens, the same next token at
    (nearly) every position of the prompt, logits close (measured: f16 0.17% of the largest
    logit, q8_0 5.1%, since llama.cpp also rounds the activations to 8 bits for a q8_0
    product; the next token agreed at 98.6% and 91.7% of the 72 positions)."""
    path = tmp_path / f"smollm2-{tensor_type}.gguf"
    export_gguf(bundled_dir, path, tensor_type=tensor_type)
    text = prompt_text(bundled_dir)
    ids, ours = run_in_llama_cpp(path, text)
    assert ids == load_tokenizer(bundled_dir)(text, add_special_tokens=False)["input_ids"]
    theirs = hf_logits(bundled_dir, ids)
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    worst = float(np.abs(ours - theirs).max()) / float(np.abs(theirs).max())
    assert agree >= (0.95 if tensor_type == "f16" else 0.9), agree
    assert worst <= (0.005 if tensor_type == "f16" else 0.08), worst


@pytest.mark.parametrize(("style", "family"), [("llama2", "llama"), ("llama2", "phi3"),
                                               ("gemma", "gemma3")])
def test_sentencepiece_vocabularies_split_text_in_llama_cpp_as_the_tokenizer(
        style, family, tmp_path) -> None:
    """Llama 2 / Mistral 7B / Phi-3 / Gemma keep sentencepiece vocabularies, which tunesmith
    writes as llama.cpp's "llama" vocabulary with scores derived from the merges. llama.cpp
    itself splits text as the tokenizer does (leading spaces, tabs, byte fallback for CJK and
    emoji, words only covered in parts), and computes the same logits; the Gemma 3 is the one
    llama.cpp's gemma3 runs as transformers does (both layers sliding, no soft caps)."""
    from tests.unit.models.test_export import (
        NOVEL,
        PROMPTS,
        TEXTS,
        sentencepiece_model,
        sentencepiece_tokenizer,
    )

    tokenizer = sentencepiece_tokenizer(style)
    model = sentencepiece_model(family, tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    path = tmp_path / "m.gguf"
    export_gguf(tmp_path / "m", path, tensor_type="f32", name="tiny")

    with in_llama_cpp(path) as llm, torch.no_grad():
        for text in TEXTS + NOVEL:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode("utf-8"), add_bos=False) == expected, text
        worst = scale = 0.0
        for text in PROMPTS:
            ids = tokenizer(text)["input_ids"]  # with <s>, as the model is run
            ours = llama_cpp_logits(llm, ids)
            theirs = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            worst = max(worst, float(np.abs(ours - theirs).max()))
            scale = max(scale, float(np.abs(theirs).max()))
    assert worst <= 1e-3 * scale, (worst, scale)
