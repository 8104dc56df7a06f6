"""Byte-level protocol peers written from DESIGN §2, independent of dcod's own code.

They use raw sockets and struct only, so a test through them checks dcod against the
spec, not against itself.
"""

from __future__ import annotations

import socket
import struct

import trio

ORACLE_MAGIC = 197610262
HUB_MAGIC = 197610263
ACK_ONEWAY = (12, 0, -1, b"")  # our extension, hub -> dcod worker: acknowledge one-way requests


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


def request_pdu(proxy_id: int, rseq: int, body: bytes, oneway: bool = False) -> bytes:
    length = 12 + len(body)
    return struct.pack(">iii", -length if oneway else length, proxy_id, rseq) + body


def reply_pdu(audsid: int, rseq: int, body: bytes, error: bool = False) -> bytes:
    length = 12 + len(body)
    return struct.pack(">iIi", -length if error else length, audsid, rseq) + body


class OracleSession:
    """What a PL/SQL session puts on the wire."""

    def __init__(self, sock, audsid: int) -> None:
        self.sock = sock
        self.audsid = audsid

    @classmethod
    async def connect(cls, addr, audsid: int, sid: int = 17, serial: int = 4242) -> OracleSession:
        sock = await open_raw(addr)
        await sock.send(struct.pack(">iiiI", ORACLE_MAGIC, sid, serial, audsid))
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
            assert await read_pdu(sock) == ACK_ONEWAY, "no request to acknowledge one-way requests"
        return sock

    def close(self) -> None:
        self.listener.close()

