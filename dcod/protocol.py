"""Noradle DCO v3 wire protocol: constants, PDU framing and encoding. No I/O here.

Every integer on the wire is a big-endian int32. A PDU is a 12-byte header
``length, field2, rseq`` and a body; ``length`` counts the whole PDU and its sign
carries meaning (negative: a one-way request, or an error reply). ``field2`` is the
proxy id in a request from Oracle and the session's audsid everywhere after the hub.
The audsid travels as the same four bytes it arrived in; we read it unsigned.

Capabilities (issue 15). Noradle's PL/SQL client (k_ext_call) cannot parse an error reply: it
reads ``length - 12`` body bytes, none for a negative length, so the error's text stays in the
stream and its next read takes it for a header. A session therefore says at connect what it
understands beyond Noradle's protocol, and the hub sends error replies only to one that said so.
The handshake is unchanged (16 bytes, magic 197610262) except the sid field, which a session
with capabilities fills with a capability word: ``0xDC0D`` in the high 16 bits, flags in the
low 16 (``CAP_ERROR_REPLIES``, bit 0: error replies, negative length and "DCO-nnnn" text).

- Not a magic of our own: the protocol has no handshake reply, so a client learns that a hub
  refused its magic only when the hub closes the connection, as Noradle's hub does (its first
  chunk must start with 197610262) and dcod's did before this. Falling back would mean waiting
  for a close that may never come before sending anything, and losing whatever went with the
  refused handshake; an acknowledgement from the hub would cost a round trip per connect.
- The sid field: hubs route by audsid and use neither sid nor serial (Noradle's hub reads only
  the magic and the audsid), so a dcod client works unchanged on Noradle's hub and on older dcod
  hubs (which send error replies to everyone, as before). An Oracle SID is a positive number
  far below 2**31: a word with the top bit set never comes from k_ext_call, so every PL/SQL
  session is known for one. A hub ignores flags it does not know; later capabilities take the
  next bits, and nothing is negotiated: the hub uses only those both sides know.

A session without ``CAP_ERROR_REPLIES`` (Noradle's PL/SQL) gets no reply at all where the others
get an error reply, from the hub or from a worker, as with Noradle's own hub: its own timeout
decides. The hub counts what it withheld (``withheld``, per proxy, in ``dcod status``).

Request numbers (issue 15). Sessions number their requests themselves (rseq, from 1 per session)
and their audsids need not be unique: every SYS session has 0, two databases can share one, a
session reconnecting may still have its old connection open. So the hub gives each request it
forwards a number of its own, unique among the requests it tracks, in 1..``HUB_RSEQ_MAX`` (never 0,
the quit notice's; never -1, ``ACK_ONEWAY``'s), starting at a random point so that a restarted
hub does not repeat its predecessor's. The rseq field of the routed header carries that number to
the worker and back; the hub keeps the session's connection and its own rseq with the request and
puts that rseq back in the reply's header before it writes the reply to that connection only.
The audsid travels unchanged. A worker therefore sees the hub's numbers: ``(audsid, rseq)``
identifies a request at a worker, and stays the same when the hub forwards a one-way request
again (or a hub replays it from a spool).
"""

from __future__ import annotations

import enum
import struct

ORACLE_MAGIC = 197610262  # first int of the 16-byte handshake Oracle -> hub
HUB_MAGIC = 197610263  # the 4-byte handshake hub -> worker
HEADER_SIZE = 12

ORACLE_HANDSHAKE = struct.Struct(">iiiI")  # magic, sid (or a capability word), serial, audsid
HUB_HANDSHAKE = struct.pack(">i", HUB_MAGIC)
REQUEST_HEADER = struct.Struct(">iii")  # length, proxy_id, rseq (from Oracle)
ROUTED_HEADER = struct.Struct(">iIi")  # length, audsid, rseq (hub <-> worker, hub -> Oracle)
LENGTH = struct.Struct(">i")
RSEQ = struct.Struct(">i")  # the rseq field alone, at RSEQ_OFFSET: the hub rewrites it in place
RSEQ_OFFSET = 8
HUB_RSEQ_MAX = 2**31 - 1  # the hub's request numbers are 1..HUB_RSEQ_MAX

# A worker says it will take no more requests: "12, 0, 0". Noradle's own worker
# wrote the length as 6 while still sending 12 bytes; both are accepted.
QUIT_NOTICE = ROUTED_HEADER.pack(HEADER_SIZE, 0, 0)
NORADLE_QUIT_LENGTH = 6

# Our extension, hub -> worker: "acknowledge one-way requests on this connection". A dcod hub
# sends it as the first PDU after the magic, and only to workers running dcod's own runtime
# (a Noradle worker would serve it as a request); such a worker then answers every one-way
# request it has handled with an empty reply "12, audsid, rseq", so that the hub can send again
# those an instance took and never finished. Noradle's hub never sends it, so its workers and
# dcod's behind it see the protocol unchanged. Its rseq -1 is one the hub never gives a request
# (its numbers are positive, whatever rseq a session sent); the quit notice "12, 0, 0" goes the
# other way.
ACK_ONEWAY = ROUTED_HEADER.pack(HEADER_SIZE, 0, -1)

DEFAULT_MAX_PDU = 16 * 1024 * 1024

CAPABILITY_MARK = 0xDC0D  # the high 16 bits of the sid field of a session that announces capabilities
CAP_ERROR_REPLIES = 0x0001  # it parses error replies
CLIENT_CAPABILITIES = CAP_ERROR_REPLIES  # what dcod's client (dcod call, dcod bench) understands


