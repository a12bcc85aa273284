"""The steps of a run, as functions the flows call one after another.

Each takes plain values and returns one: read and clean the data, split it, encode it for
training, turn the configuration into loop settings, prepare the model, lay out the run dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.progress import Progress

from tunesmith.config import (
    DataConfig,
    RunConfig,
    parse_config,
)
from tunesmith.data.chat import ChatExample
from tunesmith.data.clean import CleanOptions, clean_examples
from tunesmith.data.dedup import near_duplicate_groups
from tunesmith.data.encode import (
    Encoded,
    PairEncoded,
    encode_chat,
    encode_class_example,
    encode_pair,
    takes_system,
)
from tunesmith.data.formats import ReadOptions, iter_records
from tunesmith.data.normalize import TextOptions
from tunesmith.data.pii import RedactOptions
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.records import Record, as_chat, example_label, record_to_json, removed
from tunesmith.data.rejects import Rejected
from tunesmith.data.split import Splits, sample, split_examples
from tunesmith.errors import ConfigError, DataError, Problem
from tunesmith.evaluation.task import check_labels
from tunesmith.models.load import add_lora
from tunesmith.training.precision import load_dtype
from tunesmith.training.processes import main_decides

log = logging.getLogger("tunesmith")



def read_examples(path: Path, d: DataConfig, rejects: list[Rejected], *,
                  pairs: bool | None = False) -> list[Record]:
    """Every example of a data file in any supported format, as canonical records.

    ``pairs``: True wants preference pairs, False chat examples, None either (a test file:
    pairs are scored as the chat example of their preferred answer). Invalid rows stop the
    run with every problem listed (``on_error: raise``), or are left out and appended to
    ``rejects`` with the reason (``on_error: skip``).
    """
    read = ReadOptions(format=d.format, text_column=d.text_column, label_column=d.label_column,
                       system_prompt=d.system_prompt)
    # the train file is split later, so its rows have no split yet
    split = ("validation" if path == d.validation_file
             else "test" if path == d.test_file else None)
    examples: list[Record] = []
    problems: list[Problem] = []
    for item in iter_records(path, read):
        if isinstance(item, Rejected):
            if d.on_error == "raise":
                problems.extend(item.problems)
            else:
                rejects.append(dataclasses.replace(item, split=split))
        elif pairs is not None and isinstance(item, PreferenceExample) != pairs:
            raise DataError(
                "this file holds preference pairs (input, preferred_output, "
                "non_preferred_output); train them with train.objective: dpo (or ipo, simpo, "
                "orpo), or give chat examples" if not pairs else
                "train.objective needs preference pairs: lines like {\"input\": {\"messages\": "
                "[...]}, \"preferred_output\": [...], \"non_preferred_output\": [...]} "
                "(OpenAI) or {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} (TRL); "
                "this file holds chat examples (use train.objective: sft for those)",
                path=path, line=item.line,
                code="wrong_kind_of_example")
        else:
            examples.append(item)
    if problems:
        raise DataError(f"{path}: {len(problems)} problem(s) in the data; fix these lines and "
                        "run again, or set data.on_error: skip", path=path, problems=problems)
    if not examples:
        raise DataError("the file is empty (or every row was rejected); expected one example "
                        'per line like {"messages": [{"role": "user", ...}, '
                        '{"role": "assistant", ...}]}', path=path, code="empty_file")
    return examples


def clean_stage(examples: list[Record], d: DataConfig, rejects: list[Rejected]
                ) -> list[Record]:
    """The configured cleaning and redaction; what is dropped goes to ``rejects``."""
    if not (d.clean or d.redact):
        return examples
    off = TextOptions(markup=False, nfkc=False, confusables=False, control=False,
                      whitespace=False)
    kept, report = clean_examples(examples, CleanOptions(
        text=TextOptions() if d.clean else off, redact=RedactOptions() if d.redact else None,
        exact_duplicates=d.clean, near_duplicates=d.clean))
    rejects.extend(report.left_out)
    log.info("cleaning: %s", "; ".join(report.lines()))
    return [ex for ex in kept if not isinstance(ex, Rejected)]


def load_splits(cfg: RunConfig, rejects: list[Rejected] | None = None, *,
                with_test: bool = True, carve_test: bool = True) -> Splits:
    """Read, validate and clean the data; split off validation/test where no file is given.

    Near-duplicates are kept in the same split, so nothing leaks from train into test.
    ``with_test=False`` (a search trial) never opens ``data.test_file`` and returns no test
    examples; a test split carved from the training file is still carved, so the training
    data is the same as a run's. ``carve_test=False`` (a federated client, whose test set is
    the server's) carves none off a training file: every row it does not validate on trains.
    """
    d, seed = cfg.data, cfg.train.seed
    rejects = rejects if rejects is not None else []
    pairs = cfg.train.objective != "sft"
    train_set = clean_stage(read_examples(d.train_file, d, rejects, pairs=pairs), d, rejects)
    valid = read_examples(d.validation_file, d, rejects, pairs=pairs) \
        if d.validation_file else None
    test = None if not d.test_file else read_examples(
        d.test_file, d, rejects, pairs=None) if with_test else []
    if not carve_test and test is None:
        test = []
    is_cls = cfg.eval.task == "classification"
    labels = [example_label(ex) for ex in train_set] if is_cls else None
    if valid is None or test is None:
        if len(train_set) < 10:
            raise DataError(f"only {len(train_set)} examples; at least 10 are needed to split off "
                            "validation and test sets (or give validation_file and test_file)",
                            path=d.train_file)
        groups = near_duplicate_groups(json.dumps(ex.messages) for ex in train_set)
        parts = split_examples(train_set, validation_fraction=d.validation_fraction,
                               test_fraction=d.test_fraction, seed=seed, labels=labels,
                               need_validation=valid is None, need_test=test is None,
                               groups=groups)
        train_set = parts.train
        valid = valid if valid is not None else parts.validation
        test = test if test is not None else parts.test

    def cap(items: list[Record], n: int | None) -> list[Record]:
        return sample(items, n, seed=seed,
                      labels=[example_label(e) for e in items] if is_cls else None)

    return Splits(train=cap(train_set, d.max_train_examples),
                  # capped for the validation loss in _prepare; calibration uses all of it
                  validation=valid,
                  test=cap(test, d.max_test_examples) if with_test else [])


def write_splits(folder: Path, splits: Splits) -> None:
    """The exact examples of each split, as canonical JSONL (OpenAI chat, or preference
    pairs): what the run trained and tested on."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in (("train", splits.train), ("validation", splits.validation),
                        ("test", splits.test)):
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(record_to_json(ex), ensure_ascii=False) + "\n"
                          for ex in items)


