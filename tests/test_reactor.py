"""dcod.net.reactor on real socket pairs: data in order, one on_end with the right reason, writes
the kernel could not take finished through EPOLLOUT, pause and resume."""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import sys

import trio

from dcod.net.connection import Connection
from dcod.net.reactor import Reactor


class Peer:
    """What a reactor's handler sees of one connection."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.ended: list[str | None] = []
        self.changed = trio.Event()

    def on_data(self, data: memoryview) -> None:
        self.received += data  # a view of a shared buffer: copy it now
        self._changed()

    def on_end(self, reason: str | None) -> None:
        self.ended.append(reason)
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, predicate) -> None:
        with trio.fail_after(5):
            while not predicate():
                await self.changed.wait()


async def served(nursery) -> tuple[Reactor, Connection, trio.socket.SocketType, Peer]:
    reactor = Reactor()
    nursery.start_soon(reactor.run)
    ours, theirs = socket.socketpair()
    conn, peer = Connection(ours, "test"), Peer()
    reactor.add(conn, peer.on_data, peer.on_end)
    return reactor, conn, trio.socket.from_stdlib_socket(theirs), peer


async def test_data_arrives_in_order_and_end_of_stream_ends_it_once(nursery):
    _, conn, theirs, peer = await served(nursery)
    sent = b"".join(struct.pack(">i", n) for n in range(50000))
    await theirs.send(sent[:7])
    await peer.wait(lambda: len(peer.received) == 7)
    view = memoryview(sent)[7:]
    while view:
        view = view[await theirs.send(view) :]
    theirs.shutdown(socket.SHUT_WR)
    await peer.wait(lambda: peer.ended)
    assert bytes(peer.received) == sent
    assert peer.ended == [None] and conn.closed


async def test_closed_by_us_ends_it_once_with_the_reason(nursery):
    _, conn, theirs, peer = await served(nursery)
    conn.close("protocol error")
    conn.close()  # a second close changes nothing
    assert peer.ended == ["protocol error"]
    assert await theirs.recv(1) == b""


async def test_a_reset_ends_it_with_the_error(nursery):
    _, conn, theirs, peer = await served(nursery)
    conn.send(b"unread")
    await conn.flush()
    theirs.close()  # a Unix socket closed with data unread: our next read fails with ECONNRESET
    await peer.wait(lambda: peer.ended)
    assert len(peer.ended) == 1 and peer.ended[0]  # an error text, not None


async def test_what_the_kernel_could_not_take_is_written_when_there_is_room(nursery):
    _, conn, theirs, peer = await served(nursery)
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB: far more than the socket buffers hold
    conn.send(big)
    got = bytearray()
    while len(got) < len(big):
        got += await theirs.recv(1 << 20)
    assert got == big
    await conn.flush()
    assert conn.pending_bytes == 0


async def test_a_paused_connection_is_not_read_until_resumed(nursery):
    reactor, conn, theirs, peer = await served(nursery)
    await theirs.send(b"first")
    await peer.wait(lambda: peer.received == b"first")
    reactor.pause(conn)
    await theirs.send(b"second")
    check = Peer()  # a second connection shows the reactor has gone round since
    other, other_theirs = socket.socketpair()
    reactor.add(Connection(other, "other"), check.on_data, check.on_end)
    other_theirs.send(b"x")
    await check.wait(lambda: check.received == b"x")
    assert peer.received == b"first"
    reactor.pause(conn, reading=True)
    await peer.wait(lambda: peer.received == b"firstsecond")
    other_theirs.close()


async def test_connections_that_never_go_quiet_do_not_starve_other_tasks(nursery):
    # The reactor waits in its own epoll while data keeps coming: it must still hand trio the
    # thread back (SLICE), or timers, accepts and the control channel would wait forever.
    reactor = Reactor()
    nursery.start_soon(reactor.run)
    received = 0

    def on_data(data: memoryview) -> None:  # slower than the writers: the sockets never empty
        nonlocal received
        received += len(data)
        hashlib.sha256(data).digest()

    # Writers in other processes (threads of ours would pause whenever we hold the GIL), several
    # so that one descheduled for a while leaves no gap; each writes for at most 20 s.
    floods = []
    for n in range(FLOODS):
        ours, theirs = socket.socketpair()
        reactor.add(Connection(ours, f"flood {n}"), on_data, lambda reason: None)
        floods.append(subprocess.Popen([sys.executable, "-c", FLOOD], stdout=theirs))
        theirs.close()
    try:
        while received < 1 << 20:  # the floods are being served...
            await trio.sleep(0.001)
        for _ in range(20):  # ...and timers still fire while they go on
            await trio.sleep(0.001)
        assert all(flood.poll() is None for flood in floods), "trio's tasks did not run while data kept coming"
    finally:
        for flood in floods:
            flood.kill()
            flood.wait()


FLOODS = 4
FLOOD = """
import os, time
chunk, deadline = b"x" * 65536, time.monotonic() + 20
while time.monotonic() < deadline:
    os.write(1, chunk)
"""
