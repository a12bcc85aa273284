"""tunesmith run on messy classification rows: format detection, skip, clean, redact, rejects."""

import json
import random

WORDS = ("kettle", "battery", "screen", "strap", "lid", "handle", "cable", "motor", "filter",
         "blade", "hinge", "lens", "button", "charger", "speaker", "pump", "valve", "wheel",
         "drawer", "zipper", "sensor", "cushion", "frame", "nozzle")


def review(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.sample(WORDS, 7))


def test_run_reads_tsv_skips_bad_rows_cleans_and_redacts(make_config, cli, tmp_path):
    lines = ["label\ttext"]
    for i in range(59):
        lines.append(f"{'good' if i % 2 == 0 else 'bad'}\t{review(i)}")
    lines.append(f"good\t{review(0)}")  # an exact duplicate of row 1
    lines.append(f"good\t{review(2)}!")  # a near duplicate of row 3
    lines.append("bad\tmail me at jane.doe@example.com, it broke")
    lines.append("only-one-column")  # a broken row
    data = tmp_path / "reviews.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = make_config(
        data={"train_file": "reviews.tsv", "system_prompt": "Label the review as good or bad.",
              "on_error": "skip", "clean": True, "redact": True, "max_length": 128},
        eval={"forgetting": False})
    code, out, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    rejects = [json.loads(x) for x in (run / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["code"] for r in rejects}
    assert reasons == {"duplicate", "near_duplicate", "data_type"} and len(rejects) == 3
    broken = next(r for r in rejects if r["code"] == "data_type")
    assert broken["line"] == 64 and broken["problems"][0]["line"] == 64
    kept = [json.loads(x) for name in ("train", "validation", "test")
            for x in (run / "data" / f"{name}.jsonl").read_text().splitlines()]
    assert len(kept) == 60  # 63 rows = 60 kept + duplicate + near duplicate + broken
    texts = " ".join(m["content"] for ex in kept for m in ex["messages"])
    assert "jane.doe@example.com" not in texts and "[EMAIL]" in texts
    assert all(ex["messages"][0]["content"] == "Label the review as good or bad."
               for ex in kept)
