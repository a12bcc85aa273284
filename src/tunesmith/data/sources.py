"""Rows out of data files, streamed: JSONL, JSON arrays, CSV, TSV and Parquet.

Every reader yields ``chat.Row`` (line, decoded value or the problem that stopped decoding),
so the format layer above never cares which container a row came from. ``line`` is the
physical line for JSONL, CSV and TSV, and the 1-based item or row number for JSON arrays and
Parquet, which have no useful lines.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.data.chat import Row, iter_jsonl
from tunesmith.errors import DataError, Problem

CONTAINERS = ("jsonl", "json", "csv", "tsv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
             ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_PARQUET_BATCH = 1024


def container_of(path: Path) -> str:
    """How the file is stored, from its suffix; a .json file holding lines counts as JSONL.

    A file without a suffix (an upload stored under its id, say) is read as JSON Lines, the
    format of OpenAI's fine-tuning files.
    """
    if not path.suffix:
        return "jsonl"
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"cannot tell the file type from the suffix {path.suffix!r}; use one of "
                        ".jsonl, .json, .csv, .tsv, .parquet", path=path)
    if kind == "json" and _first_char(path) != "[":
        return "jsonl"  # many tools write JSON lines under a .json name
    return kind


def _first_char(path: Path) -> str:
    _check_exists(path)
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("ascii", errors="replace")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError("no such file; check the path", path=path, code="missing_file")
    if path.is_dir():
        raise DataError("is a directory; expected a data file", path=path)


def iter_rows(path: Path, container: str) -> Iterator[Row]:
    """Each row of the file, decoded where possible; streams, never loads the whole file."""
    _check_exists(path)
    if container == "jsonl":
        return iter_jsonl(path)
    if container == "json":
        return _iter_json_array(path)
    if container in ("csv", "tsv"):
        return _iter_delimited(path, "\t" if container == "tsv" else ",")
    if container == "parquet":
        return _iter_parquet(path)
    raise DataError(f"unknown container {container!r}; expected one of {', '.join(CONTAINERS)}")


def _iter_json_array(path: Path) -> Iterator[Row]:
    import ijson  # streams the array item by item instead of json.load-ing the whole file

    with path.open("rb") as fh:
        index = 0
        try:
            for index, item in enumerate(ijson.items(fh, "item", use_float=True), start=1):
                yield Row(index, value=item)
        except ijson.JSONError as err:
            yield Row(index + 1, problem=Problem(
                "invalid_json", f"invalid JSON after item {index} ({err}); the rest of the "
                "file cannot be read", index + 1))
        except UnicodeDecodeError as err:
            yield Row(index + 1, problem=Problem("not_utf8", f"not UTF-8 ({err.reason}); "
                                                 "re-save the file as UTF-8", index + 1))


def _has_surrogates(values: list[str]) -> bool:
    # files are opened with errors="surrogateescape", so bytes that are not UTF-8 show up as
    # lone surrogates: the row can be reported and the rest of the file still read
    return any("\udc80" <= ch <= "\udcff" for v in values for ch in v if ch >= "\ud800")


def _iter_delimited(path: Path, delimiter: str) -> Iterator[Row]:
    # notes and tickets can be longer than csv's default 128 KiB field limit
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # TSV has no quoting (IANA text/tab-separated-values): quotes are ordinary characters
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if _has_surrogates(header):
            raise DataError("the header line is not UTF-8; re-save the file as UTF-8", path=path,
                            line=1)
        end = reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num
            if not any(v.strip() for v in values):
                continue
            yield _delimited_row(header, values, start)


def _delimited_row(header: list[str], values: list[str], line: int) -> Row:
    raw = dict(zip(header, values, strict=False))  # a short or long row is reported below
    if _has_surrogates(values):
        return Row(line, problem=Problem("not_utf8", "not UTF-8; re-save the file as UTF-8",
                                         line), raw=raw)
    if len(values) != len(header):
        return Row(line, problem=Problem(
            "data_type", f"the row has {len(values)} fields but the header has {len(header)}; "
            "check for unquoted separators or line breaks in the text", line), raw=raw)
    return Row(line, value=raw)


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several kinds for a damaged file
        raise DataError(f"cannot read as Parquet ({err})", path=path) from err
    number = 0
    for batch in table.iter_batches(batch_size=_PARQUET_BATCH):
        for value in batch.to_pylist():
            number += 1
            yield Row(number, value=value)


def table_columns(path: Path, container: str) -> list[str]:
    """The column names of a CSV, TSV or Parquet file (for detection and error messages)."""
    if container == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    delimiter = "\t" if container == "tsv" else ","
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
        header = next(csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE
                                 if container == "tsv" else csv.QUOTE_MINIMAL), [])
    return [h.strip() for h in header]


def first_objects(path: Path, container: str, n: int = 20) -> list[dict[str, Any]]:
    """Up to ``n`` decodable rows that are objects, for format detection."""
    found = []
    for row in iter_rows(path, container):
        if isinstance(row.value, dict):
            found.append(row.value)
        if len(found) >= n:
            break
    return found
