"""Every bad input gets one clear message naming file/line/field, exit code 2, no traceback."""

import pytest

from tests.conftest import review_rows


def assert_clean_failure(code, out, err, *fragments):
    text = out + err
    assert code == 2, text
    assert "Traceback" not in text
    for f in fragments:
        assert f in text, (f, text)


def test_missing_data_file(make_config, cli, tmp_path):
    cfg = make_config()
    (tmp_path / "train.jsonl").unlink()
    assert_clean_failure(*cli("run", str(cfg)), "train.jsonl", "no such file")


def test_unreadable_json_line(make_config, cli):
    cfg = make_config()
    path = cfg.parent / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "hi"},'
    path.write_text("\n".join(lines) + "\n")
    assert_clean_failure(*cli("run", str(cfg)), "train.jsonl line 7: invalid JSON")


def test_wrong_role(make_config, cli):
    rows = review_rows(60)
    rows[40]["messages"][2]["role"] = "assitant"
    cfg = make_config(rows)
    assert_clean_failure(*cli("run", str(cfg)), "line 41: messages[2].role",
                         '"assitant"', 'did you mean "assistant"')


def test_empty_file(make_config, cli):
    cfg = make_config([])
    assert_clean_failure(*cli("run", str(cfg)), "train.jsonl", "the file is empty")


def test_model_path_that_does_not_exist(make_config, cli, tmp_path):
    cfg = make_config(model={"base": str(tmp_path / "no-such-model")})
    assert_clean_failure(*cli("run", str(cfg)), "unknown model", "no-such-model", "Tried:")


def test_config_typo(make_config, cli):
    cfg = make_config(train={"lerning_rate": 0.1})
    assert_clean_failure(*cli("run", str(cfg)), "train.lerning_rate: unknown key",
                         "did you mean 'learning_rate'")


def test_debug_shows_the_traceback(make_config, cli):
    cfg = make_config([])
    code, out, err = cli("--debug", "run", str(cfg))
    assert code != 0  # the exception propagates instead of being summarised


@pytest.mark.parametrize("args", [("chat", "no-such-model", "--prompt", "hi"),
                                  ("run", "missing.yaml")])
def test_other_commands_fail_cleanly(cli, args):
    code, out, err = cli(*args)
    assert_clean_failure(code, out, err)


def test_config_init_writes_a_loadable_file(cli, tmp_path):
    target = tmp_path / "my.yaml"
    code, out, err = cli("config", "init", str(target))
    assert code == 0, err
    code, out, err = cli("config", "check", str(target))
    assert code == 0, err
    assert "train_file" in out
    assert_clean_failure(*cli("config", "init", str(target)), "exists")


def test_labels_outside_the_declared_set(make_config, cli):
    rows = review_rows(60)
    rows[3]["messages"][2]["content"] = "neutral"
    cfg = make_config(rows)
    code, out, err = cli("run", str(cfg))
    assert_clean_failure(code, out, err, "['neutral']", "line 4")
