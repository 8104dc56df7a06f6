"""Byte-level protocol peers written from the wire protocol (docs/ARCHITECTURE.md), independent of dcod's
own code: an Oracle session (OracleSession) and a worker (WorkerPeer) for a hub under test, the hub for a
worker under test (HubEnd) and for a client under test (FakeHub).

They use raw sockets and struct only, so a test through them checks dcod against the
spec, not against itself.
"""

from __future__ import annotations

import math
import socket
import struct
from contextlib import asynccontextmanager

import trio

ORACLE_MAGIC = 197610262
HUB_MAGIC = 197610263
HUB_HANDSHAKE = struct.pack(">i", HUB_MAGIC)  # what a hub sends first on a connection to a worker
HEADER = struct.Struct(">iIi")  # length (whole PDU; negative: one-way request, error reply), proxy id or audsid, rseq
QUIT_NOTICE = HEADER.pack(12, 0, 0)  # a worker that stops tells each hub so, with an empty PDU
ACK_ONEWAY = HEADER.pack(12, 0, -1)  # our extension, hub -> dcod worker: acknowledge one-way requests


def _address(addr):
    if isinstance(addr, str) and "/" in addr:
        return socket.AF_UNIX, addr
    if isinstance(addr, str):
        host, _, port = addr.rpartition(":")
        return socket.AF_INET, (host, int(port))
    return socket.AF_INET, addr


async def open_raw(addr) -> trio.socket.SocketType:
    family, target = _address(addr)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    await sock.connect(target)
    return sock


async def recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return data


async def read_pdu(sock) -> tuple[int, int, int, bytes]:
    """(length, field2, rseq, body) of the next PDU; field2 read unsigned (an audsid)."""
    header = await recv_exactly(sock, 12)
    length, field2, rseq = struct.unpack(">iIi", header)
    body = await recv_exactly(sock, abs(length) - 12)
    return length, field2, rseq, body


