"""Every model loads with the code installed on this machine: none of its layers is swapped
for a kernel fetched from the Hugging Face Hub, which transformers does by default once the
`kernels` package is installed (on a GPU, at load and at ``.train()``; on a machine without
the Hub that fails every CUDA run: seen on an H200)."""

from tunesmith.models.classifier import load_classifier, load_trained_classifier
from tunesmith.models.load import load_model


def _uses_hub_kernels(model) -> bool:
    return bool(getattr(model, "use_kernels", False))


def test_no_model_is_loaded_with_hub_kernels(tiny_model_dir, tokenizer, tmp_path):
    assert not _uses_hub_kernels(load_model(tiny_model_dir))
    classifier = load_classifier(tiny_model_dir, ["good", "bad"],
                                 pad_token_id=tokenizer.pad_token_id)
    assert not _uses_hub_kernels(classifier)
    classifier.save_pretrained(tmp_path)
    assert not _uses_hub_kernels(load_trained_classifier(tmp_path))
    assert not _uses_hub_kernels(load_model(tiny_model_dir).train())
