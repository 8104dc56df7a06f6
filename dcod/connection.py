"""A stream connection for trio with batched writes, shared by hub, worker and client.

``send()`` never blocks: it appends to an outbox that the connection's writer task
flushes with one ``sendmsg`` per batch. Everything queued while other tasks ran goes
out together, so a worker connection carrying many sessions' requests costs one
system call per scheduler pass, not one per PDU. Bodies are passed by reference
(bytes, bytearray or memoryview), never joined.
"""

from __future__ import annotations

import errno
import socket

import trio

RECV_SIZE = 256 * 1024
IOV_MAX = 1024  # sendmsg() takes at most this many buffers (Linux UIO_MAXIOV)


class ConnectionClosed(Exception):
    """The peer went away or the connection was closed."""


def parse_address(address: str) -> tuple[int, object]:
    """"host:port" -> (AF_INET/AF_INET6, (host, port)); anything with a "/" is a Unix socket path."""
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


class Connection:
    """One peer. Run ``writer()`` in a task for as long as the connection lives."""

    __slots__ = ("sock", "name", "_out", "_out_bytes", "_parked", "_emptied", "_closing", "sent_bytes",
                 "received_bytes")

    def __init__(self, sock: socket.socket, name: str = "") -> None:
        self.sock = tune(sock)
        self.name = name
        self._out: list = []
        self._out_bytes = 0
        self._parked: trio.lowlevel.Task | None = None
        self._emptied: trio.Event | None = None  # set when the outbox empties, for flush()
        self._closing = False
        self.sent_bytes = 0
        self.received_bytes = 0

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def pending_bytes(self) -> int:
        """Bytes queued but not yet taken by the kernel."""
        return self._out_bytes

    async def recv(self) -> bytes:
        """The next bytes from the peer; b"" at end of stream. Raises ConnectionClosed."""
        while True:
            if self._closing:
                raise ConnectionClosed(self.name)
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except trio.ClosedResourceError:
                    raise ConnectionClosed(self.name) from None
                continue
            except OSError as e:
                raise ConnectionClosed(f"{self.name}: {e.strerror}") from None
            self.received_bytes += len(data)
            # Let other tasks run between reads even if this peer never pauses.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    def send(self, *chunks) -> None:
        """Queue bytes for the peer; returns at once. Ignored once the connection is closed."""
        if self._closing:
            return
        self._out.extend(chunks)
        for c in chunks:
            self._out_bytes += len(c)
        if self._parked is not None:
            task, self._parked = self._parked, None
            trio.lowlevel.reschedule(task)

    async def writer(self) -> None:
        """Flush the outbox for the life of the connection. Raises ConnectionClosed on a write error."""
        while not self._closing:
            if not self._out:
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                continue
            await self._flush()

    def _abort_park(self, _raise_cancel) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _flush(self) -> None:
        out = self._out
        while out:
            try:
                sent = self.sock.sendmsg(out[:IOV_MAX])
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_writable(self.sock)
                except trio.ClosedResourceError:
                    raise ConnectionClosed(self.name) from None
                continue
            except OSError as e:
                self._closing = True
                raise ConnectionClosed(f"{self.name}: {e.strerror}") from None
            self.sent_bytes += sent
            self._out_bytes -= sent
            self._consume(sent)
        self._wake_flushers()
        await trio.lowlevel.checkpoint()

    def _wake_flushers(self) -> None:
        if self._emptied is not None:
            self._emptied.set()
            self._emptied = None

    def _consume(self, sent: int) -> None:
        out = self._out
        i = 0
        while sent:
            n = len(out[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                out[i] = memoryview(out[i])[sent:]
                sent = 0
        del out[:i]

    async def flush(self) -> None:
        """Wait until the writer task has handed everything queued to the kernel."""
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

    def close(self) -> None:
        """Close at once, dropping anything unsent; wakes tasks blocked on this socket."""
        if self._closing and self.sock.fileno() < 0:
            return
        self._closing = True
        self._wake_flushers()
        if self._parked is not None:
            task, self._parked = self._parked, None
            trio.lowlevel.reschedule(task)
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
