"""Shared fixtures: a test home for imported models, the real tokenizer, a tiny random Llama."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import TEST_HOME, review_rows, write_jsonl


@pytest.fixture(scope="session")
def test_home() -> Path:
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    return TEST_HOME


@pytest.fixture(autouse=True)
def _isolated_home(monkeypatch: pytest.MonkeyPatch, test_home: Path) -> None:
    # The CLI resolves TUNESMITH_HOME at the edge; point it at the test cache.
    monkeypatch.setenv("TUNESMITH_HOME", str(test_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def bundled_dir(test_home: Path) -> Path:
    """The bundled SmolLM2-135M-Instruct, imported once from its GGUF into the test home."""
    from tunesmith.models.resolve import resolve_model

    return resolve_model("smollm2-135m-instruct", home=test_home)


@pytest.fixture(scope="session")
def tokenizer(bundled_dir: Path):
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer(bundled_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A random Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer, saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        # a wide init lets the tied head reach confident logits, so the loss can really fall
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir: Path):
    """The tiny model (eval mode) and its tokenizer, loaded once per test module."""
    from tunesmith.models.load import load

    model, tokenizer = load(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Callable[[str], Path]:
    """``tiny_family_dir(family)``: a random model of that family (``tests.families``), 2
    layers, hidden 64, with the real tokenizer (and the family's chat template), built once."""
    from tests.families import build_family

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, tokenizer,
                                         tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture
def make_config(tmp_path: Path, tiny_model_dir: Path) -> Callable[..., Path]:
    """Write a run config for the tiny model on a small review dataset; override any section."""

    def make(rows: list | None = None, **overrides: dict) -> Path:
        data_file = write_jsonl(tmp_path / "train.jsonl", rows if rows is not None
                                else review_rows(80))
        cfg = {
            "name": "tiny",
            "output_dir": str(tmp_path / "run"),
            "model": {"base": str(tiny_model_dir)},
            "data": {"train_file": data_file.name, "validation_fraction": 0.1,
                     "test_fraction": 0.1, "max_length": 128},
            "train": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                      "epochs": 3, "batch_size": 8, "learning_rate": 2e-2, "eval_every": 5,
                      "early_stopping_patience": None, "seed": 7},
            "eval": {"task": "classification", "labels": ["good", "bad"],
                     "positive_label": "bad", "batch_size": 16},
            # codecarbon's tracker costs seconds per phase; the tests that check the energy
            # figures turn it on (energy={"enabled": True})
            "energy": {"enabled": False},
        }
        for section, values in overrides.items():
            if isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section].update(values)
            else:
                cfg[section] = values
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    return make


@pytest.fixture
def cli():
    """Run the real CLI in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from tunesmith.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
        return result.exit_code, result.stdout, result.stderr

    return invoke


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    # Keep the suite snappy on 2 cores: torch would otherwise oversubscribe.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
