"""The audit trail: feedback as training data, and redaction of what is logged."""

from tunesmith.service.audit import feedback_records, redact
from tunesmith.service.tables import Completion, Feedback


def test_feedback_records() -> None:
    prompt = [{"role": "user", "content": "How is it?"}]
    a = Completion(id="c1", messages=prompt, choices=["meh", "great"])
    b = Completion(id="c2", messages=prompt, choices=["bad answer"])
    chat, dpo = feedback_records([
        (Feedback(completion_id="c1", choice_index=1, rating="good"), a),
        (Feedback(completion_id="c1", choice_index=0, rating="bad"), a),
        (Feedback(completion_id="c2", choice_index=0, rating="bad", correction="Fine."), b),
    ])
    assert chat == [{"messages": [*prompt, {"role": "assistant", "content": "Fine."}]}]
    pairs = {(d["preferred_output"][0]["content"], d["non_preferred_output"][0]["content"])
             for d in dpo}
    assert pairs == {("great", "meh"), ("great", "bad answer"), ("Fine.", "meh"),
                     ("Fine.", "bad answer")}
    assert all(d["input"] == {"messages": prompt} for d in dpo)


def test_redaction() -> None:
    text = redact("mail jo.doe+x@mail.example.com or call +44 20 7946 0958, card "
                  "4111 1111 1111 1111 from 10.0.0.12")
    for secret in ("jo.doe", "7946", "4111", "10.0.0.12"):
        assert secret not in text
    assert "[EMAIL]" in text and "[PHONE]" in text and "[CREDIT_CARD]" in text
    assert redact("version 2.5 costs 30 dollars") == "version 2.5 costs 30 dollars"
