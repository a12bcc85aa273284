"""Train the tiny model under DDP or FSDP2 (two processes under torchrun): LoRA, in full,
LoRA with a classification head, LoRA with DPO, LoRA in bf16 (frozen weights bf16, the
adapters fp32, autocast), or a one-layer student distilled in full from the model.

    ACCELERATE_USE_CPU=1 python -m torch.distributed.run --nproc_per_node 2 \\
        tests/flow/fsdp_train.py MODEL_DIR OUT_DIR {ddp,fsdp} \\
        {lora,full,classifier,dpo,lora-bf16,distill} [--resume]

The main process appends each step's loss to OUT_DIR/losses.jsonl as it goes (a killed run
keeps what it logged), and at the end saves the merged model to OUT_DIR/merged and the sums of
its weights to OUT_DIR/result.json.

Accelerate turns FSDP on only for GPU-like devices (``AcceleratorState`` leaves a CPU run as
MULTI_CPU, i.e. DDP, whatever the plugin says), while torch's ``fully_shard`` runs on CPU with
gloo. On CPU this script therefore flips the shared Accelerate state to FSDP before the run
builds its own ``Accelerator`` (which reuses that state): Accelerate's own FSDP2 preparation
then runs, as under ``accelerate launch --config_file examples/accelerate/fsdp-1node.yaml`` on
GPUs. On CUDA (NCCL) nothing is flipped.
"""

import json
import os
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
# the FSDP settings of the shipped launch config, passed as `accelerate launch` passes them
CONFIG = REPO / "examples" / "accelerate" / "fsdp-1node.yaml"

from tests.helpers import review_pairs, review_rows  # noqa: E402
from tunesmith.data.encode import encode_chat, encode_class_example, encode_pair  # noqa: E402
from tunesmith.models.classifier import load_classifier  # noqa: E402
from tunesmith.models.load import add_lora, load, save_merged  # noqa: E402
from tunesmith.models.student import make_student  # noqa: E402
from tunesmith.training.distill import distill_objective  # noqa: E402
from tunesmith.training.loop import LoopSettings, train  # noqa: E402
from tunesmith.training.objectives import ClassifierObjective  # noqa: E402
from tunesmith.training.preference import (  # noqa: E402
    PreferenceObjective,
    reference_log_probs,
    with_reference,
)

LABELS = ["good", "bad"]


class Record:
    def __init__(self, path: Path, main: bool) -> None:
        self.path, self.main = path, main
        self.sharded: bool | None = None
        self.units = 0

    def on_step(self, loop, metrics) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        if self.sharded is None:  # what the loop trained: sharded parameters or full ones
            module = loop.parts.module
            self.sharded = any(isinstance(p, DTensor) for p in module.parameters())
            self.units = sum(isinstance(m, FSDPModule) for m in module.modules())
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": metrics["step"], "loss": metrics["train_loss"]})
                        + "\n")


def make_accelerator(mode: str):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if mode == "ddp":
        return Accelerator()
    for key, value in yaml.safe_load(CONFIG.read_text())["fsdp_config"].items():
        os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    plugin = FullyShardedDataParallelPlugin()  # from those variables, as Accelerator() does
    assert plugin.fsdp_version == 2
    acc = Accelerator(fsdp_plugin=plugin)
    if acc.distributed_type != DistributedType.FSDP:  # CPU: see the module docstring
        # both shared states: a later Accelerator() copies the partial one over the other
        PartialState().distributed_type = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def main(model_dir: str, out_dir: str, mode: str, method: str, resume: bool) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(mode)
    torch.manual_seed(0)
    model, tok = load(Path(model_dir))
    make_objective = None
    if method == "classifier":
        model = load_classifier(Path(model_dir), LABELS, pad_token_id=tok.pad_token_id, seed=0)
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                         task_type="SEQ_CLS")
        rows = [encode_class_example(tok, r["messages"][:2],
                                     LABELS.index(r["messages"][2]["content"]))
                for r in review_rows(89)]

        def make_objective(m, precision):
            return ClassifierObjective(m, pad_id=tok.pad_token_id, precision=precision,
                                       packing=True)
    elif method == "dpo":
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        pairs = [encode_pair(tok, p["input"]["messages"], p["preferred_output"],
                             p["non_preferred_output"]) for p in review_pairs(89)]
        rows = with_reference(pairs, reference_log_probs(model, pairs, pad_id=tok.pad_token_id))

        def make_objective(m, precision):
            return PreferenceObjective(m, loss="dpo", beta=0.1, pad_id=tok.pad_token_id,
                                       precision=precision)
    elif method == "distill":  # the student trains in full; the teacher is never sharded
        teacher, model = model, make_student(model, 1)
        rows = [encode_chat(tok, r["messages"]) for r in review_rows(89)]

        def make_objective(m, precision):
            return distill_objective(m, teacher=teacher, head=False, pad_id=tok.pad_token_id,
                                     precision=precision, packing=True)
    else:
        if method != "full":
            model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        rows = [encode_chat(tok, r["messages"]) for r in review_rows(89)]
    # 81 examples in batches of 8: the last global batch holds one example, so one process
    # has an empty share of it (and, packed, the processes run different numbers of passes)
    data, valid = rows[:81], rows[81:]
    lr = 1e-3 if method in ("full", "distill") else 1e-2
    settings = LoopSettings(learning_rate=lr, epochs=1, batch_size=8, total_steps=11,
                            eval_every=5, packing=True, max_grad_norm=1.0,
                            precision="bf16" if method.endswith("bf16") else "fp32")
    record = Record(out / "losses.jsonl", acc.is_main_process)
    result = train(model, data, valid, settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=out / "checkpoints", callbacks=[record], resume=resume,
                   make_objective=make_objective)
    assert result.state.step == 11
    if not acc.is_main_process:
        return
    trained = {n: p.detach().double().sum().item() for n, p in model.named_parameters()
               if p.requires_grad}
    sums = {}
    if method in ("lora", "full"):
        merged = save_merged(model, tok, out / "merged")
        sums = {n: p.detach().double().sum().item() for n, p in merged.state_dict().items()}
    (out / "result.json").write_text(json.dumps({
        "trained": trained, "merged": sums, "best_step": result.state.best_step,
        "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
        "sharded": record.sharded, "fsdp_units": record.units}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], "--resume" in sys.argv[5:])
