"""Train the tiny model a few steps; run alone or as several processes under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/flow/ddp_train.py MODEL_DIR OUT
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import review_rows  # noqa: E402
from tunesmith.data.encode import encode_chat  # noqa: E402
from tunesmith.models.load import add_lora, load  # noqa: E402
from tunesmith.training.loop import LoopSettings, train  # noqa: E402


class Record:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, loop, metrics) -> None:
        self.losses.append(metrics["train_loss"])


def main(model_dir: str, out: str) -> None:
    torch.manual_seed(0)
    model, tok = load(Path(model_dir))
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    rows = [encode_chat(tok, r["messages"]) for r in review_rows(89)]
    # 81 examples in batches of 8: the last global batch holds one example, so with two
    # processes one of them has an empty share of it
    data, valid = rows[:81], rows[81:]
    record = Record()
    settings = LoopSettings(learning_rate=1e-2, epochs=1, batch_size=8, total_steps=11,
                            eval_every=5, precision="fp32", packing=True)
    result = train(model, data, valid, settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=Path(out).parent / f"ck-{Path(out).stem}", callbacks=[record])
    assert result.state.step == 11
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    lora = {n: p.detach().double().sum().item() for n, p in model.named_parameters()
            if p.requires_grad}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    Path(out).write_text(json.dumps({"losses": record.losses, "lora": lora,
                                     "best_step": result.state.best_step,
                                     "world_size": world}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
