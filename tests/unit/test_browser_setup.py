"""How CI gets the browser tests' chromium (.ci/install-chromium) and what `make test` says
on a machine without it (tests/browser skips with one line on how to enable it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / ".ci" / "install-chromium"


def fake_bin(tmp_path: Path, uid: int, apt_ok: bool = True) -> Path:
    """A PATH with stand-ins for `id` and `apt-get` that log their calls, and no chromium."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {"id": f"echo {uid}",
               "apt-get": f'echo "apt-get $*" >> {log}; exit {0 if apt_ok else 100}'}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n", encoding="utf-8")
        path.chmod(0o755)
    return bin_dir


def run_script(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    # only the stand-ins on PATH (echo and command are bash builtins): a real chromium in
    # /usr/bin cannot be found, a real apt-get cannot run
    return subprocess.run(["/bin/bash", str(SCRIPT)], env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=30, check=False)


def test_ci_installs_chromium_with_apt_when_root(tmp_path: Path) -> None:
    done = run_script(fake_bin(tmp_path, uid=0))
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls.log").read_text(encoding="utf-8").splitlines()
    assert calls == ["apt-get update -qq", "apt-get install -y -qq chromium"]


@pytest.mark.parametrize(("uid", "apt_ok", "says"), [
    (1000, True, "cannot be installed here (needs root and apt-get)"),
    (0, False, "could not install chromium"),
])
def test_ci_goes_on_without_chromium_and_says_why(tmp_path: Path, uid: int, apt_ok: bool,
                                                  says: str) -> None:
    done = run_script(fake_bin(tmp_path, uid=uid, apt_ok=apt_ok))
    assert done.returncode == 0  # the suite still runs; the browser tests skip
    assert says in done.stderr and "the browser tests will skip" in done.stderr


def test_without_chromium_the_browser_tests_skip_with_one_line_on_how(tmp_path: Path) -> None:
    # a PATH holding only this Python's scripts: no chromium on it
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         str(REPO / "tests" / "browser")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    # alone, the skipped module leaves pytest nothing to run (exit 5); in the suite the
    # other tests run
    assert done.returncode in (0, 5), done.stdout + done.stderr
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1, done.stdout
    assert "browser tests need chromium and playwright: `apt-get install chromium`" in skips[0]
    assert "1 skipped" in done.stdout and "passed" not in done.stdout