def training_encoder(tokenizer: Any, cfg: RunConfig, labels: list[str] | None
                     ) -> Callable[[Any], Encoded | PairEncoded]:
    """How examples become training rows: the chat with its assistant turns as targets; for a
    classification head, the prompt with the class index as the one target; for a preference
    objective, both conversations of a pair with their answers as targets."""
    if cfg.train.objective != "sft":
        return lambda ex: encode_pair(tokenizer, ex.prompt, ex.chosen, ex.rejected)
    if cfg.train.head != "classifier":
        return lambda ex: encode_chat(tokenizer, ex.messages)
    if not labels:
        raise ConfigError("train.head 'classifier' needs the class labels; set eval.labels")
    index = {label: i for i, label in enumerate(labels)}

    def encode_class(ex: ChatExample) -> Encoded:
        if ex.label not in index:  # validation examples are not checked against the labels
            raise DataError(f"label {ex.label!r} is not one of the labels {labels}; add it to "
                            "eval.labels or remove the example", path=ex.source, line=ex.line,
                            field="messages[-1].content", code="label_not_allowed")
        return encode_class_example(tokenizer, ex.prompt, index[ex.label])

    return encode_class


def encode_examples(encode: Callable[[Any], Any], examples: Sequence[Record],
                    *, max_length: int, split: str, progress: Progress | None = None
                    ) -> tuple[list[Any], list[Rejected]]:
    """Encode for training; too-long or target-less examples are returned as rejects."""
    kept: list[Any] = []
    what = "the pair's longer conversation" if any(
        isinstance(ex, PreferenceExample) for ex in examples[:1]) else "the example"
    rejects: list[Rejected] = []
    task = progress.add_task(f"tokenising {split}", total=len(examples)) if progress else None
    refused: list[Problem] = []
    for ex in examples:
        try:
            enc = encode(ex)
        except DataError as err:  # the chat template refuses it: every such line at once
            refused += [dataclasses.replace(p, line=ex.line, field=p.field or "messages")
                        for p in err.problems]
            continue
        if len(enc) > max_length:
            rejects.append(removed(ex, "encode", Problem(
                "too_long", f"{what} has {len(enc)} tokens with the chat template, over "
                f"data.max_length={max_length}; shorten the prompt or answers, or raise "
                "data.max_length", ex.line, "messages"), split))
        elif enc.n_targets == 0:
            rejects.append(removed(ex, "encode", Problem(
                "no_trainable_tokens", "no assistant tokens to train on; give at least one "
                "assistant message weight 1", ex.line, "messages"), split))
        else:
            kept.append(enc)
        if progress:
            progress.advance(task)
    if refused:
        source = examples[0].source if examples else None
        raise DataError(f"{split}: the model's chat template cannot be trained on "
                        f"{len(refused)} example(s)", path=source, problems=refused)
    return kept, rejects


