"""Export a finished run for use outside tunesmith, then check the export answers like it.

    from tunesmith.flows.export import export
    result = export("runs/sms-spam", format="gguf", quantize="q8_0")
    print(result.path, result.check["agreement"])

``gguf``: one GGUF file for llama.cpp and Ollama (``runs/NAME/export/NAME-<type>.gguf``) and an
Ollama Modelfile beside it (``NAME-<type>.Modelfile``: one per file, so an f16 and a q8_0 export
can share the folder). ``hf``: a clean Hugging Face directory (``runs/NAME/export/hf``).

The check loads the export back (a GGUF file through transformers' GGUF loader, the one the
bundled model is imported with, or for llama.cpp's gptneox, which that loader lacks, through
``models.gguf_neox``) and runs it beside the merged model on the run's first N test
items through the evaluation path the run itself was tested with: for classification, the
fraction of items where both give the same label; otherwise the fraction of identical greedy
replies (first ``GENERATION_CHECK_TOKENS`` tokens). For a language-model head it also reports
the largest absolute difference of next-token logits over a few test prompts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.flows.finished import FinishedRun, open_run

FORMATS = ("gguf", "hf")
DEFAULT_TENSOR_TYPE = "f16"
GENERATION_CHECK_TOKENS = 32
LOGIT_PROMPTS = 4


@dataclass
class ExportResult:
    """What an export wrote, how long it took, and how closely the export answers like the
    merged model (``check``; None when skipped)."""

    run_dir: Path
    format: str
    path: Path
    bytes: int
    tensor_type: str  # f32 / f16 / q8_0 for GGUF, the weights' dtype for hf
    seconds: float
    modelfile: Path | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensors
    notes: list[str] = field(default_factory=list)
    check: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def default_output(done: FinishedRun, format: str, tensor_type: str | None) -> Path:
    if format == "hf":
        return done.run_dir / "export" / "hf"
    return done.run_dir / "export" / f"{done.config.name}-{tensor_type}.gguf"


def _validate(done: FinishedRun, format: str, quantize: str | None, check: int) -> str | None:
    """The tensor type to write, or a ``TunesmithError`` saying what to change."""
    from tunesmith.models.export import TENSOR_TYPES, check_gguf_exportable

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; use gguf (llama.cpp, Ollama) or "
                          "hf (a Hugging Face directory)")
    if check < 0:
        raise ConfigError(f"--check {check}: give the number of test items to compare "
                          "(0 skips the check)")
    if format == "hf":
        if quantize is not None:
            raise ConfigError("--quantize is for --format gguf; an hf export keeps the merged "
                              "model's weights as they are")
        return None
    if quantize is not None and quantize not in TENSOR_TYPES:
        raise ConfigError(f"--quantize {quantize!r}: one of {', '.join(TENSOR_TYPES)}")
    if done.head:
        raise ConfigError(f"{done.run_dir} trained a classification head (train.head: "
                          "classifier); GGUF cannot hold it, since llama.cpp's llama "
                          "architecture ends in a vocabulary head. Export it with --format hf")
    check_gguf_exportable(done.merged)
    return quantize or DEFAULT_TENSOR_TYPE


def shared_system_prompt(done: FinishedRun) -> str | None:
    """The system prompt every training example starts with, if they all share one."""
    prompts = {ex.messages[0]["content"] if ex.messages and ex.messages[0]["role"] == "system"
               else None for ex in done.split("train")}
    return prompts.pop() if len(prompts) == 1 else None


def export(run_dir: Path | str, *, format: str, quantize: str | None = None,
           output: Path | str | None = None, check: int = 50, overwrite: bool = False
           ) -> ExportResult:
    """Export the merged model of a finished run as ``gguf`` or ``hf``; then compare the
    export with the merged model on ``check`` test items (0 skips it)."""
    done = open_run(run_dir)
    tensor_type = _validate(done, format, quantize, check)
    target = Path(output) if output is not None else default_output(done, format, tensor_type)
    if format == "gguf" and target.suffix != ".gguf":
        raise ConfigError(f"-o {target}: a GGUF export is one file; give a path ending in .gguf")
    modelfile = target.with_suffix(".Modelfile") if format == "gguf" else None
    existing = [p for p in (target, modelfile) if p is not None and p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace it, or "
                          "-o to write elsewhere")
    if format == "hf" and target.is_file():
        raise ConfigError(f"-o {target} is a file; an hf export is a directory")

    started = time.perf_counter()
    notes: list[str] = []
    if format == "gguf":
        from tunesmith.models.export import export_gguf

        written = export_gguf(done.merged, target, tensor_type=tensor_type or "f16",
                              name=done.config.name)
        notes += _write_modelfile(done, written.path, modelfile)
    else:
        from tunesmith.models.export import export_hf

        written = export_hf(done.merged, target)
    result = ExportResult(done.run_dir, format, written.path, written.bytes, written.tensor_type,
                          time.perf_counter() - started, modelfile, written.tensor_types, notes)
    if check:
        result.check = answers_check(done, result.path, format, check)
    return result


def _write_modelfile(done: FinishedRun, gguf_path: Path, path: Path | None) -> list[str]:
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.modelfile import modelfile_text, write_text_atomic

    assert path is not None
    # classification answers one label: greedy, as the run's evaluation generated it
    temperature = 0.0 if done.config.eval.task == "classification" else None
    text, notes = modelfile_text(gguf_path.name, load_tokenizer(done.merged),
                                 system=shared_system_prompt(done), temperature=temperature)
    write_text_atomic(path, text)
    return notes


# ----------------------------------------------------------------------------- the check


def answers_check(done: FinishedRun, exported: Path, format: str, n: int) -> dict[str, Any]:
    """How closely the export answers like the merged model on the first ``n`` test items."""
    started = time.perf_counter()
    test = done.split("test")[:n]
    if not test:
        return {"n": 0, "same": 0, "agreement": None, "seconds": 0.0}
    if done.head:
        found = _head_check(done, exported, test)
    else:
        found = _lm_check(done, exported, format, test)
    found["agreement"] = found["same"] / len(test)
    found["seconds"] = time.perf_counter() - started
    return {"n": len(test), **found}


def _head_check(done: FinishedRun, exported: Path, test: list) -> dict[str, Any]:
    from tunesmith.evaluation.classifier import class_probabilities
    from tunesmith.models.classifier import load_trained_classifier
    from tunesmith.models.load import load_tokenizer

    prompts = [ex.prompt for ex in test]
    batch = done.config.eval.batch_size
    ref = class_probabilities(load_trained_classifier(done.merged), load_tokenizer(done.merged),
                              prompts, batch_size=batch)
    new = class_probabilities(load_trained_classifier(exported), load_tokenizer(exported),
                              prompts, batch_size=batch)
    return {"compared": "label", "same": int((ref.argmax(-1) == new.argmax(-1)).sum()),
            "max_prob_diff": float((ref - new).abs().max())}


def _lm_check(done: FinishedRun, exported: Path, format: str, test: list) -> dict[str, Any]:
    from tunesmith.evaluation.task import evaluate_examples, label_token_budget
    from tunesmith.models.export import load_gguf
    from tunesmith.models.load import load

    ev = done.config.eval
    labels = (done.labels or ev.labels) if ev.task == "classification" else None
    ref_model, ref_tok = load(done.merged)
    new_model, new_tok = load_gguf(exported) if format == "gguf" else load(exported)
    budget = label_token_budget(ref_tok, labels) if labels else GENERATION_CHECK_TOKENS
    runs = [evaluate_examples(model, tok, test, task=ev.task, labels=labels,
                              positive=ev.positive_label, max_new_tokens=budget,
                              batch_size=ev.batch_size, mode=ev.mode)
            for model, tok in ((ref_model, ref_tok), (new_model, new_tok))]
    (ref_metrics, ref), (new_metrics, new) = runs
    same = sum(a == b for a, b in zip(ref.predicted, new.predicted, strict=True))
    found: dict[str, Any] = {"compared": "label" if labels else "reply", "same": same}
    if labels:
        found["accuracy"] = {"merged": ref_metrics.get("accuracy"),
                             "export": new_metrics.get("accuracy")}
    found.update(_logit_difference(ref_model, ref_tok, new_model, new_tok,
                                   [ex.prompt for ex in test[:LOGIT_PROMPTS]]))
    return found


def _logit_difference(ref_model: Any, ref_tok: Any, new_model: Any, new_tok: Any,
                      conversations: list) -> dict[str, Any]:
    """Largest |logit difference| over every position of a few prompts, each model reading
    its own tokenizer's ids (which must agree, or the difference means nothing)."""
    import torch

    from tunesmith.data.encode import encode_prompt

    worst, same_tokens = 0.0, 0
    with torch.no_grad():
        for conv in conversations:
            ids, new_ids = encode_prompt(ref_tok, conv), encode_prompt(new_tok, conv)
            if ids != new_ids:
                continue
            same_tokens += 1
            x = torch.tensor([ids])
            diff = (ref_model(input_ids=x).logits.float() - new_model(input_ids=x).logits.float())
            worst = max(worst, float(diff.abs().max()))
    return {"logit_prompts": len(conversations), "same_tokenization": same_tokens,
            "max_logit_diff": worst if same_tokens else None}
