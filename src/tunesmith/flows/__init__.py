"""The flows a user calls: each reads as the steps of one part of fine-tuning.

    from tunesmith.flows import run
    result = run("examples/sms_spam/config.yaml")
    print(result.tuned["accuracy"])

``steps`` exposes the parts of a run (read and split the data, encode, prepare the model,
fine-tune, assess) as public functions, so a trial or a federated client runs just the part it
needs.
"""

from tunesmith.flows.chat import chat, load_checkpoint_for_chat, load_for_chat
from tunesmith.flows.evaluate import evaluate
from tunesmith.flows.run import RunResult, run

__all__ = ["RunResult", "chat", "evaluate", "load_checkpoint_for_chat", "load_for_chat", "run"]
