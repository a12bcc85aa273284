"""Every bad input gets one clear message naming file/line/field, exit code 2, no traceback."""

import pytest

from tests.helpers import review_rows


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
    assert_clean_failure(*cli("run", str(cfg)), "train.jsonl line 7: invalid_json: invalid JSON")


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


def test_an_unknown_base_model_fails_before_any_data_is_read(make_config, cli, tmp_path):
    # the data file is broken too: the model error must come first, with nothing read
    cfg = make_config(model={"base": "no-such-model"})
    (tmp_path / "train.jsonl").write_bytes(b"\xff\xfe not json\n")
    code, out, err = cli("run", str(cfg))
    assert code == 2
    assert "unknown model" in err and "no-such-model" in err
    assert "line 1" not in err and "train.jsonl" not in err
    assert not (tmp_path / "run").exists()  # no run directory made either


def test_the_run_screen_is_free_of_library_chatter(make_config, tmp_path):
    import subprocess
    import sys

    # a real process, as a user runs it: pytest's own warning capture is not in the way
    done = subprocess.run([sys.executable, "-W", "default", "-m", "tunesmith.cli", "run",
                           str(make_config(train={"epochs": 1})), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    screen = done.stdout + done.stderr
    for noise in ("Loading weights", "Writing model shards", "FutureWarning", "deprecated",
                  "UserWarning"):
        assert noise not in screen, noise
    assert "run directory" in screen
    # ... and the run's log has them, for whoever needs them
    assert "deprecated" in (tmp_path / "run" / "run.log").read_text()
