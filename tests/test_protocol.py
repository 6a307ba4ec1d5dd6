"""agora.protocol framing and agora.link batching: length-framed msgpack batches."""

import struct

import msgpack
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from agora import protocol
from agora.link import Link

REREGISTER = protocol.ReregisterAgent(
    agent_id="a1", info={"hostname": "h", "resources": []}, version="1.11.0",
    tasks=[{"task_id": {"value": f"t{i}"}, "state": "TASK_RUNNING"} for i in range(10)])


def test_batches_split_anywhere_decode_in_order():
    """Two batches fed a byte at a time come out whole, in order, each message once."""
    data = protocol.encode([REREGISTER, protocol.Ping(seq=1)]) + \
        protocol.encode([protocol.Pong(seq=2)])
    decoder, out = protocol.Decoder(), []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i:i + 1]))
    assert out == [REREGISTER, protocol.Ping(seq=1), protocol.Pong(seq=2)]
    assert protocol.Decoder().feed(data) == out  # and all at once


def test_a_big_batch_in_many_reads_is_decoded_once_complete():
    """A 1 MB batch arriving in 64 KiB reads yields nothing until its last byte is there."""
    batch = [protocol.RunTask(framework={"id": {"value": "f"}}, task={"n": i, "pad": "x" * 100})
             for i in range(8000)]
    data = protocol.encode(batch)
    decoder = protocol.Decoder()
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    assert all(decoder.feed(c) == [] for c in chunks[:-1])
    assert decoder.feed(chunks[-1]) == batch


def test_a_frame_over_the_limit_is_refused_from_its_length():
    """The length alone is enough to refuse a batch over the limit (nothing is buffered)."""
    decoder = protocol.Decoder(max_bytes=1000)
    with pytest.raises(protocol.ProtocolError, match="over the 1000-byte limit"):
        decoder.feed(struct.pack(">I", 1001) + b"\x90")


@pytest.mark.parametrize("body,why", [
    (b"\xc1", "undecodable"),                    # a byte msgpack never uses
    (msgpack.packb({"a": 1}), "must be an array"),
    (msgpack.packb([[99]]), "unknown message tag 99"),
    (msgpack.packb([["x"]]), "not a message"),
    (msgpack.packb([[0]]), "bad Challenge"),
    (msgpack.packb([1, 2]) + b"\x00", "undecodable"),  # bytes after the batch in its frame
])
def test_garbage_is_a_protocol_error(body, why):
    """Frames that do not hold a batch of known messages say what is wrong."""
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.Decoder().feed(struct.pack(">I", len(body)) + body)


def test_a_link_writes_one_frame_per_reactor_turn_and_drops_a_garbled_peer():
    """Messages sent in one turn leave as one frame after the prefix; a peer that sends
    garbage is disconnected instead of crashing the link."""
    clock = Clock()
    link, transport = Link(clock, send_prefix=True), StringTransport()
    link.makeConnection(transport)
    link.send(protocol.Ping(seq=1))
    link.send(protocol.Ping(seq=2))
    assert transport.value() == protocol.PREFIX
    clock.advance(0)
    assert transport.value() == protocol.PREFIX + protocol.encode(
        [protocol.Ping(seq=1), protocol.Ping(seq=2)])
    got = []
    link.on_message = got.append
    link.dataReceived(protocol.encode([protocol.Pong(seq=1)]))
    assert got == [protocol.Pong(seq=1)]
    link.dataReceived(struct.pack(">I", 1) + b"\xc1")
    assert transport.disconnecting or transport.disconnected