class ProtocolError(Exception):
    """The peer broke the protocol; the connection it came from must be closed."""


class ErrorCode(enum.IntEnum):
    """Stable codes that start the text of an error reply: ``DCO-0001 unknown proxy 7``."""

    UNKNOWN_PROXY = 1
    REPLY_TIMEOUT = 2
    WORKER_LOST = 3
    QUEUE_FULL = 4
    DRAINING = 5
    HANDLER_FAILED = 6
    OVERLOADED = 7
    POISON = 8

    def text(self, detail: str) -> str:
        return f"DCO-{self.value:04d} {detail}"


def oracle_handshake(sid: int, serial: int, audsid: int) -> bytes:
    """The handshake as Oracle's PL/SQL sends it: no capabilities."""
    return ORACLE_HANDSHAKE.pack(ORACLE_MAGIC, sid, serial, audsid)


def capability_word(capabilities: int) -> int:
    """The sid field (a signed int32) that announces ``capabilities``."""
    if not 0 <= capabilities <= 0xFFFF:
        raise ValueError(f"capabilities must fit in 16 bits, not {capabilities:#x}")
    return ((CAPABILITY_MARK << 16) | capabilities) - (1 << 32)


def client_handshake(audsid: int, serial: int = 0, capabilities: int = CLIENT_CAPABILITIES) -> bytes:
    """The handshake of a session that announces ``capabilities`` (dcod's client)."""
    return ORACLE_HANDSHAKE.pack(ORACLE_MAGIC, capability_word(capabilities), serial, audsid)


def capabilities(sid: int) -> int:
    """The capabilities a handshake's sid field announces: 0 for an Oracle session's SID."""
    word = sid & 0xFFFFFFFF
    return word & 0xFFFF if word >> 16 == CAPABILITY_MARK else 0


def request(proxy_id: int, rseq: int, body: bytes, *, oneway: bool = False) -> bytes:
    """A request PDU as Oracle sends it."""
    size = HEADER_SIZE + len(body)
    return REQUEST_HEADER.pack(-size if oneway else size, proxy_id, rseq) + body


def reply(audsid: int, rseq: int, body: bytes) -> bytes:
    return ROUTED_HEADER.pack(HEADER_SIZE + len(body), audsid, rseq) + body


def error_reply(audsid: int, rseq: int, code: ErrorCode, detail: str) -> bytes:
    """An error reply (our extension): negative length, utf-8 text starting with the code."""
    body = code.text(detail).encode()
    return ROUTED_HEADER.pack(-(HEADER_SIZE + len(body)), audsid, rseq) + body


def is_quit_notice(length: int, audsid: int, rseq: int) -> bool:
    """A worker's quit notice; a reply has rseq != 0 (the hub numbers requests from 1)."""
    return audsid == 0 and rseq == 0 and length in (HEADER_SIZE, NORADLE_QUIT_LENGTH)


class Framer:
    """Splits a byte stream into whole PDUs, however the stream was cut or coalesced.

    ``preamble`` bytes (a handshake) are taken first and checked to start with ``magic``;
    they are then in ``self.preamble``. PDUs come out as bytearrays the caller owns (it may
    rewrite the header in place). Buffering is linear in the data: bytes are appended once
    and a PDU is copied out once, so a 1 MiB body costs no more than its size.
    """

    __slots__ = ("max_pdu", "accept_noradle_quit", "preamble", "_preamble_size", "_magic", "_buf")

    def __init__(
        self,
        max_pdu: int = DEFAULT_MAX_PDU,
        *,
        preamble: int = 0,
        magic: int | None = None,
        accept_noradle_quit: bool = False,
    ) -> None:
        self.max_pdu = max_pdu
        self.accept_noradle_quit = accept_noradle_quit
        self.preamble: bytes | None = None if preamble else b""
        self._preamble_size = preamble
        self._magic = magic
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole PDU (a peer stalling mid-PDU shows here)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytearray]:
        """Add received bytes; return the PDUs they complete. Raises ProtocolError."""
        buf = self._buf
        buf += data
        if self.preamble is None:
            if len(buf) < self._preamble_size:
                return []
            self.preamble = bytes(buf[: self._preamble_size])
            del buf[: self._preamble_size]
            if self._magic is not None and LENGTH.unpack_from(self.preamble)[0] != self._magic:
                raise ProtocolError(f"bad handshake magic {LENGTH.unpack_from(self.preamble)[0]}")
        pdus: list[bytearray] = []
        start, end = 0, len(buf)
        while end - start >= HEADER_SIZE:
            size = abs(LENGTH.unpack_from(buf, start)[0])
            if size < HEADER_SIZE:
                if not (self.accept_noradle_quit and size == NORADLE_QUIT_LENGTH):
                    raise ProtocolError(f"PDU length {size} below {HEADER_SIZE}")
                size = HEADER_SIZE
            elif size > self.max_pdu:
                raise ProtocolError(f"PDU length {size} above max_pdu {self.max_pdu}")
            if end - start < size:
                break
            if start == 0 and size == end:
                # The buffer is exactly one PDU (the usual case for big ones): hand it over.
                pdus.append(buf)
                self._buf = bytearray()
                return pdus
            pdus.append(buf[start : start + size])
            start += size
        if start:
            del buf[:start]
        return pdus
