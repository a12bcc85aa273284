"""Fold look-alike letters from another script into the script of the word they sit in.

"Imρlications" (Greek rho) becomes "Implications"; "Οbservɑtiona" (Greek omicron, Latin
alpha) becomes "Observationa"; "Ελληνικά" stays Greek. The character data is Unicode's
confusables list and script table, as shipped by ``confusable_homoglyphs``.

Rules, chosen to leave genuine text alone:

* a word's script is the one most of its letters belong to; a tie folds nothing ("kΩ");
* only Latin, Greek and Cyrillic fold into each other: they are where spoofed and
  OCR-mangled text comes from, while CJK scripts mix legitimately inside one word;
* inside a Latin word, IPA and phonetic-extension letters (ɑ, ɡ, ɩ, ᴅ...) also fold to their
  ASCII look-alikes: they almost never occur in prose, unlike letters such as Turkish "ı",
  which are left alone;
* a character folds only to a single letter of the target script (ASCII for Latin).
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

FOLDING_SCRIPTS = frozenset({"LATIN", "GREEK", "CYRILLIC"})
_WORD = re.compile(r"\w+")
# IPA Extensions, Phonetic Extensions (+ Supplement), Latin small capitals
_PHONETIC = ((0x0250, 0x02AF), (0x1D00, 0x1DBF))


@lru_cache(maxsize=4096)
def script_of(char: str) -> str:
    """The Unicode script alias of a character (LATIN, GREEK, COMMON...)."""
    from confusable_homoglyphs import categories

    try:
        return str(categories.alias(char))
    except Exception:  # characters outside the shipped tables (new Unicode versions)
        return "UNKNOWN"


def _is_phonetic(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _PHONETIC)


@lru_cache(maxsize=4096)
def look_alike(char: str, script: str) -> str | None:
    """A letter of ``script`` that ``char`` is confusable with, or None."""
    from confusable_homoglyphs import confusables

    for glyph in confusables.confusables_data.get(char, ()):
        candidate = glyph["c"]
        if len(candidate) != 1 or not candidate.isalpha() or candidate == char:
            continue
        if script == "LATIN" and not candidate.isascii():
            continue
        if script_of(candidate) == script and not _is_phonetic(candidate):
            return candidate
    return None


def _fold_word(word: str, counts: Counter[str] | None) -> str:
    scripts = [script_of(c) for c in word]
    tally = Counter(s for s in scripts if s in FOLDING_SCRIPTS)
    if not tally:
        return word
    (top, n_top), *rest = tally.most_common()
    if rest and rest[0][1] == n_top:
        return word  # no majority: cannot tell which script the writer meant
    out = []
    for char, script in zip(word, scripts, strict=True):
        foreign = script in FOLDING_SCRIPTS and script != top
        phonetic = top == "LATIN" and script == "LATIN" and _is_phonetic(char)
        replacement = look_alike(char, top) if foreign or phonetic else None
        if replacement is not None:
            out.append(replacement)
            if counts is not None:
                counts["confusable_chars"] += 1
        else:
            out.append(char)
    return "".join(out)


def fold_confusables(text: str, counts: Counter[str] | None = None) -> str:
    """``text`` with look-alike letters folded into each word's script; counts folded chars."""
    if text.isascii():
        return text
    return _WORD.sub(lambda m: m.group(0) if m.group(0).isascii()
                     else _fold_word(m.group(0), counts), text)
