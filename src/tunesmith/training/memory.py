"""How much memory a training run will need at its peak, from the model's shape alone.

``estimate_training_memory`` adds up what the loop holds when a step peaks (at the start of
backward, or at the optimizer step): the weights, the adapters, gradients and AdamW state of
the trainable weights, the activations autograd kept for backward, the loss's logits, and the
process's own working set.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.models.lora_dropout import kept_bytes_per_element
from tunesmith.models.sizing import (
    Linear,
    ModelShape,
    layer_index,
    lora_parameters,
    lora_targets,
)
from tunesmith.training.loss import HEAD_CHUNK

GIB = 2**30
# The CPU process's working memory besides tensors, over an interpreter that has imported torch
# and transformers: the rest of the stack (tunesmith, peft, accelerate, scikit-learn, ...) took
# 288 MiB and SmolLM2's fast tokenizer 46 MiB (torch 2.13, transformers 5.24); the encoded
# data and autograd's bookkeeping are small beside them.
CPU_RUNTIME_BYTES = 340 * 2**20
# On CUDA the estimate is of allocated tensors (torch.cuda.max_memory_allocated); the CUDA
# context (some 500 MiB) is outside it, as it is outside that figure.
CUDA_RUNTIME_BYTES = 0

# Adapted linear layers that read the same tensor keep one copy of it between them (without
# dropout); the attention output projection's input is kept by the attention kernel anyway.
_SHARED_INPUT = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                 "qkv_proj": "attention", "query_key_value": "attention",
                 "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp",
                 "dense_h_to_4h": "mlp"}
_KEPT_BY_ATTENTION = {"o_proj", "dense", "out_proj"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a training run, in bytes, by part; ``total`` is their sum."""

    weights: int  # the base model's weights
    adapters: int  # LoRA adapter weights (0 for full fine-tuning: the weights are trained)
    gradients: int  # those held at the peak
    optimizer: int  # AdamW's two moments
    activations: int  # kept for backward, plus the loss's logits
    runtime: int  # the process's working set besides tensors
    n_params: int
    n_trainable: int
    tokens: int  # per forward pass: rows x max_length
    peak_at: str = "start of backward"  # or "optimizer step": the moment of the peak
    notes: tuple[str, ...] = ()  # what was assumed, e.g. for an 'auto' batch size

    @property
    def total(self) -> int:
        return (self.weights + self.adapters + self.gradients + self.optimizer
                + self.activations + self.runtime)

    def parts(self) -> list[tuple[str, int]]:
        """(name, bytes) of each part and the total, in the order the summary prints them."""
        return [("weights", self.weights), ("adapters/trainable", self.adapters),
                ("gradients+optimizer", self.gradients + self.optimizer),
                ("activations", self.activations), ("runtime", self.runtime),
                ("total", self.total)]

    def summary(self) -> str:
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.parts()[:-1])
        return (f"estimated peak memory for training: {self.total / GIB:.2f} GiB ({parts} GiB, "
                f"at the {self.peak_at}); "
                f"trainable parameters {self.n_trainable:,} of {self.n_params:,}, "
                f"{self.tokens:,} tokens per forward pass")


def _adapter_inputs(targets: list[Linear], layers: int, dropout: float, act_bytes: float,
                    shared_dropout: bool, device: str) -> float:
    """Bytes per token per layer the adapters keep: each its rank-r output is counted by the
    caller; here the inputs. With dropout each adapted layer keeps a dropped copy of its input
    and what the dropout needs for backward (a bool mask, a byte per element, on CUDA; on CPU
    ``FastDropout`` keeps the dropped positions where few drop, ``4 * p`` bytes per element:
    ``models.lora_dropout.kept_bytes_per_element``), and the undropped input is then kept by
    nobody; with shared dropout the adapted layers reading the same tensor share one dropped
    copy and what its dropout keeps. Without dropout adapted layers reading the same tensor
    share one copy, and attention keeps the output projection's input anyway."""
    inputs: dict[str, int] = {}
    for t in targets:
        leaf = t.name.rsplit(".", 1)[-1]
        if dropout == 0 and leaf in _KEPT_BY_ATTENTION:
            continue
        layer = t.name.rsplit(".", 2)[0]  # the block (or sub-block) the layer sits in
        key = _SHARED_INPUT.get(leaf, leaf) if dropout == 0 or shared_dropout else leaf
        inputs[f"{layer}:{key}"] = t.in_features
    return sum(inputs.values()) * (act_bytes + kept_bytes_per_element(dropout, device)) / layers