async def closed_by_peer(sock) -> bool:
    """True if the peer closed (EOF or reset) before sending anything more."""
    try:
        return await sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def send_all(sock, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


# The sid field of a session that announces it parses error replies (dcod's client): 0xDC0D in the high
# 16 bits, capability bit 0. An Oracle session's sid (17 here) announces nothing: it gets no error replies.
TAKES_ERROR_REPLIES = 0xDC0D0001 - (1 << 32)


def handshake(audsid: int, sid: int = 17, serial: int = 4242) -> bytes:
    """What a session sends first: the Oracle magic, its sid, serial# and audsid."""
    return struct.pack(">iiiI", ORACLE_MAGIC, sid, serial, audsid)


def request_pdu(proxy_id: int, rseq: int, body: bytes, oneway: bool = False) -> bytes:
    length = 12 + len(body)
    return struct.pack(">iii", -length if oneway else length, proxy_id, rseq) + body


def forwarded_pdu(audsid: int, rseq: int, body: bytes = b"", *, oneway: bool = False) -> bytes:
    """A request as the hub forwards it to a worker: the session's audsid (unsigned) instead of the proxy id."""
    length = 12 + len(body)
    return HEADER.pack(-length if oneway else length, audsid, rseq) + body


def reply_pdu(audsid: int, rseq: int, body: bytes = b"", error: bool = False) -> bytes:
    length = 12 + len(body)
    return HEADER.pack(-length if error else length, audsid, rseq) + body


class OracleSession:
    """What a PL/SQL session puts on the wire."""

    def __init__(self, sock, audsid: int) -> None:
        self.sock = sock
        self.audsid = audsid

    @classmethod
    async def connect(cls, addr, audsid: int, sid: int = 17, serial: int = 4242) -> OracleSession:
        sock = await open_raw(addr)
        await sock.send(handshake(audsid, sid, serial))
        return cls(sock, audsid)

    async def send(self, proxy_id: int, rseq: int, body: bytes, oneway: bool = False) -> None:
        await send_all(self.sock, request_pdu(proxy_id, rseq, body, oneway))

    async def read(self) -> tuple[int, int, int, bytes]:
        return await read_pdu(self.sock)

    def close(self) -> None:
        self.sock.close()


class WorkerPeer:
    """A worker proxy: accepts hub connections on a Unix socket, checks the 4-byte magic and,
    standing in for dcod's worker runtime (``acks``), the request to acknowledge one-way requests."""

    def __init__(self, path: str, acks: bool = True) -> None:
        self.path = path
        self.acks = acks
        self.listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def listen(self) -> WorkerPeer:
        await self.listener.bind(self.path)
        self.listener.listen(16)
        return self

    async def accept(self):
        sock, _ = await self.listener.accept()
        magic = struct.unpack(">i", await recv_exactly(sock, 4))[0]
        assert magic == HUB_MAGIC, f"hub sent magic {magic}"
        if self.acks:
            assert await recv_exactly(sock, 12) == ACK_ONEWAY, "no request to acknowledge one-way requests"
        return sock

    def close(self) -> None:
        self.listener.close()


class HubEnd:
    """The hub's end of one connection to a worker (the worker under test), at byte level."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def half_close(self) -> None:
        await self.stream.send_eof()

    async def read_pdu(self) -> bytes | None:
        """The next whole PDU as sent, or None if the worker closed the connection (EOF or reset)."""
        while True:
            if len(self._buf) >= 12:
                size = abs(HEADER.unpack_from(self._buf)[0])
                if len(self._buf) >= size:
                    pdu = bytes(self._buf[:size])
                    del self._buf[:size]
                    return pdu
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""
            if not data:
                assert not self._buf, f"connection closed in the middle of a PDU: {bytes(self._buf)!r}"
                return None
            self._buf += data

    async def pdus_until_closed(self) -> list[bytes]:
        pdus = []
        while (pdu := await self.read_pdu()) is not None:
            pdus.append(pdu)
        return pdus


@asynccontextmanager
async def connected_hub(path: str, magic: bytes = HUB_HANDSHAKE):
    """A HubEnd connected to the worker listening at ``path``, ``magic`` sent."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(magic)
        yield HubEnd(stream)


class AcceptedSession:
    """A session's connection as a FakeHub sees it: the bytes received so far, and replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = bytearray()
        self.eof = False
        self.audsid: int | None = None
        self._changed = trio.Event()

    async def pump(self) -> None:
        try:
            while data := await self.stream.receive_some():
                self.received += data
                self._wake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def take(self, size: int) -> bytes:
        while len(self.received) < size:
            if self.eof:
                raise EOFError(f"the session closed with {bytes(self.received)!r} unread")
            await self._changed.wait()
        data = bytes(self.received[:size])
        del self.received[:size]
        return data

    async def closed(self) -> None:
        """Wait until the session closes the connection."""
        while not self.eof:
            await self._changed.wait()

    async def handshake(self) -> tuple[int, int, int, int]:
        """(magic, sid field read unsigned, serial, audsid)."""
        magic, sid, serial, self.audsid = struct.unpack(">iIiI", await self.take(16))
        return magic, sid, serial, self.audsid

    async def request(self) -> tuple[int, int, int, bytes]:
        """(length, proxy_id, rseq, body) of the next request."""
        length, proxy_id, rseq = struct.unpack(">iii", await self.take(12))
        return length, proxy_id, rseq, await self.take(abs(length) - 12)

    async def reply(self, rseq: int, body: bytes, *, error: bool = False) -> None:
        await self.stream.send_all(reply_pdu(self.audsid, rseq, body, error))


class FakeHub:
    """A hub for the client under test: accepts sessions on 127.0.0.1 and hands each one to the test as an
    AcceptedSession."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.address = "127.0.0.1:%d" % listener.socket.getsockname()[1]
        self.accepted = 0
        self._new_peers, self._peers = trio.open_memory_channel(math.inf)

    async def serve(self, nursery: trio.Nursery) -> None:
        try:
            while True:
                peer = AcceptedSession(await self.listener.accept())
                self.accepted += 1
                nursery.start_soon(peer.pump)
                self._new_peers.send_nowait(peer)
        except trio.ClosedResourceError:
            pass  # stopped listening, as a quitting hub does

    async def connection(self) -> AcceptedSession:
        """The next session that connected, nothing read yet."""
        return await self._peers.receive()

    async def accept(self) -> AcceptedSession:
        """The next session that connected, its handshake read."""
        peer = await self.connection()
        assert (await peer.handshake())[0] == ORACLE_MAGIC
        return peer

    async def stop_listening(self) -> None:
        await self.listener.aclose()
