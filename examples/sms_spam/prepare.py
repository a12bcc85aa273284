"""Turn the SMS Spam Collection (label<TAB>text) into OpenAI chat JSONL for tunesmith.

    python examples/sms_spam/prepare.py   # writes examples/sms_spam/sms_spam.jsonl
"""

import csv
import json
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "Classify the SMS message as spam or ham. Answer with one word: spam or ham."


def main() -> None:
    with (HERE / "sms_spam.tsv").open(encoding="utf-8", newline="") as src, \
            (HERE / "sms_spam.jsonl").open("w", encoding="utf-8") as dst:
        for row in csv.DictReader(src, delimiter="\t", quoting=csv.QUOTE_NONE):
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": row["text"].strip()},
                        {"role": "assistant", "content": row["label"]}]
            dst.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
