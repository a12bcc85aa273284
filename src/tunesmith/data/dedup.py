"""Exact and near-duplicate detection that streams: MinHash signatures and an LSH band index.

Signatures come from ``datasketch.MinHash`` over character 5-grams of the lower-cased text
(character shingles catch near-copies of short texts, such as two SMS differing by one word,
that word shingles miss). ``datasketch.MinHashLSH`` picks the number of bands and rows, but
its in-memory index keeps about 3.4 KB per item (a set per bucket and a reverse map for
removal), too much for files of millions of examples. We only ever insert and query, so the
index here keeps each band key as 32 bits in sorted numpy arrays (8 bytes an entry with its
slot; a collision only costs one extra check) and spills the signatures to a temporary file,
read back only to verify a candidate.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads the 5-byte windows


class CompactMap:
    """An integer -> integer map that keeps the first value per key, in sorted numpy arrays:
    12-16 bytes an entry instead of ~100 for a Python dict.

    New keys wait in a small dict; when it fills they are sorted and inserted into the arrays
    with ``np.insert`` (one pass, so a merge needs the arrays' size again, not four times).
    """

    def __init__(self, key_dtype: Any = np.uint64, value_dtype: Any = np.int64,
                 buffer_size: int = 1 << 17) -> None:
        self._keys = np.empty(0, dtype=key_dtype)
        self._values = np.empty(0, dtype=value_dtype)
        self._buffer: dict[int, int] = {}
        self._buffer_size = buffer_size

    def __len__(self) -> int:
        return len(self._keys) + len(self._buffer)

    def _stored(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the arrays of ``keys``, and which of them are really there."""
        pos = np.searchsorted(self._keys, keys)
        pos[pos == len(self._keys)] = 0
        return pos, self._keys[pos] == keys

    def get_many(self, keys: np.ndarray) -> list[int]:
        """The values stored under any of ``keys`` (duplicates removed, first-seen order)."""
        keys = keys.astype(self._keys.dtype, copy=False)
        found: list[int] = []
        if len(self._keys):
            pos, hit = self._stored(keys)
            found.extend(self._values[pos[hit]].tolist())
        if self._buffer:
            found.extend(self._buffer[k] for k in keys.tolist() if k in self._buffer)
        return list(dict.fromkeys(found))

    def get(self, key: int) -> int | None:
        got = self.get_many(np.array([key], dtype=self._keys.dtype))
        return got[0] if got else None

    def add_many(self, keys: np.ndarray, value: int) -> None:
        """Store ``value`` under each key not stored yet."""
        keys = keys.astype(self._keys.dtype, copy=False)
        present: set[int] = set()
        if len(self._keys):
            pos, hit = self._stored(keys)
            present = set(keys[hit].tolist())
        for k in keys.tolist():
            if k not in present:
                self._buffer.setdefault(k, value)
        if len(self._buffer) >= self._buffer_size:
            self._flush()

    def _flush(self) -> None:
        n = len(self._buffer)
        new_keys = np.fromiter(self._buffer.keys(), dtype=self._keys.dtype, count=n)
        new_values = np.fromiter(self._buffer.values(), dtype=self._values.dtype, count=n)
        order = np.argsort(new_keys)
        new_keys, new_values = new_keys[order], new_values[order]
        # buffered keys are never in the arrays (add_many checks), so ties cannot occur
        at = np.searchsorted(self._keys, new_keys)
        self._keys = np.insert(self._keys, at, new_keys)
        self._values = np.insert(self._values, at, new_values)
        self._buffer.clear()


class _SignatureFile:
    """Signatures on disk, one fixed-size slot each: memory stays flat however many there are."""

    def __init__(self, num_perm: int) -> None:
        # held open for the index's lifetime and closed by close(), not a with-block
        self._fh = tempfile.TemporaryFile(prefix="tunesmith-minhash-")  # noqa: SIM115
        self._size = num_perm * 4  # datasketch's affine32 scheme: uint32 values

    def write(self, slot: int, signature: np.ndarray) -> None:
        os.pwrite(self._fh.fileno(), signature.astype(np.uint32).tobytes(), slot * self._size)

    def read(self, slot: int) -> np.ndarray:
        return np.frombuffer(os.pread(self._fh.fileno(), self._size, slot * self._size),
                             dtype=np.uint32)

    def close(self) -> None:
        self._fh.close()


class MinHasher:
    """MinHash signatures of texts over character shingles, deterministic for a seed.

    The permutations are datasketch's (``MinHash(num_perm, seed)``, affine32 scheme), and
    ``signature`` returns exactly ``MinHash.update_batch``'s hash values (a test checks it);
    it applies them to the whole shingle array at once instead of datasketch's per-item
    Python call, which is a third of the time on long texts.
    """

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 1) -> None:
        from datasketch import MinHash

        self.num_perm, self.shingle, self.seed = num_perm, shingle, seed
        template = MinHash(num_perm=num_perm, seed=seed)
        if template.scheme != "affine32":
            raise RuntimeError(f"datasketch {template.scheme} scheme; expected affine32")
        a, b = template.permutations
        self._a, self._b = a.astype(np.uint32)[None, :], b.astype(np.uint32)[None, :]

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the ``shingle``-byte windows of the lower-cased, space-collapsed
        text (repeats included: they do not change a minimum)."""
        data = np.frombuffer(" ".join(text.lower().split()).encode("utf-8"), dtype=np.uint8)
        if len(data) <= self.shingle:
            data = np.pad(data, (0, self.shingle - len(data) + 1))
        windows = np.lib.stride_tricks.sliding_window_view(data, self.shingle)
        packed = np.zeros(len(windows), dtype=np.uint64)
        for col in range(self.shingle):
            packed = (packed << np.uint64(8)) | windows[:, col].astype(np.uint64)
        return ((packed * _MULT) >> np.uint64(32)).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        hv = _fmix32(self.shingles(text))[:, None]
        return (hv * self._a + self._b).min(axis=0)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch pre-mixes inputs in its affine32 scheme."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@lru_cache(maxsize=32)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that datasketch finds best for ``threshold`` (equal weight on errors)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class NearDuplicateIndex:
    """Texts seen so far, queried for earlier texts whose Jaccard similarity >= threshold."""

    def __init__(self, threshold: float = 0.85, *, num_perm: int = 128, shingle: int = 5,
                 seed: int = 1) -> None:
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, shingle, seed)
        # bands tuned for a similarity 0.2 below the threshold: a pair at the threshold becomes
        # a candidate with probability >= 0.98 (tuned at the threshold itself it is ~0.5);
        # candidates are then verified against the threshold with their signatures
        self.bands, self.rows = lsh_bands(round(max(0.3, threshold - 0.2), 2), num_perm)
        # 32-bit band keys: a collision only costs one signature check, never a wrong answer
        self._buckets = CompactMap(np.uint32, np.int32)
        self._signatures = _SignatureFile(num_perm)
        self._ids = array("q")  # slot -> caller's id
        rng = np.random.default_rng(seed)
        self._mults = rng.integers(1, 2**63, self.rows, dtype=np.uint64) | np.uint64(1)
        self._salts = rng.integers(0, 2**63, self.bands, dtype=np.uint64)

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """One uint64 per band: a random linear hash of the band's rows (wraps mod 2^64)."""
        rows = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands,
                                                                             self.rows)
        keys = (rows * self._mults).sum(axis=1, dtype=np.uint64) ^ self._salts
        return (keys >> np.uint64(32)).astype(np.uint32)

    def query(self, signature: np.ndarray) -> list[int]:
        """Ids of earlier texts whose estimated Jaccard similarity is at least the threshold."""
        matches = []
        for slot in self._buckets.get_many(self.band_keys(signature)):
            similarity = float(np.mean(self._signatures.read(slot) == signature))
            if similarity >= self.threshold:
                matches.append(self._ids[slot])
        return matches

    def insert(self, item_id: int, signature: np.ndarray) -> None:
        slot = len(self._ids)
        if slot >= 2**31 - 1:
            raise OverflowError("more than 2^31 texts in one near-duplicate index")
        self._ids.append(item_id)
        self._signatures.write(slot, signature)
        self._buckets.add_many(self.band_keys(signature), slot)

    def close(self) -> None:
        self._signatures.close()

    def __enter__(self) -> NearDuplicateIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def near_duplicate_groups(texts: Iterable[str], threshold: float = 0.85, *,
                          num_perm: int = 128, seed: int = 1) -> list[int]:
    """A group id per text; texts linked by near-duplication (transitively) share a group."""
    parent = array("q")  # 8 bytes an item, not a Python int object each

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    with NearDuplicateIndex(threshold, num_perm=num_perm, seed=seed) as index:
        for i, text in enumerate(texts):
            parent.append(i)
            signature = index.hasher.signature(text)
            for j in index.query(signature):
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
            index.insert(i, signature)
    return [find(i) for i in range(len(parent))]
