"""Find personal data in text and replace it with typed placeholders such as ``[EMAIL]``.

Recognisers, each with the strongest check that exists for its kind:

===============  =================================================================
``EMAIL``        address pattern (local part may hold any letters)
``PHONE``        ``phonenumbers`` in each configured region; a number counts when it is
                 valid for a region, or merely possible but written like a phone number
                 (``+``, brackets) or preceded by a word such as "call", "tel", "mobile"
``CREDIT_CARD``  13-19 digits (12 for Maestro) in consistent groups, a card-network
                 prefix, and the Luhn checksum (``python-stdnum``)
``IBAN``         country code, check digits and country-specific length and layout;
                 mod-97 checksum (``python-stdnum``)
``IP_ADDRESS``   IPv4 and IPv6 candidates confirmed by ``ipaddress``
``US_SSN``       ddd-dd-dddd (or 9 digits after "SSN"), with the SSA's rules on
                 unissued areas, groups and serials (``python-stdnum``)
``URL``          http(s)/ftp or www. links (optional)
``NAME``         optional and off by default: a heuristic, not a model. Capitalised words
                 after a title (Mr, Dr, Frau, Mme...), after "my name is", "name:",
                 "patient:", "dear", or on the line after a sign-off ("Regards,"). Names
                 that appear without such a cue are missed.
===============  =================================================================

Overlaps go to the kind listed first in ``ENTITIES`` (an IBAN is not also a phone number).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import regex as re  # \p{Lu} and friends, for names in any Latin-script language

ENTITIES = ("EMAIL", "URL", "IBAN", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "PHONE", "NAME")
DEFAULT_ENTITIES = frozenset({"EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "US_SSN"})
DEFAULT_REGIONS = ("US", "GB", "DE", "FR", "NL", "ES", "IT", "BE", "CH", "AT", "IE", "PT",
                   "CA", "AU", "IN", "BR")


@dataclass(frozen=True)
class RedactOptions:
    """Which kinds of personal data to replace, and the phone regions to recognise."""

    entities: frozenset[str] = DEFAULT_ENTITIES
    regions: tuple[str, ...] = DEFAULT_REGIONS

    def __post_init__(self) -> None:
        unknown = set(self.entities) - set(ENTITIES)
        if unknown:
            raise ValueError(f"unknown entity type(s) {sorted(unknown)}; expected some of "
                             + ", ".join(ENTITIES))


@dataclass(frozen=True)
class PiiSpan:
    start: int
    end: int
    entity: str
    text: str


_EMAIL = re.compile(r"(?<![\w.+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_URL = re.compile(r"(?<![\w@])(?:(?:https?|ftp)://|www\.)[^\s<>\"'`{}|\\^\[\]]+", re.IGNORECASE)
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,30}(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\d+-])\d{3,6}(?:([ -])\d{3,6})(?:\1\d{1,6}){0,4}(?![\d-])"
                   r"|(?<![\d+-])\d{12,19}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
_SSN_CONTEXT = re.compile(r"(?i:\bssn\b|social security(?: number)?|ss#)\W{0,5}(\d{9})(?!\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}"
                   r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")
# digit groups joined by single separators, with bracketed area codes and extensions; two
# numbers apart by ".  " or a double space stay two candidates
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+])(?:\+|00)?(?:\(\+?\d{1,5}\)[ .-]?|\d)"
    r"(?:\d|[ .\-/]\d|[ .\-/]?\(\d{1,5}\)[ .\-/]?\d)*"
    r"(?:\s?(?:x|ext\.?|extension|#)\s?\d{1,6})?(?!\w)")
# a phone word, then at most three short words ("call me at", "reach the ward on")
_PHONE_CUE = re.compile(r"(?i)\b(?:call|phone|tel|telephone|mobile|cell|fax|ring|text|sms|"
                        r"whatsapp|contact|reach|my number|nummer|numéro|téléphone|telefon|"
                        r"telefoon|bel|appel\w*|rappel\w*|joindre|tél|rufnummer|handy|portable|"
                        r"móvil|llame|cellulare|chiamare)\b(?:[^\w\n]+\w{1,6}){0,3}[^\w\n]*$")
# words before a number that say it is an identifier, not a phone or card number
_ID_CUE = re.compile(r"(?i)(?:\b(?:order|invoice|tracking|ticket|ref|reference|batch|case|"
                     r"parcel|shipment|sku|serial|id|mrn|policy|claim|member|account|acct|"
                     r"patient id)(?:\s*(?:number|no\.?|nr\.?|id))?|#)[^\n\w]{0,4}$")
_DAY, _MONTH, _YEAR = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])", r"(?:19|20)\d{2}"
_DATE = re.compile(rf"(?<!\d)(?:{_YEAR}[-./]{_MONTH}[-./]{_DAY}|{_DAY}[-./]{_MONTH}[-./]{_YEAR}"
                   rf"|{_MONTH}/{_DAY}/(?:{_YEAR}|\d{{2}}))(?!\d)")
_MAESTRO_PREFIXES = ("5018", "5020", "5038", "56", "57", "58", "6304", "6759", "6761", "6762",
                     "6763", "0604", "6390")
_TITLE = (r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Herr|Frau|Mme|Mlle|Mevr|Dhr|Sr|Sra|Sig|Sig\.ra|"
          r"Dott|Dott\.ssa)\.?")
# Anna, O'Brien, McCarthy, Anna-Marie
_NAME_WORD = r"\p{Lu}(?:['’]\p{Lu})?\p{Ll}+(?:\p{Lu}\p{Ll}+)?(?:-\p{Lu}\p{Ll}+)?"
_PARTICLE = r"(?:van der|van den|van de|van|von|de la|de|del|della|da|di|du|le|la|ten|ter)"
# words of one name are one space apart: a line break or double space ends the name
_NAME_BODY = rf"{_NAME_WORD}(?: (?:{_PARTICLE} )?{_NAME_WORD}){{0,2}}"
_NAME = re.compile(
    rf"(?:\b{_TITLE}\s+|(?i:\bmy name is|\bname\s*:|\bpatient\s*:|\bdear)\s+"
    rf"|(?i:\b(?:regards|sincerely|thanks|thank you|cheers|best|mit freundlichen grüßen|"
    rf"cordialement|met vriendelijke groet|saludos|cordiali saluti),[^\S\n]*\n))"
    rf"(?P<name>{_NAME_BODY})")


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _emails(text: str) -> Iterator[PiiSpan]:
    for m in _EMAIL.finditer(text):
        yield PiiSpan(m.start(), m.end(), "EMAIL", m.group())


def _urls(text: str) -> Iterator[PiiSpan]:
    for m in _URL.finditer(text):
        url = m.group().rstrip(".,;:!?)'\"")
        yield PiiSpan(m.start(), m.start() + len(url), "URL", url)


def _ibans(text: str) -> Iterator[PiiSpan]:
    from stdnum import iban

    for m in _IBAN.finditer(text):
        candidate = m.group()
        # the pattern may run into a following capitalised word: shorten until it checks out
        while len(candidate.replace(" ", "")) >= 12:
            if iban.is_valid(candidate):
                yield PiiSpan(m.start(), m.start() + len(candidate), "IBAN", candidate)
                break
            cut = candidate.rfind(" ")
            if cut < 0:
                break
            candidate = candidate[:cut]


def _is_card_number(number: str) -> bool:
    from stdnum import luhn

    if not 12 <= len(number) <= 19 or len(set(number)) == 1:
        return False
    if len(number) == 12 and not number.startswith(_MAESTRO_PREFIXES):
        return False  # only Maestro issues 12-digit cards
    return (number[0] in "123456" or number.startswith("0604")) and luhn.is_valid(number)


def _cards(text: str) -> Iterator[PiiSpan]:
    for m in _CARD.finditer(text):
        if _is_card_number(_digits(m.group())) and not _ID_CUE.search(text, 0, m.start()):
            yield PiiSpan(m.start(), m.end(), "CREDIT_CARD", m.group())


def _ssns(text: str) -> Iterator[PiiSpan]:
    from stdnum.us import ssn

    for m in _SSN.finditer(text):
        if ssn.is_valid(m.group(1) + m.group(3) + m.group(4)):
            yield PiiSpan(m.start(), m.end(), "US_SSN", m.group())
    for m in _SSN_CONTEXT.finditer(text):
        if ssn.is_valid(m.group(1)):
            yield PiiSpan(m.start(1), m.end(1), "US_SSN", m.group(1))


def _ips(text: str) -> Iterator[PiiSpan]:
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            candidate = m.group()
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                continue
            yield PiiSpan(m.start(), m.end(), "IP_ADDRESS", candidate)


def _phone_in(candidate: str, regions: tuple[str, ...]) -> Iterator[tuple[int, int, bool]]:
    """(start, end, valid) of the phone numbers phonenumbers finds in a candidate run."""
    import phonenumbers as pn

    found: dict[tuple[int, int], bool] = {}
    for region in regions:
        for match in pn.PhoneNumberMatcher(candidate, region, leniency=pn.Leniency.POSSIBLE):
            key = (match.start, match.end)
            found[key] = found.get(key, False) or pn.is_valid_number(match.number)
        if candidate.lstrip("(").startswith(("+", "00")) and found:
            break  # an international number reads the same from every region
    yield from ((s, e, v) for (s, e), v in found.items())


def _is_phone(raw: str, valid: bool, before: str) -> bool:
    """Whether a number phonenumbers found reads as a phone number in its context.

    With many regions nearly any 7-12 digit run is a valid number somewhere, so validity
    alone is not enough: the number must also be written like one (+, brackets, groups) or
    follow a word such as "call"; identifiers ("order #...") and dates never count.
    """
    if _ID_CUE.search(before) or _DATE.search(raw) or _SSN.fullmatch(raw):
        return False  # an SSN-shaped number that failed the SSN rules is not a phone either
    if _PHONE_CUE.search(before):
        return True
    international = raw.startswith(("+", "00", "(+"))
    grouped = raw.startswith("(") or any(not c.isdigit() for c in raw.strip("+"))
    # a national trunk prefix: most of Europe writes phone numbers as 0 + 8-10 digits
    trunk = raw.startswith("0") and 9 <= len(raw) <= 11 and raw.isdigit()
    return international or (valid and (grouped or trunk))


def _phones(text: str, regions: tuple[str, ...]) -> Iterator[PiiSpan]:
    for m in _PHONE_CANDIDATE.finditer(text):
        if len(_digits(m.group())) < 7:
            continue
        spans = sorted(_phone_in(m.group(), regions), key=lambda s: (s[0], s[0] - s[1]))
        last_end = -1
        for start, end, valid in spans:
            if start < last_end:
                continue  # a shorter reading inside one already taken
            at = m.start() + start
            if _is_phone(m.group()[start:end], valid, text[max(0, at - 40):at]):
                last_end = end
                yield PiiSpan(at, m.start() + end, "PHONE", m.group()[start:end])


def _names(text: str) -> Iterator[PiiSpan]:
    for m in _NAME.finditer(text):
        yield PiiSpan(m.start("name"), m.end("name"), "NAME", m.group("name"))


def find_pii(text: str, options: RedactOptions | None = None) -> list[PiiSpan]:
    """Non-overlapping spans of personal data in ``text``, in order."""
    opts = options or RedactOptions()
    if not text:
        return []
    wanted = opts.entities
    candidates: list[PiiSpan] = []
    candidates += _emails(text)
    candidates += _urls(text)  # always found: a URL's digits are not a phone number
    if "IBAN" in wanted:
        candidates += _ibans(text)
    if "CREDIT_CARD" in wanted:
        candidates += _cards(text)
    if "US_SSN" in wanted:
        candidates += _ssns(text)
    if "IP_ADDRESS" in wanted:
        candidates += _ips(text)
    if "PHONE" in wanted:
        candidates += _phones(text, opts.regions)
    if "NAME" in wanted:
        candidates += _names(text)
    rank = {name: i for i, name in enumerate(ENTITIES)}
    taken: list[PiiSpan] = []
    for span in sorted(candidates, key=lambda s: (rank[s.entity], s.start - s.end)):
        if all(span.end <= t.start or span.start >= t.end for t in taken):
            taken.append(span)
    return sorted((s for s in taken if s.entity in wanted), key=lambda s: s.start)


def redact_text(text: str, options: RedactOptions | None = None,
                counts: Counter[str] | None = None) -> str:
    """``text`` with each piece of personal data replaced by its placeholder, e.g. ``[EMAIL]``.

    ``counts``, when given, grows by one per replacement under the entity name.
    """
    spans = find_pii(text, options)
    if not spans:
        return text
    parts, at = [], 0
    for span in spans:
        parts += [text[at:span.start], f"[{span.entity}]"]
        at = span.end
        if counts is not None:
            counts[span.entity] += 1
    parts.append(text[at:])
    return "".join(parts)
