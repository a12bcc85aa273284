from collections import Counter

from tunesmith.data.split import sample, split_examples


def test_split_is_seeded_disjoint_and_stratified():
    items = list(range(1000))
    labels = ["spam" if i % 8 == 0 else "ham" for i in items]
    a = split_examples(items, validation_fraction=0.1, test_fraction=0.2, seed=1, labels=labels)
    b = split_examples(items, validation_fraction=0.1, test_fraction=0.2, seed=1, labels=labels)
    assert a == b
    assert (len(a.train), len(a.validation), len(a.test)) == (700, 100, 200)
    assert not set(a.train) & set(a.test) and not set(a.validation) & set(a.test)
    assert sorted(a.train + a.validation + a.test) == items
    assert Counter(labels[i] for i in a.test)["spam"] == 25  # 1/8 of 200


def test_sample_caps_and_keeps_order():
    items = list(range(100))
    got = sample(items, 10, seed=0, labels=["a" if i < 50 else "b" for i in items])
    assert len(got) == 10 and got == sorted(got)
    assert sum(1 for i in got if i < 50) == 5
    assert sample(items, None, seed=0) == items
