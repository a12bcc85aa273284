import pytest
import torch

from tunesmith.models.load import add_lora, load


@pytest.fixture
def tiny(tiny_model_dir):
    """The tiny model with LoRA adapters (no dropout) and its tokenizer."""
    torch.manual_seed(0)
    model, tok = load(tiny_model_dir)
    return add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear"), tok
