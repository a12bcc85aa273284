"""report.html: the report's sections as one self-contained HTML file.

Self-contained means it can be mailed or attached to a ticket and still show everything: the
CSS is inline and each PNG plot is embedded as a base64 ``data:`` URI. No script, font or
stylesheet is fetched from anywhere. Every piece of text is HTML-escaped, since test inputs
and model replies are arbitrary user text.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from tunesmith.evaluation.sections import (
    Bullets,
    Image,
    Section,
    Table,
    Text,
    numeric_columns,
    report_sections,
)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 70rem; padding: 0 1rem; color: #1d2330; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d8dde6; padding-bottom: .2rem; }
.meta { color: #5a6272; }
nav a { margin-right: .8rem; font-size: .9rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #d8dde6; padding: .3rem .6rem; vertical-align: top; }
th { background: #f2f4f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid #e4e7ed; margin: .5rem 0; }
section#warnings { background: #fff6e5; border: 1px solid #f0c36d; padding: 0 1rem .5rem; }
.missing { color: #a33; font-style: italic; }
"""

def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _image(block: Image, run_dir: Path) -> str:
    path = run_dir / block.file
    if not path.is_file():
        return f'<p class="missing">plot {escape(block.file)} was not found</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escape(block.alt)}" src="data:image/png;base64,{data}">'


def _table(block: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in block.header)
    numeric = numeric_columns(block)
    rows = []
    for row in block.rows:
        cells = "".join(f'<td class="num">{escape(c)}</td>' if right else f"<td>{escape(c)}</td>"
                        for c, right in zip(row, numeric, strict=True))
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _block(block: Text | Bullets | Table | Image, run_dir: Path) -> str:
    if isinstance(block, Text):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Table):
        return _table(block)
    return _image(block, run_dir)


def render_html(results: dict[str, Any], run_dir: Path,
                sections: Sequence[Section] | None = None) -> str:
    """The whole report as one HTML page; plots are read from ``run_dir`` and embedded."""
    sections = sections if sections is not None else report_sections(results)
    return render_page(f"Run report: {results['name']}",
                       f"Base model: `{results['model']}` · task: {results['task']}",
                       sections, run_dir)


def render_page(title: str, meta: str, sections: Sequence[Section], base_dir: Path) -> str:
    """One self-contained page: a title, a meta line and sections; plots read from ``base_dir``.

    ``meta`` is plain text; a span in backticks shows as code, as it does in the Markdown.
    """
    nav = " ".join(f'<a href="#{_slug(s.title)}">{escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        inner = "\n".join(_block(b, Path(base_dir)) for b in s.blocks)
        body.append(f'<section id="{_slug(s.title)}"><h2>{escape(s.title)}</h2>\n{inner}'
                    "</section>")
    meta_html = re.sub(r"`([^`]*)`", r"<code>\1</code>", escape(meta))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{escape(title)}</h1>", f'<p class="meta">{meta_html}</p>',
        f"<nav>{nav}</nav>", *body, "</body>", "</html>", ""])
