"""Chat templates that differ from ChatML: no system role, strict alternation, and turns
rendered differently once later turns are added; each gets a fold or a clear message."""

import copy

import pytest

from tests.families import GEMMA_TEMPLATE
from tunesmith.data.encode import IGNORE_INDEX, encode_chat, encode_prompt, render, takes_system
from tunesmith.errors import DataError

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}
# drops any system message without a word: the worst case, a model never sees its prompt
DROPPING = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral v0.3's habit: the system prompt goes before the *last* user message
MOVING = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
          "{% if loop.last or loop.index0 == messages|length - 2 %}"
          "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
          "{% endif %}{{ m['content'] }}[/INST]{% elif m['role'] == 'assistant' %}"
          "{{ m['content'] }}</s>{% endif %}{% endfor %}")


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_chatml_takes_a_system_message_as_it_is(tokenizer):
    assert takes_system(tokenizer)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in render(
        tokenizer, [SYSTEM, USER], add_generation_prompt=True)


@pytest.mark.parametrize("template", [GEMMA_TEMPLATE, DROPPING], ids=["raises", "drops"])
def test_a_template_without_system_role_gets_it_folded_into_the_first_user_turn(
        tokenizer, template):
    tok = with_template(tokenizer, template)
    assert not takes_system(tok)
    text = render(tok, [SYSTEM, USER, ANSWER], add_generation_prompt=False)
    assert "Be brief.\n\nhi" in text
    enc = encode_chat(tok, [SYSTEM, USER, ANSWER])
    targets = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert targets.startswith("hello") and "Be brief" not in targets
    # generation renders the prompt the same way training did
    assert tok.decode(encode_prompt(tok, [SYSTEM, USER])) in tok.decode(enc.input_ids)


def test_roles_that_do_not_alternate_are_refused_in_the_templates_words(tokenizer):
    tok = with_template(tokenizer, GEMMA_TEMPLATE)
    with pytest.raises(DataError) as err:
        encode_chat(tok, [USER, USER, ANSWER])
    assert str(err.value) == (
        "the model's chat template refuses this conversation (Conversation roles must "
        "alternate user/assistant/user/assistant/...); its roles are user, user, assistant; "
        "change the conversation to what the template accepts, or give the model another chat "
        "template")


def test_a_template_that_moves_earlier_turns_is_refused_not_mistrained(tokenizer):
    tok = with_template(tokenizer, MOVING)
    # one turn: stable, fine
    assert encode_chat(tok, [SYSTEM, USER, ANSWER]).n_targets > 0
    with pytest.raises(DataError) as err:
        encode_chat(tok, [SYSTEM, USER, ANSWER, {"role": "user", "content": "again"}, ANSWER])
    assert "renders earlier turns differently once later turns are added (message 3, an " \
        "assistant turn," in str(err.value)
    assert "split the conversation into one example per assistant turn" in str(err.value)
    # the advice works: earlier turns with weight 0, only the last is located
    quiet = {**ANSWER, "weight": 0}
    assert encode_chat(tok, [SYSTEM, USER, quiet, {"role": "user", "content": "again"},
                             ANSWER]).n_targets > 0
