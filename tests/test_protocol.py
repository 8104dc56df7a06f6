"""Framing and encoding against hand-built bytes (the spec's layout, not dcod's own encoders)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcod import protocol
from dcod.protocol import ErrorCode, Framer, ProtocolError

HANDSHAKE = struct.pack(">iiiI", 197610262, 101, 202, 303)


def pdus_by_hand(bodies):
    return [struct.pack(">iii", 12 + len(b), 1, n + 1) + b for n, b in enumerate(bodies)]


def test_encoders_match_the_spec_layout():
    assert protocol.oracle_handshake(101, 202, 303) == HANDSHAKE
    assert protocol.HUB_HANDSHAKE == struct.pack(">i", 197610263)
    assert protocol.request(5, 9, b"ab") == struct.pack(">iii", 14, 5, 9) + b"ab"
    assert protocol.request(5, 9, b"ab", oneway=True) == struct.pack(">iii", -14, 5, 9) + b"ab"
    assert protocol.reply(0xFFFFFFFF, 3, b"") == struct.pack(">iIi", 12, 0xFFFFFFFF, 3)
    assert protocol.QUIT_NOTICE == struct.pack(">iii", 12, 0, 0)
    text = b"DCO-0001 unknown proxy 7"
    assert (
        protocol.error_reply(8, 4, ErrorCode.UNKNOWN_PROXY, "unknown proxy 7")
        == struct.pack(">iIi", -(12 + len(text)), 8, 4) + text
    )


def test_capabilities_ride_in_the_sid_field_of_noradles_handshake():
    # Noradle's magic and layout; the sid field is 0xDC0D in its high half, the flags in its low half.
    assert protocol.client_handshake(303, 202) == struct.pack(">iIiI", 197610262, 0xDC0D0001, 202, 303)
    assert protocol.client_handshake(303, capabilities=0x8001) == struct.pack(">iIiI", 197610262, 0xDC0D8001, 0, 303)
    with pytest.raises(ValueError):
        protocol.capability_word(0x10000)


@pytest.mark.parametrize(
    "sid_field, announced",
    [
        (0xDC0D0001, protocol.CAP_ERROR_REPLIES),
        (0xDC0D8001, 0x8001),  # flags a hub does not know yet are kept (and ignored)
        (0xDC0D0000, 0),
        (0xDC0E0001, 0),  # not the mark
        (0, 0),
        (17, 0),
        (0xFFFF, 0),
        (0xDC0D, 0),
        (0x7FFFFFFF, 0),  # an Oracle SID: positive, below 2**31
    ],
)
def test_capabilities_read_from_a_handshake(sid_field, announced):
    handshake = struct.pack(">iIiI", 197610262, sid_field, 4242, 77)
    magic, sid, serial, audsid = protocol.ORACLE_HANDSHAKE.unpack(handshake)
    assert protocol.capabilities(sid) == announced
    assert (magic, serial, audsid) == (protocol.ORACLE_MAGIC, 4242, 77)


def test_every_split_point_gives_the_same_pdus():
    stream = HANDSHAKE + b"".join(pdus_by_hand([b"", b"x", b"hello world"]))
    for cut in range(len(stream) + 1):
        framer = Framer(preamble=16, magic=protocol.ORACLE_MAGIC)
        out = framer.feed(stream[:cut]) + framer.feed(stream[cut:])
        assert framer.preamble == HANDSHAKE
        assert [bytes(p) for p in out] == pdus_by_hand([b"", b"x", b"hello world"])
        assert framer.buffered == 0


def test_byte_by_byte_and_all_at_once_agree():
    stream = b"".join(pdus_by_hand([b"a" * n for n in range(20)]))
    framer = Framer()
    one_by_one = [bytes(p) for i in range(len(stream)) for p in framer.feed(stream[i : i + 1])]
    assert one_by_one == [bytes(p) for p in Framer().feed(stream)]


@pytest.mark.parametrize("length", [0, 11, -11, 6, 1 << 30])
def test_bad_lengths_are_protocol_errors(length):
    with pytest.raises(ProtocolError):
        Framer(max_pdu=1 << 20).feed(struct.pack(">iii", length, 1, 1))


def test_noradle_quit_notice_of_length_6_only_where_accepted():
    notice = struct.pack(">iii", 6, 0, 0)
    assert [bytes(p) for p in Framer(accept_noradle_quit=True).feed(notice)] == [notice]
    assert protocol.is_quit_notice(6, 0, 0) and protocol.is_quit_notice(12, 0, 0)
    assert not protocol.is_quit_notice(12, 5, 1)  # an empty reply
    with pytest.raises(ProtocolError):
        Framer().feed(notice)


def test_bad_magic_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        Framer(preamble=16, magic=protocol.ORACLE_MAGIC).feed(b"GET / HTTP/1.1\r\n")


def test_large_pdu_is_handed_over_without_a_copy_of_the_buffer():
    body = b"z" * (1 << 20)
    pdu = struct.pack(">iii", 12 + len(body), 1, 1) + body
    framer = Framer()
    out = []
    for i in range(0, len(pdu), 65536):
        out += framer.feed(pdu[i : i + 65536])
    assert len(out) == 1 and bytes(out[0]) == pdu


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=5))
def test_arbitrary_bytes_give_pdus_or_a_clean_protocol_error(data, cuts):
    framer = Framer(max_pdu=200)
    pieces = [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])]
    total = 0
    try:
        for piece in pieces:
            for pdu in framer.feed(piece):
                assert 12 <= len(pdu) <= 200
                assert abs(struct.unpack_from(">i", pdu)[0]) == len(pdu)
                total += len(pdu)
    except ProtocolError:
        return
    assert total + framer.buffered == len(data)
