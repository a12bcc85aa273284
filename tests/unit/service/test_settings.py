"""The service's settings refuse values no service can run with, naming the setting; the
CLI's options refuse them before, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.errors import ConfigError
from tunesmith.service import ServiceSettings


def settings(**values) -> ServiceSettings:
    return ServiceSettings(data_dir=Path("/nonexistent/svc"), home=Path("/nonexistent/home"),
                           **values)


@pytest.mark.parametrize("name,value", [
    ("max_upload_bytes", 0), ("cache_budget_bytes", -5), ("max_batch", 0),
    ("batch_window_ms", -1.0), ("batch_window_ms", 1e12), ("prompt_cache_bytes", -1),
    ("lease_seconds", 0), ("lease_seconds", float("nan")), ("poll_seconds", 0),
    ("torch_threads", 0), ("max_eval_examples", 0), ("max_batch", "8"), ("max_batch", True)])
def test_a_value_out_of_range_is_refused_by_name(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"service setting {name}: .* out of range"):
        settings(**{name: value})


def test_a_lease_must_outlast_the_renewals() -> None:
    # a worker renews its lease every poll: a lease under two polls would lapse in between
    with pytest.raises(ConfigError, match="lease_seconds: 2.0 must be more than twice"):
        settings(lease_seconds=2.0, poll_seconds=1.0)
    assert settings(lease_seconds=2.5, poll_seconds=1.0).lease_seconds == 2.5


def test_the_defaults_and_the_edges_are_taken() -> None:
    settings()
    settings(cache_budget_bytes=0, prompt_cache_bytes=0, batch_window_ms=0, max_batch=1,
             torch_threads=None, max_upload_bytes=1)


@pytest.mark.parametrize("option,value", [
    ("--port", "99999"), ("--port", "-1"), ("--cache-budget-mb", "-5"), ("--threads", "0"),
    ("--max-upload-mb", "0"), ("--lease-seconds", "1"), ("--batch-window-ms", "1e9"),
    ("--prompt-cache-mb", "-1"), ("--max-batch", "0")])
def test_serve_refuses_an_option_out_of_range(cli, option: str, value: str) -> None:
    code, out, err = cli("serve", option, value, "--no-worker")
    assert code == 2 and f"Invalid value for '{option}'" in out + err
