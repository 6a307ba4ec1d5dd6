"""Tests for agora.recordio: framing, incremental decoding, and the ASCII rule mesoshttp needs."""

import json
import subprocess
import sys

import pytest

from agora import recordio


def test_encode_frames_with_decimal_length_and_lf():
    """A record is its byte length in decimal, one LF, then the bytes, with nothing after."""
    assert recordio.encode(b'{"type":"HEARTBEAT"}') == b'20\n{"type":"HEARTBEAT"}'
    assert recordio.encode("é".encode("utf-8")) == b"2\n\xc3\xa9"  # lengths count bytes


def test_encode_refuses_empty_record():
    """An empty record is refused: pymesos would call json.loads('') on it and die."""
    with pytest.raises(ValueError):
        recordio.encode(b"")


def test_encode_json_is_compact_ascii_without_newlines():
    """encode_json escapes non-ASCII and newlines and uses compact separators."""
    obj = {"type": "UPDATE", "message": "café ☃\nline2\r", "n": [1, 2]}
    framed = recordio.encode_json(obj)
    length, _, payload = framed.partition(b"\n")
    assert int(length) == len(payload)
    assert payload.isascii()
    assert b"\n" not in payload and b"\r" not in payload
    assert b", " not in payload and b": " not in payload
    assert json.loads(payload) == obj
    # mesoshttp slices by characters: with ASCII only, characters and bytes agree.
    assert len(payload.decode("ascii")) == int(length)


def test_round_trip_many_records_in_one_feed():
    """Several records fed at once come back whole and in order."""
    records = [b"a", b"hello", b"x" * 1000, json.dumps({"k": "v"}).encode()]
    decoder = recordio.Decoder()
    assert decoder.feed(b"".join(recordio.encode(r) for r in records)) == records
    assert decoder.buffered == 0


def test_split_feeds_at_every_position():
    """Records split at any byte boundary, even one byte at a time, decode identically."""
    records = [b'{"type":"SUBSCRIBED"}', b'{"type":"HEARTBEAT"}', b"z" * 123]
    wire = b"".join(recordio.encode(r) for r in records)
    for cut in range(len(wire) + 1):
        decoder = recordio.Decoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == records
    decoder = recordio.Decoder()
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i:i + 1])
    assert out == records


def test_partial_record_is_held_back():
    """A record is returned only once all of its bytes are in."""
    decoder = recordio.Decoder()
    assert decoder.feed(b"5\nabc") == []
    assert decoder.buffered == 3
    assert decoder.feed(b"de6\n") == [b"abcde"]


@pytest.mark.parametrize("garbage", [
    b"abc\n", b" 5\nhello", b"5\r\nhello", b"+5\nhello", b"-1\n", b"0\n", b"1_0\n0123456789",
    b"\n", b"9" * 40,
])
def test_garbage_raises_value_error(garbage):
    """Anything but ASCII digits and LF as a length, or a zero length, is a ValueError."""
    decoder = recordio.Decoder()
    with pytest.raises(ValueError):
        decoder.feed(garbage)


def test_decoder_stays_failed_after_garbage():
    """After garbage the stream cannot be resynchronised, so every later feed fails too."""
    decoder = recordio.Decoder()
    with pytest.raises(ValueError):
        decoder.feed(b"x\n")
    with pytest.raises(ValueError):
        decoder.feed(b"1\na")


def test_oversized_record_is_refused_before_buffering():
    """A length above max_record_size is refused as soon as the length line arrives."""
    decoder = recordio.Decoder(max_record_size=10)
    with pytest.raises(ValueError):
        decoder.feed(b"11\n")


def test_module_is_pure():
    """recordio imports no Twisted (it is pure framing)."""
    code = "import sys, agora.recordio; print(any(m.startswith('twisted') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
