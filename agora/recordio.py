"""RecordIO framing for Mesos v1 event streams: ``<decimal length>\\n<record bytes>``.

Records follow each other with no separator (LF only, never ``\\r\\n``). A record is never empty:
pymesos cannot parse a zero-length one (``json.loads('')``), so ``encode`` refuses it and the
``Decoder`` treats it as garbage. See specs/mesos-v1-wire.md §2.2 and §5.1 #5.

Pure: no Twisted, no I/O.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["encode", "encode_json", "Decoder", "DEFAULT_MAX_RECORD_SIZE"]

DEFAULT_MAX_RECORD_SIZE = 64 * 1024 * 1024

# A length line longer than this cannot be a valid length (the maximum size has far fewer
# digits), so a decoder that sees this many bytes without a newline is reading garbage.
_MAX_LENGTH_DIGITS = 20

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def encode(record: bytes) -> bytes:
    """Frame one record; raises ValueError for an empty record."""
    if not record:
        raise ValueError("RecordIO records must not be empty (clients cannot parse length 0)")
    return b"%d\n" % len(record) + record


def encode_json(obj: Any) -> bytes:
    """Frame ``obj`` as compact, pure-ASCII JSON (mesoshttp counts characters, not bytes)."""
    # ensure_ascii escapes every non-ASCII character and every control character, newlines
    # included, so the record never holds a raw "\n" that mesoshttp's iter_lines would split on.
    return encode(_dumps(obj).encode("ascii"))


class Decoder:
    """Incremental RecordIO decoder: feed it bytes split anywhere, get whole records back.

    Raises ValueError on a malformed length line, a zero length, or a record larger than
    ``max_record_size``; after that the decoder stays failed (the stream cannot be resynced).
    """

    __slots__ = ("_buf", "_length", "_max", "_error")

    def __init__(self, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> None:
        self._buf = bytearray()
        self._length: int | None = None  # length of the record being read, once its line is in
        self._max = max_record_size
        self._error: str | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return the records it completes, in order."""
        if self._error is not None:
            raise ValueError(self._error)
        buf = self._buf
        buf += data
        records: list[bytes] = []
        pos = 0
        end = len(buf)
        try:
            while True:
                if self._length is None:
                    nl = buf.find(b"\n", pos)
                    if nl < 0:
                        if end - pos > _MAX_LENGTH_DIGITS:
                            self._fail("RecordIO length line too long: %r" % bytes(buf[pos:pos + 24]))
                        break
                    line = bytes(buf[pos:nl])
                    # Only plain ASCII digits: int() would also take "+5", " 5", "5\r" or "1_0".
                    if not line or not line.isdigit() or not line.isascii():
                        self._fail("Malformed RecordIO length: %r" % line[:24])
                    length = int(line)
                    if length == 0:
                        self._fail("RecordIO record of length 0")
                    if length > self._max:
                        self._fail("RecordIO record of %d bytes exceeds the limit of %d" % (length, self._max))
                    self._length = length
                    pos = nl + 1
                length = self._length
                if end - pos < length:
                    break
                records.append(bytes(buf[pos:pos + length]))
                pos += length
                self._length = None
        finally:
            if pos:
                del buf[:pos]
        return records

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole record."""
        return len(self._buf)

    def _fail(self, message: str) -> None:
        self._error = message
        self._buf = bytearray()
        raise ValueError(message)