def check_system_role(tokenizer: Any, d: DataConfig, splits: Splits) -> str | None:
    """How the examples' system messages meet a chat template without a system role: a
    ``DataError`` listing them (``data.system_fallback: refuse``), or the line saying they
    are folded into the first user message; None when the template has a system role or no
    example has a system message."""
    if takes_system(tokenizer):
        return None
    found = [ex for part in (splits.train, splits.validation, splits.test) for ex in part
             if as_chat(ex).messages and as_chat(ex).messages[0]["role"] == "system"]
    if not found:
        return None
    if d.system_fallback == "refuse":
        raise DataError(
            f"the model's chat template has no system role, and {len(found)} example(s) start "
            "with a system message; remove them, or set data.system_fallback: fold to put "
            "the system message at the start of the first user message",
            path=found[0].source, problems=[Problem(
                "system_role_unsupported", "a system message the chat template cannot render",
                ex.line, "messages[0]") for ex in found])
    return (f"the chat template has no system role: the system message of {len(found)} "
            "example(s) is folded into the first user message (data.system_fallback: fold)")


def classification_labels(cfg: RunConfig, splits: Splits) -> list[str] | None:
    if cfg.eval.task != "classification":
        return None
    labels = cfg.eval.labels or sorted({example_label(ex) for ex in splits.train})
    check_labels([as_chat(e) for e in splits.train], labels, "training")
    check_labels([as_chat(e) for e in splits.test], labels, "test")
    if cfg.eval.positive_label is not None and cfg.eval.positive_label not in labels:
        raise ConfigError(f"eval.positive_label '{cfg.eval.positive_label}' is not one of the "
                          f"labels {labels}")
    return labels


def base_dtype(cfg: RunConfig) -> str:
    """The dtype the base weights are loaded in (see ModelConfig.dtype)."""
    return load_dtype(cfg.model.dtype, precision=cfg.train.precision, method=cfg.train.method,
                      device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def prepare_model_for_training(model: Any, cfg: RunConfig) -> Any:
    torch.manual_seed(cfg.train.seed)  # the adapters' initial weights
    if cfg.train.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.train.quantize_base != "none":
        from peft import prepare_model_for_kbit_training

        # QLoRA's preparation: norms and embeddings in fp32, inputs that carry gradients
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    lora = cfg.train.lora
    model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                     target_modules=lora.target_modules, layers=lora.layers,
                     shared_dropout=lora.shared_dropout,
                     task_type="SEQ_CLS" if cfg.train.head == "classifier" else "CAUSAL_LM")
    # PEFT keeps adapters in fp32 over a bf16 base, but its trainable copy of a new
    # classification head keeps the load dtype: in bf16 an update below 1/256 of a weight is
    # rounded away. Trainable weights over a frozen base train in fp32.
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def prepare_run_dir(cfg: RunConfig, *, overwrite: bool, resume: bool = False,
                    group: Any = None) -> Path:
    """The run directory: created, emptied for a new run (``overwrite``) or kept (``resume``).

    Under several processes (``group``, a ``PartialState``) only the main process looks and
    writes; the others get its answer, or its error, so none goes on alone.
    """
    run_dir = cfg.output_dir or Path("runs") / (cfg.name or "run")

    def make() -> Path:
        if resume:
            run_dir.mkdir(parents=True, exist_ok=True)
            return run_dir
        if run_dir.exists() and any(run_dir.iterdir()):
            if not overwrite:
                raise ConfigError(f"{run_dir}: the run directory exists and is not empty; pass "
                                  "--overwrite to replace it or set output_dir to another place")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    return make() if group is None else main_decides(group, make)


def run_config(run_dir: Path) -> RunConfig | None:
    """The configuration a run directory was trained with, if it is one."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    resolved = yaml.safe_load(path.read_text())
    resolved.pop("resolved", None)
    return parse_config(resolved, source=str(path))


def advance_task(progress: Progress, title: str, total: int) -> Callable[[int], None]:
    task = progress.add_task(title, total=total)
    return lambda n: progress.advance(task, n)


def write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)
