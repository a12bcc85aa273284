"""The compression report (``flows.compress_report``) from entries built by hand: one table row
per model in compression.md and compression.html, the size/accuracy plot, tokens per second,
and old or broken entries shown with '-' rather than failing."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from tunesmith.flows import compress_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def model_row(name: str, *, size: int, accuracy: float, tokens_per_s: float | None = None
              ) -> dict:
    row = {"model": name, "path": f"/runs/x/{name}", "parameters": 1_000_000,
           "nonzero_parameters": 500_000 if name != "tuned" else 1_000_000,
           "size_bytes": size, "accuracy": accuracy, "f1_positive": accuracy - 0.05,
           "perplexity": 12.5, "latency": {"n": 8, "p50_ms": 40.0, "p95_ms": 55.0},
           "metrics": {"accuracy": accuracy}}
    if tokens_per_s is not None:
        row["generation"] = {"prompts": 8, "new_tokens": 256, "tokens_per_s": tokens_per_s}
    return row


def entry(kind: str, *, size: int, accuracy: float, created: str, tokens: bool = True,
          **extra) -> dict:
    diff = accuracy - 0.9
    return {"kind": kind, "test_items": 50, "positive_label": "spam",
            "primary_metric": "accuracy", "created": created, "max_test": None,
            "tuned": model_row("tuned", size=4_000_000, accuracy=0.9,
                               tokens_per_s=100.0 if tokens else None),
            "compressed": model_row(kind, size=size, accuracy=accuracy,
                                    tokens_per_s=80.0 if tokens else None),
            "comparison": {"accuracy": {"tuned": 0.9, "compressed": accuracy,
                                        "difference": diff, "ci_low": diff - 0.04,
                                        "ci_high": diff + 0.03, "confidence": 0.95, "n": 50,
                                        "n_resamples": 1000}},
            "speed_p50": 1.1, "speed_cpu_p50": 1.2, **extra}


def table_rows(md: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    # rows[0] is the header, rows[1] the rule under it
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[2:]}


def record_all(folder: Path, *entries: dict) -> None:
    for e in entries:
        compress_report.record(folder, "sms-spam", e)


def test_every_model_has_a_row_the_plot_and_the_page(tmp_path: Path) -> None:
    record_all(tmp_path,
               entry("wanda-50-unstructured", size=4_000_000, accuracy=0.86,
                     created="2026-01-01T10:00:00+00:00"),
               entry("int8", size=1_500_000, accuracy=0.89, created="2026-01-01T11:00:00+00:00"),
               entry("distil-1", size=2_000_000, accuracy=0.8, created="2026-01-01T12:00:00+00:00",
                     compression={"distil": {"layers": 1, "teacher_layers": 2}}))
    report = json.loads((tmp_path / "compression.json").read_text())
    assert set(report["models"]) == {"wanda-50-unstructured", "int8", "distil-1"}

    md = (tmp_path / "compression.md").read_text()
    rows = table_rows(md)
    assert list(rows) == ["tuned", "distil-1", "int8", "wanda-50-unstructured"]
    header = [c.strip() for c in md.split("\n| model |")[1].split("\n")[0].split("|")]
    tokens = header.index("tokens/s") + 1  # +1: the row's first cell is the model
    assert rows["tuned"][tokens] == "100.0" and rows["int8"][tokens] == "80.0"
    assert rows["int8"][header.index("size") + 1] == "1.5 MB"
    assert rows["int8"][header.index("Δ accuracy vs tuned, points [95% CI]") + 1] \
        == "-1.0 [-5.0, +2.0]"
    assert "![size on disk against accuracy](compression.png)" in md
    assert "distil-1: layers 1, teacher_layers 2" in md

    png = (tmp_path / "compression.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000

    html = (tmp_path / "compression.html").read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', html)
    assert embedded and base64.b64decode(embedded.group(1)) == png
    for name in ("tuned", "distil-1", "int8", "wanda-50-unstructured"):
        assert f"<tr><td>{name}</td>" in html
    assert "Tokens/s: greedy generation" in html
    assert not list(tmp_path.glob("*.tmp*"))  # every file was renamed into place


def test_a_new_entry_rewrites_all_three(tmp_path: Path) -> None:
    record_all(tmp_path, entry("int8", size=1_500_000, accuracy=0.89,
                               created="2026-01-01T11:00:00+00:00"))
    before = (tmp_path / "compression.png").read_bytes()
    assert "magnitude-50-2of4" not in (tmp_path / "compression.html").read_text()
    record_all(tmp_path, entry("magnitude-50-2of4", size=4_000_000, accuracy=0.7,
                               created="2026-01-01T12:00:00+00:00"))
    assert (tmp_path / "compression.png").read_bytes() != before
    assert "<tr><td>magnitude-50-2of4</td>" in (tmp_path / "compression.html").read_text()
    assert "magnitude-50-2of4" in table_rows((tmp_path / "compression.md").read_text())


def test_old_and_broken_entries_show_dashes(tmp_path: Path) -> None:
    old = entry("magnitude-50-unstructured", size=4_000_000, accuracy=0.85, tokens=False,
                created="2026-01-01T09:00:00+00:00")
    for key in ("speed_p50", "speed_cpu_p50"):
        del old[key]
    del old["compressed"]["latency"], old["compressed"]["size_bytes"]
    broken = {"kind": "distil-2", "compressed": {"model": "distil-2", "accuracy": None},
              "comparison": {"accuracy": {"difference": 0.1}}}  # no CI
    record_all(tmp_path, old, broken)
    rows = table_rows((tmp_path / "compression.md").read_text())
    assert list(rows) == ["tuned", "distil-2", "magnitude-50-unstructured"]
    assert rows["distil-2"][1:] == ["-"] * (len(rows["distil-2"]) - 1)
    m = rows["magnitude-50-unstructured"]
    assert m[3] == "-" and m[4] == "0.850" and m[-1] == "-" and m[-2] == "-"
    assert rows["tuned"][-1] == "-"  # no generation measured either
    # the tuned model is plotted (the other two lack a size or the metric)
    assert (tmp_path / "compression.png").read_bytes().startswith(PNG_MAGIC)
    assert "<tr><td>distil-2</td>" in (tmp_path / "compression.html").read_text()


def test_nothing_to_plot_leaves_the_image_out(tmp_path: Path) -> None:
    record_all(tmp_path, {"kind": "int8"})
    md = (tmp_path / "compression.md").read_text()
    assert "| int8 |" in md and "compression.png" not in md
    assert not (tmp_path / "compression.png").exists()
    assert "not found" not in (tmp_path / "compression.html").read_text()


def test_a_report_with_no_models_says_so() -> None:
    assert "No compressed models yet." in compress_report.markdown({"models": {}})
