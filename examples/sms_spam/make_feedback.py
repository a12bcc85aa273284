"""A round of user feedback on the SFT demo model, for `tunesmith improve`.

    tunesmith run examples/sms_spam/config.yaml                # the model in use: runs/sms-spam
    python examples/sms_spam/make_feedback.py --run runs/sms-spam
    tunesmith improve runs/sms-spam --feedback examples/sms_spam/feedback \\
        --holdout examples/sms_spam/feedback/holdout.jsonl

Users see the demo model's answers to the test-split messages (its logged replies, from the
run's ``tuned_eval.json``). Where it was wrong, the user types the right label (a
correction); where it was right, the user rates the answer good. The feedback is turned into
the next round's data by the service's own export (``service.audit.feedback_records``):
corrections become chat rows, and each correction is preferred to the logged answer.

Because the feedback comes from the test split, the gate needs other messages: the hold-out
set is a seeded, label-stratified sample of the demo's training split that the demo never
trained on (it trains on a 1,000-example sample of it), so neither model has seen it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from tunesmith.config import load_config
from tunesmith.data.split import sample
from tunesmith.flows.steps import load_splits
from tunesmith.service.audit import feedback_records

HERE = Path(__file__).parent


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def feedback_for(test: list[dict], replies: list[str], expected: list[str]) -> list:
    """(feedback, completion) as the service stores them: a correction for each wrong answer,
    a good rating for each right one."""
    out = []
    for row, reply, label in zip(test, replies, expected, strict=True):
        completion = SimpleNamespace(messages=row["messages"][:-1], choices=[reply])
        right = reply.strip() == label
        out.append((SimpleNamespace(choice_index=0, rating="good" if right else "bad",
                                    correction=None if right else label), completion))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/sms-spam"),
                    help="the SFT demo's run directory")
    ap.add_argument("--out", type=Path, default=HERE / "feedback")
    ap.add_argument("--holdout", type=int, default=400, help="hold-out messages")
    args = ap.parse_args()

    found = json.loads((args.run / "tuned_eval.json").read_text())
    test = _jsonl(args.run / "data" / "test.jsonl")
    chat, dpo = feedback_records(feedback_for(test, found["replies"], found["expected"]))

    cfg = load_config(HERE / "config.yaml")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"max_train_examples": None})})
    pool = load_splits(cfg, with_test=False).train
    trained = {json.dumps(r["messages"]) for r in _jsonl(args.run / "data" / "train.jsonl")}
    unseen = [ex for ex in pool if json.dumps(ex.messages) not in trained]
    holdout = sample(unseen, args.holdout, seed=cfg.train.seed, labels=[e.label for e in unseen])

    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "feedback_chat.jsonl", chat)
    _write(args.out / "feedback_dpo.jsonl", dpo)
    _write(args.out / "holdout.jsonl", [{"messages": ex.messages} for ex in holdout])
    wrong = sum(r.strip() != e for r, e in zip(found["replies"], found["expected"], strict=True))
    print(f"{len(test)} logged answers, {wrong} corrected, {len(test) - wrong} rated good -> "
          f"{len(chat)} chat row(s), {len(dpo)} preference pair(s); hold-out: {len(holdout)} "
          f"unseen training-pool messages ({sum(e.label == 'spam' for e in holdout)} spam) "
          f"in {args.out}")


if __name__ == "__main__":
    main()
