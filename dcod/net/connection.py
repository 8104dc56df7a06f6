"""A stream connection for trio with batched writes, shared by hub, worker and client.

``send()`` never blocks and costs no task switch: it appends to the connection's outbox
and puts the connection on the list of the run's one **flusher** task. The flusher runs
once per scheduler pass and writes each connection on its list with one ``sendmsg``, so
everything queued for a peer while other tasks ran goes out together: a worker
connection carrying many sessions' requests costs one system call per pass, not one per
PDU, and nobody pays a task switch per write. Writing at the end of a pass rather than
at once also helps the far side: a hub serving the sessions of one client process finds
them readable together and reads them in one wake-up (writing at once from flush() was
tried, and cost the hub more CPU per round trip). A reactor (dcod.net.reactor) that has read
and routed a batch writes what it queued itself, before it yields, and the flusher is not
woken for it. Only when the kernel's buffer is full does the connection's own writer task
(or its reactor) take over, wait for room and write the rest. Bodies are passed by
reference (bytes, bytearray or memoryview), never joined.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from dcod.net.reactor import Reactor

log = logging.getLogger("dcod.net.connection")

RECV_SIZE = 256 * 1024
IOV_MAX = 1024  # sendmsg() takes at most this many buffers (Linux UIO_MAXIOV)


# accept() failures, sorted as trio's SocketListener sorts them: one connection's trouble
# (skip it), or out of resources for now (retry shortly); any other means a broken listener.
ACCEPT_SKIP_ERRNOS = {errno.ECONNABORTED, errno.EPERM, errno.EPROTO}
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_RETRY_DELAY = 0.1


async def accept(listener: socket.socket) -> tuple[socket.socket, object]:
    """The next connection on a non-blocking listening socket, transient failures waited out.

    Raises trio.ClosedResourceError once the listener is closed (also by another task)."""
    while True:
        try:
            return listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
        except OSError as e:
            if listener.fileno() < 0:
                raise trio.ClosedResourceError("listener closed") from None
            if e.errno in ACCEPT_RETRY_ERRNOS:
                log.warning("accept: %s; retrying in %gs", e.strerror, ACCEPT_RETRY_DELAY)
                await trio.sleep(ACCEPT_RETRY_DELAY)
            elif e.errno not in ACCEPT_SKIP_ERRNOS:
                raise


class ConnectionClosed(Exception):
    """The peer went away or the connection was closed."""


def parse_address(address: str) -> tuple[int, object]:
    """ "host:port" -> (AF_INET/AF_INET6, (host, port)); anything with a "/" is a Unix socket path."""
    if "/" in address:
        return socket.AF_UNIX, address
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


async def connect(address: str) -> socket.socket:
    """A connected non-blocking stdlib socket to "host:port" or a Unix socket path."""
    family, addr = parse_address(address)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return socket.socket(fileno=sock.detach())


def tune(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _park(holder, attribute: str):
    """Park the current task in ``holder.<attribute>`` until someone reschedules it."""
    setattr(holder, attribute, trio.lowlevel.current_task())

    def abort(_raise_cancel) -> trio.lowlevel.Abort:
        setattr(holder, attribute, None)
        return trio.lowlevel.Abort.SUCCEEDED

    return trio.lowlevel.wait_task_rescheduled(abort)


def _wake(holder, attribute: str) -> None:
    task = getattr(holder, attribute)
    if task is not None:
        setattr(holder, attribute, None)
        trio.lowlevel.reschedule(task)


class Shared:
    """What the connections of one trio run share: the flusher task's list, a receive buffer."""

    __slots__ = ("dirty", "flusher", "recv_buffer", "batching")

    def __init__(self) -> None:
        self.dirty: list[Connection] = []  # connections sent to since the flusher last ran
        self.flusher: trio.lowlevel.Task | None = None  # parked while there is nothing to write
        # Every recv() lands here and is copied out at its size: a recv(RECV_SIZE) would
        # allocate (mmap, mremap, munmap) a buffer that large for every few bytes received.
        self.recv_buffer = bytearray(RECV_SIZE)
        # A reactor is handling a batch of reads and will flush() at its end: no need to wake
        # the flusher task for what its handlers send.
        self.batching = False

    def add(self, conn: Connection) -> None:
        self.dirty.append(conn)
        if not self.batching:
            _wake(self, "flusher")

    def flush(self) -> None:
        """Write every connection sent to (including those sent to while writing: an error reply)."""
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                conn._write()

    async def flush_forever(self) -> None:
        # A system task: it must never raise, and _write() does not.
        while True:
            if not self.dirty:
                await _park(self, "flusher")
            self.flush()


_shared: trio.lowlevel.RunVar = trio.lowlevel.RunVar("dcod_connections")


def shared() -> Shared:
    """This trio run's Shared (its flusher task starts with the first call)."""
    try:
        return _shared.get()
    except LookupError:
        this_run = Shared()
        trio.lowlevel.spawn_system_task(this_run.flush_forever, name="dcod connection flusher")
        _shared.set(this_run)
        return this_run


