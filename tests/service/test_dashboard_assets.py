"""The dashboard's files as the server serves them (in-process, no browser): the page, its
modules, the security headers, the size budget, and that the package ships them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.helpers import REPO
from tunesmith.service import ServiceSettings, create_app
from tunesmith.service.web import ASSETS

FIRST_LOAD_BUDGET = 300 * 1024


@pytest.fixture
def api(tmp_path: Path, tiny_model_dir: Path, test_home: Path) -> Iterator[TestClient]:
    settings = ServiceSettings(data_dir=tmp_path / "svc", home=test_home,
                               base_models={"tiny": str(tiny_model_dir)})
    with TestClient(create_app(settings, worker=False)) as client:
        yield client


def test_the_page_and_every_module_it_imports_are_served(api: TestClient) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    # the page and what it loads: the stylesheet, the entry module and the modules it imports
    wanted = set(re.findall(r'(?:href|src)="(/dashboard/[\w.]+)"', page.text))
    for js in ASSETS.glob("*.js"):
        wanted |= {f"/dashboard/{m}" for m in re.findall(r'from "\./([\w.]+)"', js.read_text())}
    total = len(page.content)
    for path in sorted(wanted):
        resp = api.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["content-security-policy"] == csp
        total += len(resp.content)
    assert {p.name for p in ASSETS.iterdir()} == {p.rsplit("/", 1)[1] for p in wanted} | {
        "index.html"}
    assert total <= FIRST_LOAD_BUDGET
    assert api.get("/dashboard/nope.js").status_code == 404
    # the API is still the API
    assert api.get("/v1/models").status_code == 401


def test_no_third_party_resources_and_no_key_in_urls() -> None:
    for path in ASSETS.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path.name
        assert "localStorage" not in text and "console.log" not in text, path.name


def test_the_package_ships_the_dashboard() -> None:
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    assert '"service/dashboard/*"' in section.split("\n[")[0]
    assert ASSETS == REPO / "src" / "tunesmith" / "service" / "dashboard"
