"""Uploads: the multipart parser streams to disk and enforces the size limit."""

import asyncio

from tunesmith.errors import ServiceError
from tunesmith.service.upload import receive_upload


def test_upload_parser_streams_across_any_chunking(tmp_path) -> None:
    content = b'{"messages": []}\n' * 200 + b"\r\n--not-the-boundary\r\n"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../d/t.jsonl\""
            b"\r\nContent-Type: application/jsonl\r\n\r\n" + content + b"\r\n--XyZ--\r\n")

    async def chunks(size: int):
        for i in range(0, len(body), size):
            yield body[i:i + size]

    for size in (1, 7, 4096):
        got = asyncio.run(receive_upload("multipart/form-data; boundary=XyZ", chunks(size),
                                         temp_dir=tmp_path, limit=10_000))
        assert got.fields == {"purpose": "fine-tune"} and got.filename == "t.jsonl"
        assert got.file_path.read_bytes() == content and got.size == len(content)
        got.file_path.unlink()
    try:
        asyncio.run(receive_upload("multipart/form-data; boundary=XyZ", chunks(64),
                                   temp_dir=tmp_path, limit=1000))
    except ServiceError as err:
        assert err.status == 413
    else:
        raise AssertionError("the limit was not enforced")
    assert list(tmp_path.iterdir()) == []  # the partial file is removed
