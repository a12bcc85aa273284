import numpy as np
from datasketch import MinHash, MinHashLSH

from tunesmith.data.dedup import CompactMap, MinHasher, lsh_bands, near_duplicate_groups


def test_compact_map_keeps_the_first_value_across_merges():
    keys = np.random.default_rng(0).integers(0, 2**63, 5000, dtype=np.uint64)
    m = CompactMap(buffer_size=100)
    for i in range(0, 5000, 10):
        m.add_many(keys[i:i + 10], i)
    m.add_many(keys[:10], 999)  # already there: first value wins
    assert len(m) == 5000
    assert m.get(int(keys[3])) == 0 and m.get(int(keys[4321])) == 4320
    assert m.get(12345) is None
    assert m.get_many(keys[[5, 15, 16]]) == [0, 10]


def test_signatures_are_datasketch_minhash_values():
    hasher = MinHasher(num_perm=256)
    a = "the patient reports mild chest pain after exercise since monday"
    b = a.replace("monday", "tuesday")
    sa, sb = hasher.signature(a), hasher.signature(b)
    reference = MinHash(num_perm=256, seed=1, hashfunc=int)
    reference.update_batch(hasher.shingles(a).tolist())
    assert np.array_equal(reference.hashvalues, sa)
    true = len(set(hasher.shingles(a)) & set(hasher.shingles(b))) / len(
        set(hasher.shingles(a)) | set(hasher.shingles(b)))
    estimate = MinHash(hashvalues=sa, scheme="affine32").jaccard(
        MinHash(hashvalues=sb, scheme="affine32"))
    assert abs(estimate - true) < 0.1


def test_bands_follow_datasketch():
    lsh = MinHashLSH(threshold=0.7, num_perm=64)
    assert lsh_bands(0.7, 64) == (lsh.b, lsh.r)


def test_groups_are_transitive_and_seeded():
    base = "Order 1234 arrived damaged, the box was crushed and the lamp inside is broken"
    texts = [base, "Completely unrelated question about invoices and VAT numbers",
             base + " too", base.replace("lamp", "lamp!") + " too", "Another topic entirely"]
    groups = near_duplicate_groups(texts, 0.8)
    assert groups[0] == groups[2] == groups[3]
    assert len({groups[0], groups[1], groups[4]}) == 3
    assert groups == near_duplicate_groups(texts, 0.8)
