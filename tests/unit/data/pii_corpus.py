"""A seeded corpus of support tickets and clinical notes with personal data at known places.

Entities come from Faker in several locales; distractors (dates, times, amounts, order and
ticket numbers, doses, versions, postcodes) are mixed in, so precision is measured against
the kinds of numbers real notes are full of.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from faker import Faker

LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT")

TEMPLATES = {
    "EMAIL": ["Please send the invoice to {} today.", "Contact: {}", "Reply to {} asap",
              "Patient's email is {} (verified).", "cc {}, thanks", "Mail: <{}>"],
    "PHONE": ["Call me at {} tomorrow.", "My phone number is {}", "Tel: {}",
              "You can reach the ward on {} after 5pm.", "Mobile {} (evenings only)",
              "Please phone {} about the refund.", "Rappelez-moi au {} svp.",
              "Telefon: {}", "Bel mij op {} a.u.b.", "Contact number {}, ask for the desk."],
    "CREDIT_CARD": ["Card used: {} (expired?)", "charged to card {} twice",
                    "The customer read out {} on the call.", "CC {}"],
    "IBAN": ["Refund to IBAN {} please.", "Bank account {}.", "IBAN: {}",
             "Overboeken naar {} graag"],
    "IP_ADDRESS": ["Login from {} was blocked.", "Source IP {}", "client {} timed out",
                   "Seen at address {}."],
    "US_SSN": ["SSN {} on file.", "Social security number: {}", "ssn: {}",
               "Patient SSN is {}."],
    "URL": ["See {} for details.", "Portal link: {}", "Uploaded to {}"],
    "NAME": ["Dear {},", "My name is {} and I need help.", "Patient: {}",
             "Seen by Dr. {} today.", "Kind regards,\n{}", "Name: {}"],
}

DISTRACTORS = [
    "Order #{order} was shipped on {date}.", "Ticket INC{ticket} reopened at {time}.",
    "Invoice {year}-{inv} for €{amount} is overdue.", "Dose: 500 mg twice daily, BP 120/80.",
    "Updated the app to version {version} last week.", "Postcode {postcode}, room 4.12.",
    "Follow-up on {date2} at {time}.", "Paid ${amount} on {date}.", "HR<60 and BP>140 noted.",
    "Ref {ref} / batch {batch}.", "Temperature 38.5 C, weight 72.4 kg, 3 of 10 pain.",
    "Tracking number {tracking} shows delivered.", "Scheduled {date} {time}, bed 12B.",
    "MRN {mrn}, policy {policy}.", "Claim no. {mrn} approved.", "Qty 3 x {price} EUR",
]


@dataclass(frozen=True)
class Doc:
    text: str
    spans: list[tuple[int, int, str]]  # (start, end, entity)


def _value(fake: Faker, entity: str, rng: random.Random) -> str:
    if entity == "EMAIL":
        return rng.choice([fake.email, fake.free_email, fake.company_email])()
    if entity == "PHONE":
        return fake.phone_number()
    if entity == "CREDIT_CARD":
        number = fake.credit_card_number()
        if rng.random() < 0.4 and len(number) == 16:
            sep = rng.choice([" ", "-"])
            number = sep.join(number[i:i + 4] for i in range(0, 16, 4))
        return number
    if entity == "IBAN":
        iban = fake.iban()
        if rng.random() < 0.4:
            iban = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
        return iban
    if entity == "IP_ADDRESS":
        return fake.ipv4() if rng.random() < 0.6 else fake.ipv6()
    if entity == "US_SSN":
        return _ssn_fakers[0].ssn()  # SSNs are American whatever the locale
    if entity == "URL":
        return rng.choice([fake.url, fake.uri])()
    if entity == "NAME":
        return f"{fake.first_name()} {fake.last_name()}"
    raise ValueError(entity)


_ssn_fakers: list[Faker] = []


def _distractor(fake: Faker, rng: random.Random) -> str:
    return rng.choice(DISTRACTORS).format(
        order=rng.randint(10_000, 99_999_999), date=fake.date(pattern=rng.choice(
            ["%Y-%m-%d", "%d/%m/%Y", "%d.%m.%Y", "%B %d, %Y", "%m/%d/%y"])),
        date2=fake.date(pattern="%d.%m.%Y"),
        time=fake.time(pattern=rng.choice(["%H:%M", "%H:%M:%S"])),
        ticket=rng.randint(1_000_000, 9_999_999), year=rng.randint(2019, 2025),
        inv=f"{rng.randint(1, 999_999):06d}",
        amount=f"{rng.randint(1, 99_999):,}.{rng.randint(0, 99):02d}",
        version=f"{rng.randint(1, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
        postcode=fake.postcode(), ref=rng.randint(100_000, 9_999_999),
        batch=f"{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
        tracking=rng.randint(10**11, 10**12 - 1),
        mrn=f"{rng.randint(0, 10**9 - 1):010d}", policy=rng.randint(10**8, 10**10),
        price=f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}")


def make_corpus(n_docs: int = 400, *, seed: int = 0,
                entities: tuple[str, ...] = tuple(TEMPLATES)) -> list[Doc]:
    """``n_docs`` documents, each with 2-4 entities and 1-3 distractor sentences."""
    rng = random.Random(seed)
    fakers = {}
    for i, loc in enumerate(LOCALES):
        fakers[loc] = Faker(loc)
        fakers[loc].seed_instance(seed * 100 + i)
    _ssn_fakers[:] = [Faker("en_US")]
    _ssn_fakers[0].seed_instance(seed * 100 + 99)
    docs = []
    for _ in range(n_docs):
        fake = fakers[rng.choice(LOCALES)]
        parts: list[tuple[str, str | None, str | None]] = []
        for _ in range(rng.randint(2, 4)):
            entity = rng.choice(entities)
            parts.append((rng.choice(TEMPLATES[entity]), entity, _value(fake, entity, rng)))
        for _ in range(rng.randint(1, 3)):
            parts.append((_distractor(fake, rng), None, None))
        rng.shuffle(parts)
        text, spans = "", []
        for template, entity, value in parts:
            if text:
                text += rng.choice([" ", "\n", "  "])
            if entity is None:
                text += template
                continue
            before, after = template.split("{}")
            start = len(text) + len(before)
            text += before + value + after
            spans.append((start, start + len(value), entity))
        docs.append(Doc(text, spans))
    return docs


def score(docs: list[Doc], found: list[list[tuple[int, int, str]]]) -> dict[str, dict[str, float]]:
    """Recall and precision per entity type.

    A true entity counts as found when spans of its type cover every letter and digit of it
    (nothing identifying is left readable); a found span counts as right when it overlaps a
    true entity of its type.
    """
    stats: dict[str, dict[str, int]] = {}
    for doc, spans in zip(docs, found, strict=True):
        for start, end, entity in doc.spans:
            s = stats.setdefault(entity, {"true": 0, "recalled": 0, "found": 0, "right": 0})
            s["true"] += 1
            covered = all(any(a <= i < b for a, b, e in spans if e == entity)
                          for i in range(start, end) if doc.text[i].isalnum())
            s["recalled"] += covered
        for a, b, entity in spans:
            s = stats.setdefault(entity, {"true": 0, "recalled": 0, "found": 0, "right": 0})
            s["found"] += 1
            s["right"] += any(e == entity and a < end and b > start for start, end, e in doc.spans)
    return {e: {"recall": s["recalled"] / s["true"] if s["true"] else 1.0,
                "precision": s["right"] / s["found"] if s["found"] else 1.0,
                "n": s["true"]} for e, s in stats.items()}