class Connection:
    """One peer. Run ``writer()`` in a task for as long as the connection lives, unless a
    reactor serves it (dcod.net.reactor): then the reactor reads it and writes what is left.

    Who writes the outbox: nobody while it is empty; the flusher once the connection is on
    its list (``_busy``); the writer task, or the reactor, while the kernel has no room
    (``_blocked``). One of them at a time, so bytes go out in the order they were sent.
    """

    __slots__ = (
        "sock",
        "name",
        "reactor",
        "_shared",
        "_out",
        "_out_bytes",
        "_busy",
        "_blocked",
        "_writer",
        "_emptied",
        "_closing",
        "_error",
        "_head_partial",
    )

    def __init__(self, sock: socket.socket, name: str = "") -> None:
        self.sock = tune(sock)
        self.name = name
        self.reactor: Reactor | None = None  # the reactor serving it, if one does
        self._shared = shared()
        self._out: list = []
        self._head_partial = False  # the kernel took part of _out[0] already
        self._out_bytes = 0
        self._busy = False
        self._blocked = False
        self._writer: trio.lowlevel.Task | None = None  # the writer task, parked while not blocked
        self._emptied: trio.Event | None = None  # set when the outbox empties, for flush()
        self._closing = False
        self._error: ConnectionClosed | None = None  # a write failed: the writer task raises it

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def pending_bytes(self) -> int:
        """Bytes queued but not yet taken by the kernel."""
        return self._out_bytes

    async def recv(self) -> bytearray:
        """The next bytes from the peer (the caller's to keep); empty at end of stream. Raises ConnectionClosed.

        It waits for the socket to be readable even when bytes are there already: that wait
        is the one checkpoint per read that keeps a busy peer from starving the others, and
        it spares the recv() that fails with EAGAIN after each batch.
        """
        while True:
            if self._closing:
                raise ConnectionClosed(self.name)
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except trio.ClosedResourceError:
                raise ConnectionClosed(self.name) from None
            buffer = self._shared.recv_buffer
            try:
                return buffer[: self.sock.recv_into(buffer)]
            except BlockingIOError:
                continue
            except OSError as e:
                raise ConnectionClosed(f"{self.name}: {e.strerror}") from None

    def send(self, data) -> None:
        """Queue bytes for the peer; returns at once. Ignored once the connection is closed."""
        if self._closing:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._busy:
            self._busy = True
            self._shared.add(self)

    def _write(self) -> None:
        """Hand the outbox to the kernel, as much as it takes; what is left goes to the writer task
        (or the reactor)."""
        if self._closing:
            return
        out = self._out
        try:
            while out:
                sent = self.sock.sendmsg(out if len(out) <= IOV_MAX else out[:IOV_MAX])
                if sent == self._out_bytes:  # all of it: the usual case
                    out.clear()
                    self._out_bytes = 0
                    self._head_partial = False
                else:
                    self._consume(sent)
        except BlockingIOError:
            self._blocked = True
            if self.reactor is not None:
                self.reactor.wait_writable(self)
            else:
                _wake(self, "_writer")
            return
        except OSError as e:
            self._error = ConnectionClosed(f"{self.name}: {e.strerror}")
            self.close(e.strerror)
            return
        self._busy = False
        if self._emptied is not None:
            self._wake_flushers()

    def _consume(self, sent: int) -> None:
        """Drop from the outbox the ``sent`` bytes the kernel took (fewer than there are)."""
        out = self._out
        self._out_bytes -= sent
        i = 0
        while sent:
            n = len(out[i])
            if sent >= n:
                sent -= n
                i += 1
                self._head_partial = False
            else:
                out[i] = memoryview(out[i])[sent:]
                self._head_partial = True
                sent = 0
        del out[:i]

    def take_unsent(self) -> list:
        """After close(): the chunks of which the kernel took nothing, handed back to the caller
        (a chunk it took part of is left out: its peer may have read that part)."""
        out, self._out = self._out, []
        self._out_bytes = 0
        return out[1:] if self._head_partial else out

    def writable(self) -> None:
        """The kernel has room again: write what is left (called by the reactor)."""
        self._blocked = False
        self._write()

    async def writer(self) -> None:
        """Write whatever the kernel had no room for, for the life of the connection.

        Returns once the connection is closed; raises ConnectionClosed on a write error.
        """
        while not self._closing:
            if not self._blocked:
                await _park(self, "_writer")
                continue
            try:
                await trio.lowlevel.wait_writable(self.sock)
            except trio.ClosedResourceError:
                raise ConnectionClosed(self.name) from None
            self.writable()
        if self._error is not None:
            raise self._error

    def _wake_flushers(self) -> None:
        if self._emptied is not None:
            self._emptied.set()
            self._emptied = None

    async def flush(self) -> None:
        """Wait until everything queued has been handed to the kernel."""
        while self._out and not self._closing:
            if self._emptied is None:
                self._emptied = trio.Event()
            await self._emptied.wait()
        if self._closing:
            raise ConnectionClosed(self.name)

    def shutdown_write(self) -> None:
        """Half-close: the peer reads end of stream after what was sent (call after flush())."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise

    def close(self, reason: str | None = "closed") -> None:
        """Close at once, dropping anything unsent; wakes tasks blocked on this socket.

        A reactor's connection leaves the reactor, which tells its owner ``reason``
        (None: the peer ended the stream)."""
        if self._closing and self.sock.fileno() < 0:
            return
        self._closing = True
        self._wake_flushers()
        _wake(self, "_writer")
        if self.sock.fileno() >= 0:
            # Out of the reactor's epoll before the descriptor's number can be reused.
            ended = self.reactor.forget(self) if self.reactor is not None else None
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            if ended is not None:
                ended(reason)
