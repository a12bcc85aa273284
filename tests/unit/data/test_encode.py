from tunesmith.data.encode import IGNORE_INDEX, encode_chat, encode_prompt


def targets_text(tokenizer, enc):
    return tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])


def test_only_assistant_tokens_are_targets(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi there"}]
    enc = encode_chat(tokenizer, msgs)
    assert len(enc.input_ids) == len(enc.labels)
    assert targets_text(tokenizer, enc).startswith("Hi there<|im_end|>")
    assert "Say hi" not in targets_text(tokenizer, enc)
    # the prompt the model sees at generation time is exactly the untrained prefix
    prompt = encode_prompt(tokenizer, msgs[:2])
    assert enc.input_ids[:len(prompt)] == prompt
    assert all(t == IGNORE_INDEX for t in enc.labels[:len(prompt)])


def test_every_assistant_turn_of_a_conversation_is_trained(tokenizer):
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]
    text = targets_text(tokenizer, encode_chat(tokenizer, msgs))
    assert "first answer" in text and "second answer" in text
    assert "one" not in text and "two" not in text


def test_weight_zero_turns_are_not_trained(tokenizer):
    msgs = [{"role": "user", "content": "one"},
            {"role": "assistant", "content": "skip me", "weight": 0},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "learn me"}]
    text = targets_text(tokenizer, encode_chat(tokenizer, msgs))
    assert "learn me" in text and "skip me" not in text