def estimate_training_memory(
        shape: ModelShape, *, method: str, rows: int, max_length: int, lora_r: int = 16,
        lora_target_modules: list[str] | str = "all-linear", lora_dropout: float = 0.0,
        lora_shared_dropout: bool = True,
        lora_layers: list[int] | None = None, optimizer: str = "adamw",
        gradient_checkpointing: bool = False, precision: str = "fp32",
        base_dtype: str = "float32", lm_head: bool = True, device: str = "cpu",
        accumulating: bool = False, per_example_gradients: int = 0,
        quantize_base: str = "none", packing: bool = False) -> MemoryEstimate:
    """Peak memory of training ``shape`` on ``rows`` rows of ``max_length`` tokens per pass.

    With T = rows x max_length tokens, a = bytes of an activation (4, or 2 under bf16
    autocast), and the model's hidden size h, MLP width m, L layers, H query and K key/value
    heads of width d, vocabulary V:

    - weights: every base parameter at its training dtype (with ``quantize_base: nf4`` the
      decoder's linear weights at 4.127 bits, the rest in bf16; frozen ones in bf16 under bf16
      precision, else the dtype they are loaded in).
    - adapters (LoRA): r x (in + out) parameters per adapted linear layer, in fp32 (PEFT keeps
      adapters fp32 over bf16 weights). Trainable: the adapters (LoRA) or every weight (full).
    - gradients: one per trainable parameter, at its dtype, as many as are held at the peak.
      Backward frees activations layer by layer while gradients fill in, so the peak is at
      the start of backward, when only the LM head's gradient exists (full fine-tuning; all
      gradients when ``accumulating`` micro-batches), or at the optimizer step (all
      gradients, and on CUDA a foreach temporary as large; activations freed), whichever is
      larger. Under DP-SGD also one per example of a physical batch (Opacus's per-example
      gradients).
    - optimizer: AdamW's two moments (SGD's one momentum buffer) per trainable parameter, at
      the parameter's dtype. No separate fp32 master copy exists: trainable weights are kept
      in fp32 themselves (LoRA, or full with float32 weights), or trained in bf16 throughout
      (full with model.dtype: bfloat16).
    - activations: what autograd keeps for backward, per layer and token (Llama-style block,
      as measured with saved-tensor hooks):
      the inputs of the two norms (2h, fp32; at a bytes for LoRA on the CPU, whose norms
      are ``models.fused_layers``'), the attention kernel's q, k, v, output and
      log-sum-exp (2Hd + 2Kd + H; in fp32 for packed rows on CPU, which attend through
      ``models.packed_attention``), the MLP's gate, activation and up outputs (3m);
      full fine-tuning adds what trained weights need: the normalised inputs of the attention
      and MLP projections and the unscaled norms (4h) and the MLP product (m);
      LoRA adds per adapted layer its rank-r intermediate (r) and its input (once per tensor
      several layers share; with dropout, each its own dropped copy and mask).
      With gradient checkpointing only each layer's input (h) is kept, and one layer is
      recomputed at a time during backward (+ one layer's set).
      The loss (``training.loss``) sends only target positions through the LM head, at most
      HEAD_CHUNK rows at a time (each chunk recomputed in backward), so the logits cost
      3 x min(T, HEAD_CHUNK) x V fp32 values at the start of backward: the log-softmax the
      loss kept, its gradient and the logits' gradient (+ a bf16 copy under bf16).
    - runtime: a fixed working set of the CPU process (CPU_RUNTIME_BYTES; 0 on CUDA, whose
      peak is measured as allocated tensors).

    The total is the sum of the parts at that moment (``peak_at``). It is memory in use: on
    CPU glibc may keep freed activations cached in its heap and the resident set grow past it
    (see tests/integration/test_memory_estimate.py).
    """
    bf16 = precision == "bf16"
    loaded = 2 if base_dtype == "bfloat16" else 4
    lora = method == "lora"
    targets = lora_targets(shape, lora_target_modules, lora_layers) if lora else []
    if lora:
        n_trainable, trainable_bytes = lora_parameters(targets, lora_r), 4
        weights = shape.n_params * (2 if bf16 else loaded)
        if quantize_base == "nf4":
            # QLoRA: the decoder's linear weights in 4 bits plus the double-quantised
            # constants (8 bits per block of 64, and 32 per 256 blocks: 0.127 bit a weight);
            # embeddings, norms and the head stay in bf16
            linear = sum(t.in_features * t.out_features for t in shape.linears)
            weights = int(linear * (4 + 0.127) / 8 + (shape.n_params - linear) * 2)
    else:
        n_trainable, trainable_bytes = shape.n_params, loaded
        weights = shape.n_params * loaded
    all_gradients = n_trainable * trainable_bytes
    activations = _activations(
        shape, targets, lora=lora, rows=rows, max_length=max_length, lora_r=lora_r,
        lora_dropout=lora_dropout, lora_shared_dropout=lora_shared_dropout,
        gradient_checkpointing=gradient_checkpointing, bf16=bf16, lm_head=lm_head,
        fp32_attention=packing and device == "cpu", device=device)

    # Backward starts with the LM head, so its gradient is the only one there at the start
    # (all of them are when earlier micro-batches left theirs); the optimizer step holds them
    # all, and on CUDA AdamW's foreach kernels a temporary the size of the trainable weights.
    head = shape.vocab * shape.hidden * trainable_bytes if not lora and lm_head else 0
    early = all_gradients if accumulating else head
    step = all_gradients * (2 if device == "cuda" else 1)
    per_example = all_gradients * per_example_gradients
    peak_at = "start of backward"
    if activations + early >= step:
        gradients = early + per_example
    else:
        gradients, activations, peak_at = step + per_example, 0, "optimizer step"
    return MemoryEstimate(
        weights=weights, adapters=n_trainable * trainable_bytes if lora else 0,
        # AdamW keeps two moments per trainable weight, SGD one momentum buffer
        gradients=gradients, optimizer=(1 if optimizer == "sgd" else 2) * all_gradients,
        activations=activations,
        runtime=CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
        n_params=shape.n_params, n_trainable=n_trainable, tokens=rows * max_length,
        peak_at=peak_at)


