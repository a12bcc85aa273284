"""A multipart/form-data request body, streamed: the file part goes straight to disk.

Starlette's form parser would spool the file to a temporary file first and only then let us
check its size; parsing the stream ourselves enforces the size limit while the bytes arrive
and never holds more than one network chunk in memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from tunesmith.errors import ServiceError

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Upload:
    """The parsed form: the file (in a temporary file next to its destination) and fields."""

    fields: dict[str, str] = field(default_factory=dict)
    file_path: Path | None = None
    filename: str | None = None
    size: int = 0


def too_large(limit: int) -> ServiceError:
    return ServiceError(f"The file is larger than this server's upload limit of "
                        f"{limit / 2**20:.0f} MB; split it, or start the server with a larger "
                        "--max-upload-mb", status=413, code="file_too_large", param="file")


class _FormWriter:
    """The parser's callbacks: route each part's bytes to the temp file or a small field."""

    def __init__(self, temp_dir: Path, limit: int) -> None:
        self.temp_dir, self.limit = temp_dir, limit
        self.result = Upload()
        self._headers: dict[str, str] = {}
        self._header_field = b""
        self._header_value = b""
        self._name: str | None = None
        self._value = bytearray()
        self._fh: IO[bytes] | None = None

    def on_part_begin(self) -> None:
        self._headers, self._name, self._value = {}, None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        key = self._header_field.decode("latin-1").lower()
        self._headers[key] = self._header_value.decode("latin-1")
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options and self._name == "file":
            if self._fh is not None:
                raise ServiceError("send one file per upload", status=400, param="file")
            self.result.filename = os.path.basename(
                options[b"filename"].decode("utf-8", "replace")) or "upload.jsonl"
            fd, path = tempfile.mkstemp(prefix=".upload-", dir=self.temp_dir)
            self._fh = os.fdopen(fd, "wb")
            self.result.file_path = Path(path)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is not None and self._name == "file":
            self.result.size += end - start
            if self.result.size > self.limit:
                raise too_large(self.limit)
            self._fh.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise ServiceError(f"form field {self._name!r} is too long", status=400,
                                   param=self._name)

    def on_part_end(self) -> None:
        if self._name and self._name != "file":
            self.result.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


async def receive_upload(content_type: str | None, body: AsyncIterator[bytes], *,
                         temp_dir: Path, limit: int) -> Upload:
    """Parse a multipart body; the caller owns (and must move or delete) ``file_path``."""
    ctype, options = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise ServiceError("send the file as multipart/form-data with fields 'file' and "
                           "'purpose'", status=400, param="file")
    temp_dir.mkdir(parents=True, exist_ok=True)
    writer = _FormWriter(temp_dir, limit)
    parser = MultipartParser(options[b"boundary"], callbacks={  # type: ignore[arg-type]
        name: getattr(writer, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished", "on_part_data", "on_part_end")})
    try:
        try:
            async for chunk in body:
                parser.write(chunk)
            parser.finalize()
        except ServiceError:
            raise
        except Exception as err:  # the parser's errors, a client that went away
            raise ServiceError(f"malformed multipart/form-data body ({err})", status=400,
                               param="file") from err
    except BaseException:
        writer.close()
        if writer.result.file_path is not None:
            writer.result.file_path.unlink(missing_ok=True)
        raise
    writer.close()
    return writer.result
