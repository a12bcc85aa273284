"""Text normalisation for training data: markup, Unicode, look-alikes, control characters,
whitespace. Each step counts the texts it changed, so a clean report can say what happened.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from tunesmith.data.homoglyphs import fold_confusables


@dataclass(frozen=True)
class TextOptions:
    """Which normalisation steps run (all by default)."""

    markup: bool = True  # HTML tags, comments, script/style blocks and entities
    nfkc: bool = True  # Unicode compatibility forms: fullwidth letters, ligatures, nbsp
    confusables: bool = True  # look-alike letters from another script (see homoglyphs.py)
    control: bool = True  # control and invisible formatting characters
    whitespace: bool = True  # runs of spaces, trailing spaces, blank-line runs, \r\n


# Only real HTML element names count as tags: a generic "<anything>" pattern would eat
# comparisons common in notes and tickets, such as "HR<60 and BP>140".
_TAG_NAMES = (
    "a|abbr|address|article|aside|audio|b|bdi|bdo|big|blockquote|body|br|button|caption|center|"
    "cite|code|col|colgroup|dd|del|details|dfn|div|dl|dt|em|embed|fieldset|figcaption|figure|"
    "font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|ins|kbd|label|legend|li|"
    "link|main|mark|meta|nav|noscript|o:p|object|ol|option|p|pre|q|s|samp|section|select|small|"
    "source|span|strike|strong|sub|summary|sup|table|tbody|td|textarea|tfoot|th|thead|time|"
    "title|tr|tt|u|ul|var|video|wbr")
_ATTRS = r"""(?:\s+[^\s"'<>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*\s*/?"""
_TAG = re.compile(rf"</?(?:{_TAG_NAMES})(?![\w:-]){_ATTRS}>", re.IGNORECASE)
# tags that end a line or block: replaced by a line break so words do not run together
_BREAK_TAG = re.compile(r"<(?:br|/?p|/?div|/?li|/?tr|/?h[1-6]|/?table|/?ul|/?ol|hr)(?![\w:-])"
                        + _ATTRS + ">", re.IGNORECASE)
_BLOCK = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
# entities only with their closing ";", so "AT&T" or "R&D" stay as they are
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# C0/C1 controls except tab, newline and page breaks (whitespace turns those into spaces),
# and invisible format characters that carry no meaning in training text (zero-width space,
# soft hyphen, BOM, bidi overrides). Zero-width (non-)joiners stay: emoji sequences and
# Persian or Indic words need them.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff"
                      "\u202a-\u202e\u2066-\u2069]")
_SPACES = re.compile(r"[^\S\n]+")
_TRAILING = re.compile(r" *\n *")
_BLANK_RUNS = re.compile(r"\n{3,}")


def strip_markup(text: str) -> str:
    """``text`` without HTML comments, script/style blocks and tags, with entities decoded."""
    if "<" in text:
        text = _BLOCK.sub(" ", text)
        text = _BREAK_TAG.sub("\n", text)
        text = _TAG.sub("", text)
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    return text


def normalize_whitespace(text: str) -> str:
    """One space between words, no trailing spaces, at most one blank line, trimmed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def clean_text(text: str, options: TextOptions | None = None,
               counts: Counter[str] | None = None) -> str:
    """``text`` after every enabled step; ``counts[step]`` grows by one per text it changed."""
    opts = options or TextOptions()
    counts = counts if counts is not None else Counter()

    def step(name: str, new: str) -> str:
        if new != text:
            counts[name] += 1
            return new
        return text

    if opts.markup:
        text = step("markup", strip_markup(text))
    if opts.nfkc and not text.isascii() and not unicodedata.is_normalized("NFKC", text):
        text = step("nfkc", unicodedata.normalize("NFKC", text))
    if opts.confusables:
        text = step("confusables", fold_confusables(text, counts))
    if opts.control:
        text = step("control", _CONTROL.sub("", text))
    if opts.whitespace:
        text = step("whitespace", normalize_whitespace(text))
    return text
