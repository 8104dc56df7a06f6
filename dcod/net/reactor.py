"""One task reading many connections through an epoll of its own: the hub's hot path.

trio waits for each socket on its own: every read costs the reading task a wake-up and
trio an ``epoll_ctl`` to arm the socket again. A hub reads most of its sessions a request
or two at a time, so those costs were most of its CPU per round trip. Here each connection
stays registered in one epoll for as long as it lives; one task waits until that epoll is
readable, reads every connection that has data in the same step, hands the bytes to each
connection's handler, and writes what the handlers queued (connection.Shared.flush)
before it waits again. Handlers run synchronously: they parse, route and ``send()``, never
wait. While the connections keep it busy, the task waits for them in its epoll directly,
not through trio, and gives trio the thread back now and then (LINGER, SLICE).

A connection whose outbox the kernel cannot take is watched for writability here too, so
a connection served by a reactor needs no task of its own.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

import trio

from dcod.net.connection import Connection, shared

OnData = Callable[[memoryview], None]
OnEnd = Callable[[str | None], None]

_FAILED = select.EPOLLHUP | select.EPOLLERR

# Between two batches the reactor waits in its own epoll, for at most LINGER seconds, rather
# than through trio, whose scheduler round per batch cost a hub at full load about a tenth of
# its CPU; trio's other tasks (accepting, timeouts, the control channel) wait meanwhile, at
# most SLICE seconds. After LINGER seconds without data the reactor waits through trio again.
LINGER = 0.001
SLICE = 0.005


class _Entry:
    __slots__ = ("conn", "on_data", "on_end", "reading", "writing")

    def __init__(self, conn: Connection, on_data: OnData, on_end: OnEnd) -> None:
        self.conn = conn
        self.on_data = on_data
        self.on_end = on_end
        self.reading = True  # False while paused (its peer does not read what we send)
        self.writing = False  # the kernel had no room for its outbox: wait for EPOLLOUT

    @property
    def events(self) -> int:
        return (select.EPOLLIN if self.reading else 0) | (select.EPOLLOUT if self.writing else 0)


class Reactor:
    """Serves connections with ``add()`` while ``run()`` runs in a task."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._entries: dict[int, _Entry] = {}  # by file descriptor
        self._shared = shared()

    def add(self, conn: Connection, on_data: OnData, on_end: OnEnd) -> None:
        """Read ``conn`` from now on: ``on_data(bytes)`` for what arrives (a view valid during
        the call only), then ``on_end(reason)`` once, when the connection closes: None if the
        peer ended the stream, else why (a read or write error, or "closed" by us)."""
        fd = conn.sock.fileno()
        self._entries[fd] = _Entry(conn, on_data, on_end)
        conn.reactor = self
        self._epoll.register(fd, select.EPOLLIN)

    async def serve(self, conn: Connection, on_data: OnData) -> str | None:
        """add() ``conn`` and wait until it ends; returns the reason (closes it if cancelled)."""
        ended = trio.Event()
        reasons: list[str | None] = []

        def on_end(reason: str | None) -> None:
            reasons.append(reason)
            ended.set()

        self.add(conn, on_data, on_end)
        try:
            await ended.wait()
        finally:
            conn.close()
        return reasons[0]

    def pause(self, conn: Connection, reading: bool = False) -> None:
        """Stop reading ``conn`` (or, with ``reading=True``, start again)."""
        entry = self._entries.get(conn.sock.fileno())
        if entry is not None and entry.reading != reading:
            entry.reading = reading
            self._epoll.modify(conn.sock.fileno(), entry.events)

    def wait_writable(self, conn: Connection) -> None:
        """Called by the connection when the kernel took only part of its outbox."""
        entry = self._entries.get(conn.sock.fileno())
        if entry is not None and not entry.writing:
            entry.writing = True
            self._epoll.modify(conn.sock.fileno(), entry.events)

    def forget(self, conn: Connection) -> OnEnd | None:
        """Called by the connection as it closes; returns the on_end to call once it is closed."""
        fd = conn.sock.fileno()
        entry = self._entries.pop(fd, None)
        if entry is None:
            return None
        self._epoll.unregister(fd)
        return entry.on_end

    async def run(self) -> None:
        """Serve until cancelled; then close every connection still here."""
        epoll, entries, shared = self._epoll, self._entries, self._shared
        buffer = memoryview(shared.recv_buffer)
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                # Busy: wait in our own epoll between batches, without a round through trio's
                # scheduler for each; hand trio back the thread once a slice is used up, or
                # once nothing has come for a while.
                slice_end = time.monotonic() + SLICE
                events = epoll.poll(0)
                while events:
                    self._serve(events, buffer)
                    if time.monotonic() >= slice_end:
                        break
                    events = epoll.poll(LINGER)
        finally:
            for entry in list(entries.values()):
                entry.conn.close()
            epoll.close()

    def _serve(self, events: list[tuple[int, int]], buffer: memoryview) -> None:
        """Read every connection epoll reported, then write what their handlers queued."""
        entries, shared = self._entries, self._shared
        shared.batching = True
        try:
            for fd, mask in events:
                entry = entries.get(fd)
                if entry is None:  # closed by a handler earlier in this batch
                    continue
                if mask & select.EPOLLOUT:
                    self._writable(fd, entry)
                    if fd not in entries:
                        continue
                # A paused connection is read still on an error or hang-up (reported
                # whether asked for or not), or it would be reported again and again.
                if mask & _FAILED or mask & select.EPOLLIN and entry.reading:
                    self._read(entry, buffer)
            shared.flush()
        finally:
            shared.batching = False

    def _writable(self, fd: int, entry: _Entry) -> None:
        entry.writing = False
        entry.conn.writable()  # calls wait_writable() again if the kernel is still full
        if not entry.writing and fd in self._entries:
            self._epoll.modify(fd, entry.events)

    @staticmethod
    def _read(entry: _Entry, buffer: memoryview) -> None:
        conn = entry.conn
        try:
            size = conn.sock.recv_into(buffer)
        except BlockingIOError:
            return
        except OSError as e:
            conn.close(e.strerror)
            return
        if size:
            entry.on_data(buffer[:size])
        else:
            conn.close(None)
