import itertools
from collections import Counter

from tunesmith.data.dedup import MinHasher
from tunesmith.data.split import split_examples
from tunesmith.flows.prepare import split_file

from .helpers import chat_row, distinct_rows, read_jsonl


def _with_near_copies(n_base: int) -> list[dict]:
    """Labelled rows where every fifth row has two near-copies further down the file."""
    rows = distinct_rows(n_base, label=True, sentences=8)
    copies = []
    for row in rows[::5]:
        text = row["messages"][0]["content"]
        for copy in (text.rstrip(".") + "!", "Re: " + text.replace(" ", "  ")):
            copies.append({**chat_row(copy, row["label"]), "label": row["label"]})
    return rows + copies


def test_split_keeps_old_behaviour_and_accepts_groups():
    items = list(range(100))
    groups = [i // 4 for i in items]  # 25 groups of 4
    parts = split_examples(items, validation_fraction=0.2, test_fraction=0.2, seed=3,
                           groups=groups)
    where = {i: name for name in ("train", "validation", "test") for i in getattr(parts, name)}
    assert all(len({where[i] for i in items if groups[i] == g}) == 1 for g in set(groups))
    assert (len(parts.train), len(parts.validation), len(parts.test)) == (60, 20, 20)


def test_no_near_duplicate_pair_crosses_splits(tmp_path, write_lines):
    rows = _with_near_copies(200)
    report = split_file(write_lines(rows), tmp_path / "splits", validation_fraction=0.15,
                        test_fraction=0.15, seed=11)
    assert report.tally.balanced and report.tally.written == len(rows)
    assert report.duplicate_groups == 40
    texts = {name: [r["messages"][0]["content"] + "\n" + r["messages"][1]["content"]
                    for r in read_jsonl(path)] for name, path in report.files.items()}
    hasher = MinHasher()
    shingles = {name: [set(hasher.shingles(t)) for t in ts] for name, ts in texts.items()}
    for a, b in itertools.combinations(shingles, 2):
        for sa, sb in itertools.product(shingles[a], shingles[b]):
            assert len(sa & sb) / len(sa | sb) < 0.9, f"a near-duplicate pair in {a} and {b}"


def test_split_is_seeded_and_stratified(tmp_path, write_lines):
    rows = distinct_rows(300, label=True)
    src = write_lines(rows)
    one = split_file(src, tmp_path / "a", seed=5)
    two = split_file(src, tmp_path / "b", seed=5)
    assert read_jsonl(one.files["test"]) == read_jsonl(two.files["test"])
    assert one.counts == {"train": 240, "validation": 30, "test": 30}
    share = Counter(r["label"] for r in rows)["spam"] / len(rows)
    for name in ("validation", "test"):
        labels = Counter(r["label"] for r in read_jsonl(one.files[name]))
        assert abs(labels["spam"] / 30 - share) <= 1 / 30
