"""The sections of a run configuration (model, data, train, eval), one pydantic model each.

The field descriptions are the documentation: they become the comments written by
``tunesmith config init`` and the reference in the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Auto, _Section
from tunesmith.config.privacy import PrivacyConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
# eval.mode 'score' with a generation task: refused by the config and by library callers alike
SCORE_NEEDS_CLASSIFICATION = (
    "eval.mode 'score' picks one of the labels, so it needs eval.task: classification; use "
    "eval.mode: generate (or auto) for generation")


class ModelConfig(_Section):
    base: str = Field(
        DEFAULT_MODEL,
        description="Base model: 'smollm2-135m-instruct' (bundled), a local Hugging Face model "
        "directory, a local .gguf file, or a Hub id already in the local Hugging Face cache.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Precision the base weights are loaded in. 'auto': bfloat16 when "
        "LoRA trains in bf16 (the frozen weights end up bf16 anyway), else float32.")


class DataConfig(_Section):
    train_file: Path = Field(
        ..., description="Training data: OpenAI chat JSONL, prompt/completion, Alpaca, ShareGPT, "
        "or text + label rows (CSV, TSV, JSONL, Parquet); the format is detected.")
    format: str | None = Field(
        None, description="Force the input format (chat, prompt_completion, alpaca, sharegpt, "
        "classification). Empty: detected from the file.")
    text_column: str = Field("text", description="Classification rows: the text column.")
    label_column: str = Field("label", description="Classification rows: the label column.")
    system_prompt: str | None = Field(
        None, description="Classification rows: the system message put before each text.")
    system_fallback: Literal["fold", "refuse"] = Field(
        "fold", description="When the model's chat template has no system role (Gemma): "
        "'fold' puts the system message at the start of the first user message, a blank line "
        "between (as Gemma 3's own template does), the same in training, evaluation and "
        "serving, and says so in the run log; 'refuse' stops before training and lists the "
        "examples that have a system message.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="'raise': stop at invalid rows and list them all. 'skip': leave "
        "them out of the run and list them, with reasons, in rejects.jsonl of the run.")
    clean: bool = Field(
        False, description="Normalise text (NFKC, look-alike letters, markup, control "
        "characters, whitespace) and drop exact and near duplicates before splitting.")
    redact: bool = Field(
        False, description="Replace personal data (emails, phones, cards, IBANs, IPs, SSNs) "
        "with typed placeholders such as [EMAIL] before anything is trained.")
    validation_file: Path | None = Field(
        None, description="Validation data. When empty, it is split off the training file.")
    test_file: Path | None = Field(
        None, description="Held-out test data. When empty, it is split off the training file.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the training file used for validation when split.")
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the training file held out for testing when split.")
    max_train_examples: int | None = Field(
        None, gt=0, description="Train on at most this many examples (seeded, stratified sample).")
    max_validation_examples: int | None = Field(
        200, gt=0, description="Compute the periodic validation loss on at most this many "
        "examples (a seeded sample); calibration uses the whole validation split.")
    max_test_examples: int | None = Field(
        None, gt=0, description="Evaluate on at most this many test examples.")
    max_length: int = Field(
        512, gt=8, description="Longest example in tokens (chat template included). Longer "
        "examples are left out of training and listed in rejects.jsonl of the run.")
    group_fields: list[str] = Field(
        default_factory=list, description="Top-level keys of the rows holding a group (e.g. "
        "'region'): the report's data section gets a dataset-bias report per field "
        "(representation, label rate per group, groups too small, test coverage). Empty: "
        "eval.group_field when that is set.")
    group_reference: Path | None = Field(
        None, description="JSON or YAML of the expected share of each group, e.g. the "
        "deployment population: {field: {group: share}}; the bias report tests the training "
        "split against it.")
    label_issues: Literal["off", "report", "drop", "relabel"] = Field(
        "off", description="Classification: look for wrong labels in the training split before "
        "training (a k-fold probe on the base model's hidden states, then cleanlab). "
        "'report' lists the suspects in label_issues.jsonl and the report; 'drop' also leaves "
        "them out (each in rejects.jsonl); 'relabel' trains them with the suggested label. "
        "Costs one forward pass of half the model over the training texts.")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation_fraction + test_fraction must be below 0.9")
        return self


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    shared_dropout: bool = Field(
        True, description="Adapters that read the same tensor (q/k/v, gate/up) see one dropped "
        "copy of it: the same dropout rate, one mask instead of three (faster, less memory). "
        "false: each adapter draws its own mask, as PEFT does.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' or a list of names.")
    layers: list[int] | None = Field(
        None, description="Only these decoder layers get adapters (PEFT's layers_to_transform); "
        "negative numbers count from the top: [-2, -1] is the last two. Empty: every layer. "
        "Under DP, adapters on the top layers keep the noise small and the backward short.")


PreferenceLoss = Literal["dpo", "ipo", "simpo", "orpo"]
# objectives that compare the policy with a reference model (the base, or the run's start)
REFERENCE_LOSSES = ("dpo", "ipo")


class PreferenceConfig(_Section):
    beta: float | Auto = Field(
        "auto", description="Strength of the preference term. DPO/IPO: how far the model may "
        "move from the reference (smaller: further). 'auto': 0.1 (dpo, ipo, orpo; OpenAI's "
        "default for DPO), 2.0 (simpo).")
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an extra language-modelling loss on the preferred "
        "answer (per token), added to the preference loss; keeps the chosen answers likely "
        "(TRL's rpo_alpha, LLaMA-Factory's pref_ftx). 0: off. ORPO always has its own.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO/SimPO: the assumed share of pairs whose labels are "
        "flipped (conservative DPO); 0: trust every pair.")
    simpo_gamma: float = Field(
        0.5, ge=0, description="SimPO: target reward margin, as a fraction of beta.")


class TrainConfig(_Section):
    objective: Literal["sft", "dpo", "ipo", "simpo", "orpo"] = Field(
        "sft", description="'sft': learn the assistant answers. Preference pairs (a preferred "
        "and a non-preferred answer per prompt): 'dpo' (sigmoid loss against the reference "
        "model), 'ipo' (squared loss, less prone to overfit deterministic preferences), "
        "'simpo' and 'orpo' (no reference model). With LoRA the reference is the base model "
        "(adapters off); its log-probabilities are computed once and kept with the run.")
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Preference objectives' settings.")
    method: Literal["lora", "full"] = Field(
        "lora", description="'lora' trains small adapters; 'full' trains every weight."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    head: Literal["lm", "classifier"] = Field(
        "lm", description="'lm': the model answers in text (classification by generation). "
        "'classifier': a new classification head on the base model, trained with the adapters "
        "(needs eval.task: classification).",
    )
    class_weights: Literal["balanced", "none"] = Field(
        "balanced", description="With head 'classifier': weigh classes by inverse frequency. "
        "Under train.privacy 'none' (the counts are private)."
    )
    head_learning_rate: float | Auto = Field(
        "auto", description="With head 'classifier': learning rate of the new classification "
        "layer. 'auto': learning_rate / 10 (with Adam, a new layer on large hidden states moves "
        "its logits by lr x |hidden| per step; the adapters' rate makes it overshoot).",
    )
    head_input_scale: Literal["auto", "public", "none"] = Field(
        "auto", description="With head 'classifier': 'public' trains the new head on its input "
        "divided by each feature's RMS over public prompts (the general prompts shipped with "
        "tunesmith, not the training data: no privacy spent), folded into its weights after "
        "training. A decoder's last hidden states hold a few features tens of times larger "
        "than the rest, which clipped per-example gradients hardly get past. 'auto': 'public' "
        "under train.privacy, else 'none'.")
    epochs: int | Auto = Field(
        "auto", description="Passes over the training data. 'auto': 3, more for tiny sets, "
        "fewer for huge ones (as OpenAI's fine-tuning does).",
    )
    batch_size: int | Auto = Field(
        "auto", description="Examples per optimiser step. 'auto': from the dataset size."
    )
    learning_rate: float | Auto = Field(
        "auto", description="Peak learning rate. 'auto': 2e-4 for LoRA, 2e-5 for full, "
        "scaled with the square root of the batch size.",
    )
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimiser steps, whatever the epochs."
    )
    micro_batch_size: int | None = Field(
        None, gt=0, description="Split each batch into micro-batches of this many examples "
        "(gradient accumulation; the loss is normalised over the whole batch). Empty: none.",
    )
    packing: bool = Field(
        True, description="Pack each batch's examples into as few rows as fit max_length "
        "(on CPU, where each sequence attends on its own, rows of up to 1,024 tokens or "
        "max_length), each attending only to itself (less padding; same examples per step).",
    )
    group_by_length: bool = Field(
        True, description="Without packing: batch examples of similar length together."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'bf16': frozen weights in bfloat16 and bf16 autocast, trainable "
        "weights in fp32. 'auto': bf16 where the hardware computes it natively.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% more time."
    )
    quantize_base: Literal["none", "nf4"] = Field(
        "none", description="'nf4': QLoRA. The frozen base weights in 4-bit NormalFloat with "
        "double quantisation (bitsandbytes, CUDA only; refused elsewhere), LoRA adapters "
        "trained on top, computing in bf16; the adapters are merged into the unquantised base "
        "for the merged model. Needs method: lora and head: lm.",
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="Layer-wise learning-rate decay: layer i of n learns at "
        "lr * decay^(n-1-i), so earlier layers learn slower. 1: off.",
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="'adamw'; or 'sgd': SGD with momentum 0.9, DP-SGD's own optimiser. "
        "Under differential privacy a noisy gradient's coordinates are mostly noise: Adam "
        "moves each weight by about the learning rate whatever its signal, SGD by the "
        "averaged gradient (its learning rates are far larger: 0.1-1 for a new head). "
        "'sgd' needs an explicit learning_rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not on norms/biases).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; empty: none.")
    eval_every: int | Literal["auto", "epoch"] = Field(
        "auto", description="Compute validation loss (and checkpoint) every N steps. 'auto': "
        "about 10 times a run; 'epoch': at the end of each epoch.",
    )
    early_stopping_patience: int | None = Field(
        3, gt=0, description="Stop after this many evaluations without a better best_metric."
    )
    best_metric: Literal["loss", "macro_f1", "accuracy"] = Field(
        "loss", description="What picks the best step (the weights a run ends with) and what "
        "early stopping waits on, as Hugging Face Trainer's metric_for_best_model: 'loss', the "
        "validation loss (lower is better); with head 'classifier' also 'macro_f1' or "
        "'accuracy' on the validation set (higher is better; a tie goes to the lower loss). "
        "A small validation set's loss swings with a few confidently wrong examples; F1 "
        "follows what a classifier is judged by.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Recent checkpoints kept (plus the best).")
    seed: int = Field(42, description="Seed for splitting, sampling, initialisation and order.")
    privacy: PrivacyConfig | None = Field(
        None, description="Differential privacy (DP-SGD, Opacus): per-example clipping, "
        "Gaussian noise, Poisson sampling with batch_size as the expected batch, and an "
        "(epsilon, delta) guarantee in the report and privacy.json. Empty: off. Implies "
        "packing: false (one example per row).")

    @model_validator(mode="before")
    @classmethod
    def _privacy_unpacks(cls, data: object) -> object:
        # DP clips per example, so packing is off unless the user asked for it (then an error)
        # and class weights counted from the training labels are off unless asked for
        if isinstance(data, dict) and data.get("privacy"):
            data = {"packing": False, "class_weights": "none", **data}
        return data

    @model_validator(mode="after")
    def _quantized_base_fits(self) -> TrainConfig:
        if self.quantize_base != "none" and (self.method != "lora" or self.head != "lm"):
            raise ValueError(f"train.quantize_base: {self.quantize_base} trains LoRA adapters "
                             "on a 4-bit base (method: lora, head: lm); 4-bit weights cannot "
                             "be trained themselves. Set method: lora and head: lm, or "
                             "quantize_base: none")
        return self

    @model_validator(mode="after")
    def _scaled_input_needs_a_head(self) -> TrainConfig:
        if self.head_input_scale == "public" and self.head != "classifier":
            raise ValueError("train.head_input_scale: public scales a classification head's "
                             "input; set train.head: classifier, or head_input_scale: auto")
        return self

    @model_validator(mode="after")
    def _sgd_has_its_rate(self) -> TrainConfig:
        if self.optimizer == "sgd" and self.learning_rate == "auto":
            raise ValueError("train.optimizer: sgd needs an explicit train.learning_rate: the "
                             "'auto' rates are AdamW's (2e-4 for LoRA); SGD's are hundreds of "
                             "times larger (try 0.05-0.5)")
        return self

    @model_validator(mode="after")
    def _best_metric_exists(self) -> TrainConfig:
        if self.best_metric != "loss" and self.head != "classifier":
            raise ValueError(f"train.best_metric: {self.best_metric} is measured by a "
                             "classification head (head: classifier); a head 'lm' run is "
                             "judged by its validation loss: set best_metric: loss")
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> TrainConfig:
        if self.privacy is None:
            return self
        if self.packing:
            raise ValueError("train.privacy needs train.packing: false: DP-SGD clips each "
                             "example's gradient, and a packed row mixes several examples")
        if self.objective != "sft":
            raise ValueError(f"train.privacy works with train.objective 'sft' (or head "
                             f"'classifier'), not '{self.objective}': a preference pair spans "
                             "two rows")
        if self.head == "classifier" and self.class_weights == "balanced":
            raise ValueError("train.privacy needs train.class_weights: none: 'balanced' counts "
                             "the training labels, a statistic of the private data that the "
                             "(epsilon, delta) guarantee does not cover")
        if self.gradient_checkpointing:
            raise ValueError("train.privacy needs train.gradient_checkpointing: false: the "
                             "per-example gradient hooks see each layer once per forward")
        if self.method == "full" and self.head == "lm":
            raise ValueError("train.privacy trains LoRA adapters (method: lora) or a classifier "
                             "head: per-example gradients of a full model's LM head, taken "
                             "over gathered answer tokens, would mix examples")
        return self

    @field_validator("learning_rate", "head_learning_rate")
    @classmethod
    def _positive_lr(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("learning_rate must be positive")
        return v

    @field_validator("epochs", "batch_size", "eval_every")
    @classmethod
    def _positive_int(cls, v: int | str) -> int | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return v


class EvalConfig(_Section):
    task: Literal["classification", "generation"] = Field(
        "generation", description="'classification': the assistant answers one of `labels`; "
        "'generation': free text, scored by exact match.")
    labels: list[str] | None = Field(
        None, description="Class labels (classification). Empty: taken from the training data.")
    positive_label: str | None = Field(
        None, description="The class whose F1 is reported (classification), e.g. 'spam'.")
    mode: Literal["auto", "score", "generate"] = Field(
        "auto", description="How test answers are obtained. 'score': the label with the highest "
        "log-probability as the answer (classification; one forward pass per item, never an "
        "unparseable answer). 'generate': generate a reply and parse the label from it. 'auto': "
        "'score' for classification, 'generate' for generation. A train.head: classifier run's "
        "tuned model always answers with its head.")
    max_new_tokens: int | Auto = Field(
        "auto", description="Tokens generated per test example (eval.mode generate). 'auto': "
        "enough for the longest label (classification) or 128 (generation).")
    batch_size: int = Field(16, gt=0, description="Test examples generated at once.")
    compare_base: bool = Field(True, description="Also evaluate the base model on the test set.")
    bootstrap_resamples: int = Field(
        1000, ge=100, description="Paired bootstrap resamples for the 95% CI of base vs tuned.")
    calibration: bool = Field(
        True, description="Classification: ECE and a reliability diagram from the label "
        "probabilities, and a temperature fitted on the validation split (saved with the model).")
    forgetting: bool = Field(
        True, description="Perplexity on general English text and KL divergence from the base "
        "model on general prompts, before vs after fine-tuning.")
    forgetting_max_tokens: int = Field(
        4096, gt=0, description="Tokens of the general text scored for perplexity.")
    forgetting_text: Path | None = Field(
        None, description="General text for the forgetting check. Empty: the bundled text.")
    forgetting_prompts: Path | None = Field(
        None, description="General prompts (chat JSONL) for the KL check. Empty: bundled.")
    max_perplexity_ratio: float = Field(
        1.2, gt=1, description="Warn when general-text perplexity rises more than this factor.")
    max_kl: float = Field(
        0.5, gt=0, description="Warn when the mean KL divergence from the base exceeds this.")
    group_field: str | None = Field(
        None, description="A top-level key of each test line holding a group (e.g. 'region'): "
        "metrics per group and the largest gap (fairness).")
    confident_errors: int = Field(
        10, ge=0, description="How many of the most confident wrong predictions to list.")

    @model_validator(mode="after")
    def _score_needs_labels(self) -> EvalConfig:
        if self.mode == "score" and self.task != "classification":
            raise ValueError(SCORE_NEEDS_CLASSIFICATION)
        return self


