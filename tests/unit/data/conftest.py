"""Fixtures for the data tests: write rows in any container."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def write_lines(tmp_path: Path):
    """Write str/bytes/dict lines to a file; dicts become JSON."""

    def write(lines: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        out = b""
        for line in lines:
            if isinstance(line, (dict, list)):
                line = json.dumps(line, ensure_ascii=False)
            out += (line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n"
        path.write_bytes(out)
        return path

    return write