def _activations(shape: ModelShape, targets: list[Linear], *, lora: bool, rows: int,
                 max_length: int, lora_r: int, lora_dropout: float,
                 lora_shared_dropout: bool, gradient_checkpointing: bool, bf16: bool,
                 lm_head: bool, fp32_attention: bool = False, device: str = "cpu") -> int:
    """Bytes autograd keeps for backward at its start, logits included (see the estimate)."""
    h, m, layers = shape.hidden, shape.intermediate, shape.layers
    if lora and targets:
        # backward stops at the lowest adapted layer: nothing below it is kept for it
        layers -= min(layer_index(t.name) or 0 for t in targets)
    a = 2 if bf16 else 4
    tokens = rows * max_length
    qkv_out = (2 * shape.heads + 2 * shape.kv_heads) * shape.head_dim
    # per token and layer: norm inputs and rsqrt, attention kernel, MLP; the norm inputs in
    # fp32 (transformers' RMSNorm keeps its fp32 copy), in their own dtype where the norm is
    # models.fused_layers' (frozen norm weights on the CPU)
    norm = a if lora and device == "cpu" else 4
    block = 2 * h * norm + 2 * 4 + qkv_out * (4 if fp32_attention else a) + shape.heads * 4 \
        + 3 * m * a
    if lora:
        block += len(targets) * lora_r * a / layers
        block += _adapter_inputs(targets, layers, lora_dropout, a, lora_shared_dropout, device)
    else:
        block += 4 * h * a + m * a
    if gradient_checkpointing:
        kept = layers * h * a * tokens + block * tokens
    else:
        kept = layers * block * tokens
    final = h * tokens * (norm if lora else 3 * 4)  # final norm (and the head's input)
    logits = 0
    if lm_head:
        rows_at_once = min(rows * (max_length - 1), HEAD_CHUNK)
        logits = rows_at_once * shape.vocab * (3 * 4 + (2 if bf16 else 0))
    return int(kept + final + logits)
