"""The Oracle side of DCO: a session that talks to the ext-hub as the PL/SQL ``dco`` package does.

A Session is one Oracle session: one connection to a hub, the first of its list
that answers; the 16-byte handshake, announcing that it understands error replies (the
capability word in the sid field: dcod.protocol); a request counter (rseq) that starts at 1 and is never
reset, not even by a reconnect; requests built with ``write``/``line`` and sent at once or
queued until ``flush``; and a reply cache, so replies can be read in any order. Before every
send it checks the quit alert (docs/ARCHITECTURE.md §5): when the alert names its hub, it first reads the
replies that hub still owes it, then reconnects.

Lifetime: ``async with Session(hubs, audsid=...) as session:`` connects, and runs the
session's two background tasks (the connection's writer, and a reader that files replies)
in a nursery of its own; leaving the block closes the connection. There is no thread and
no task per request, so one process can hold thousands of sessions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sys
from pathlib import Path

import trio

from dcod import protocol
from dcod.config import Config
from dcod.net.connection import Connection, ConnectionClosed
from dcod.net.connection import connect as open_socket

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # per address: a host that drops packets must not hang the session
RETRY_FIRST = 0.05  # pause before the second round of the hub list, doubling ...
RETRY_LONGEST = 1.0  # ... up to this, while a reconnect keeps failing

_ERROR_CODE = re.compile(r"DCO-(\d+)")


class ClientError(Exception):
    """A session could not deliver a request or get its reply."""


class HubUnavailable(ClientError):
    """No hub of the session's list accepted a connection."""


class HubLost(ClientError):
    """The connection to the hub ended before the reply came."""


class DcoTimeout(ClientError, TimeoutError):
    """No reply within the time the caller allowed."""


class DcoError(ClientError):
    """An error reply from the hub; its text starts with a stable code: ``DCO-0001 unknown proxy 7``."""

    def __init__(self, rseq: int, text: str) -> None:
        super().__init__(text)
        self.rseq = rseq
        self.text = text
        match = _ERROR_CODE.match(text)
        self.code: int | None = int(match[1]) if match else None


class QuitAlert:
    """The quit alert's file as a session watches it: one line ``<counter> <message>``.

    The file is replaced atomically and its counter only grows; the message is the
    host:port of a hub that is quitting. One stat() per check, and a read only when the
    file changed, make it cheap enough to run before every send, as PL/SQL polls
    DBMS_ALERT. The calls block on purpose: a worker thread per check would cost far more.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counter = 0  # a missing file counts as 0
        self._stamp: tuple[int, int, int] | None = None

    def check(self) -> str | None:
        """The message of an alert raised since the last check, else None."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            counter_text, _, message = self.path.read_text().strip().partition(" ")
            counter = int(counter_text)
        except (OSError, ValueError):
            return None  # no alert raised yet, or not a line we can act on
        if counter <= self.counter:
            return None
        self.counter = counter
        return message.strip()


class Session:
    """One Oracle session talking to the ext-hub; use it as ``async with Session(...)``.

    ``hubs`` are tried in order ("host:port" or a Unix socket path). ``drain_timeout`` bounds
    the wait for a quitting hub's last replies, ``reconnect_timeout`` the retries of the hub
    list after a quit alert or a lost connection. The handshake's sid field carries the
    session's capabilities; ``serial`` is free to identify it (``dcod call`` sends its pid).
    """

    def __init__(
        self,
        hubs: list[str] | str,
        *,
        audsid: int,
        serial: int = 0,
        alert_file: Path | None = None,
        max_pdu: int = protocol.DEFAULT_MAX_PDU,
        drain_timeout: float = 30.0,
        reconnect_timeout: float = 10.0,
    ) -> None:
        self.hubs = [hubs] if isinstance(hubs, str) else list(hubs)
        if not self.hubs:
            raise ValueError("a session needs at least one hub address")
        self.audsid = audsid
        self.serial = serial
        self.max_pdu = max_pdu
        self.drain_timeout = drain_timeout
        self.reconnect_timeout = reconnect_timeout
        self.address: str | None = None  # the hub connected to, as written in `hubs`
        self._alert = QuitAlert(Path(alert_file)) if alert_file else None
        self._conn: Connection | None = None
        self._hub_quitting = False  # set by the alert, cleared once the connection is left
        self._rseq = 0
        self._body: list[bytes] = []  # the request being built
        self._queue: list[bytes] = []  # request PDUs waiting for flush()
        self._queued_sync: list[int] = []  # the rseqs among them that expect a reply
        self._in_flight: set[int] = set()  # sent on the current connection, not answered yet
        self._replies: dict[int, bytes | ClientError] = {}  # the reply cache
        self._arrivals: dict[int, trio.Event] = {}  # in-flight rseqs that someone waits for
        self._sending = trio.Lock()  # one flush or reconnect at a time
        self._tasks = contextlib.AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._closed = False

    async def __aenter__(self) -> Session:
        self._nursery = await self._tasks.enter_async_context(trio.open_nursery())
        try:
            await self.connect()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._close()
        self._nursery.cancel_scope.cancel()
        # The body's exception is not handed to the nursery, which would wrap it in an
        # ExceptionGroup: the nursery holds only this session's tasks, and they end quietly.
        await self._tasks.aclose()

    async def connect(self) -> None:
        """Connect, unless connected: to the first hub of the list that answers, each tried once.

        ``async with`` calls it. Raises HubUnavailable naming every address and its failure.
        """
        async with self._sending:
            if self._conn is None:
                await self._open()

    async def aclose(self) -> None:
        """Close the connection now; replies still owed raise HubLost, queued requests are dropped."""
        self._close()
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ building and sending requests

    def write(self, data: bytes) -> None:
        """Append raw bytes to the request being built."""
        self._body.append(bytes(data))

    def line(self, text: str) -> None:
        """Append a line of text (utf-8) to the request being built."""
        self.write((text + "\n").encode())

    async def send_request(self, proxy_id: int, *, buffered: bool = False, oneway: bool = False) -> int | None:
        """Make the request built so far into a PDU with the next rseq, and send it.

        Returns the rseq to read the reply with, or None for a one-way request. ``buffered``
        only queues it for the next flush(). If no hub can be reached the request stays queued
        and goes with the next flush that succeeds.
        """
        body = b"".join(self._body)
        self._body.clear()
        if protocol.HEADER_SIZE + len(body) > self.max_pdu:
            raise ClientError(f"a request of {protocol.HEADER_SIZE + len(body)} bytes is above max_pdu {self.max_pdu}")
        self._rseq += 1
        rseq = self._rseq  # not self._rseq after the await: another task may have sent meanwhile
        self._queue.append(protocol.request(proxy_id, rseq, body, oneway=oneway))
        if not oneway:
            self._queued_sync.append(rseq)
        if not buffered:
            await self.flush()
        return None if oneway else rseq

    async def flush(self) -> None:
        """Send every queued request at once.

        First the quit alert: if it names this session's hub, the replies that hub still owes
        are read into the cache and the session reconnects, so nothing more goes to a hub that
        is leaving. A connection that was lost is also replaced here.
        """
        async with self._sending:
            if not self._queue:
                return
            quitting = self._alert.check() if self._alert else None
            if self._conn is not None and quitting == self.address:
                self._hub_quitting = True
            if self._hub_quitting:
                await self._leave_quitting_hub()
            if self._conn is None:
                await self._reconnect()
            conn = self._conn
            for pdu in self._queue:
                conn.send(pdu)
            self._queue.clear()
            self._in_flight.update(self._queued_sync)
            self._queued_sync.clear()
            try:
                await conn.flush()
            except ConnectionClosed as e:
                # Sent or not, the sync requests now fail with HubLost; one-way ones are best effort.
                self._lost(conn, f"connection to hub {e} failed")

    # ------------------------------------------------------------ replies

    async def read_response(self, rseq: int, timeout: float | None = None) -> bytes:
        """The reply to request ``rseq``, from the cache or when it arrives.

        Raises DcoError for an error reply, HubLost if the connection ended first, DcoTimeout
        after ``timeout`` seconds (the reply is still cached if it comes later). A request
        still queued is flushed first.
        """
        if timeout is None:
            await self._await_reply(rseq)
        else:
            with trio.move_on_after(timeout) as deadline:
                await self._await_reply(rseq)
            if deadline.cancelled_caught:
                raise DcoTimeout(f"no reply to request {rseq} within {timeout:g} s")
        try:
            reply = self._replies.pop(rseq)
        except KeyError:
            raise ClientError(f"request {rseq} awaits no reply (one-way, already read, or never sent)") from None
        if isinstance(reply, ClientError):
            raise reply
        return reply

    def has_reply(self, rseq: int) -> bool:
        """Whether read_response(rseq) returns (or raises) without waiting: its reply, error
        reply or the news that its connection was lost is in the cache."""
        return rseq in self._replies

    async def call_sync(self, proxy_id: int, body: bytes, timeout: float | None = None) -> bytes:
        """Send ``body`` (after anything written since the last request) and wait for its reply."""
        self.write(body)
        rseq = await self.send_request(proxy_id)
        try:
            return await self.read_response(rseq, timeout)
        except DcoTimeout:
            self._forget(rseq)  # nobody will read it: drop the reply when it comes
            raise

    async def _await_reply(self, rseq: int) -> None:
        if rseq in self._queued_sync:
            await self.flush()
        if rseq in self._in_flight:
            await self._arrival(rseq)

    async def _arrival(self, rseq: int) -> None:
        event = self._arrivals.get(rseq)
        if event is None:
            event = self._arrivals[rseq] = trio.Event()
        await event.wait()

    def _file(self, pdu: bytearray) -> None:
        """Put a reply from the hub into the cache and wake whoever waits for it."""
        length, _audsid, rseq = protocol.ROUTED_HEADER.unpack_from(pdu)
        if rseq not in self._in_flight:
            log.debug("%s: dropped a reply to request %d, which nobody awaits", self.address, rseq)
            return
        self._in_flight.remove(rseq)
        body = bytes(memoryview(pdu)[protocol.HEADER_SIZE :])
        self._resolve(rseq, body if length > 0 else DcoError(rseq, body.decode(errors="replace")))

    def _resolve(self, rseq: int, reply: bytes | ClientError) -> None:
        self._replies[rseq] = reply
        event = self._arrivals.pop(rseq, None)
        if event is not None:
            event.set()

    def _forget(self, rseq: int) -> None:
        self._in_flight.discard(rseq)
        self._arrivals.pop(rseq, None)
        if rseq in self._queued_sync:
            self._queued_sync.remove(rseq)

    # ------------------------------------------------------------ the connection

    async def _open(self) -> None:
        """Connect to the first hub of the list that answers, and start the connection's tasks."""
        if self._nursery is None or self._closed:
            raise ClientError("the session is not open: use `async with Session(...)`")
        if self._alert is not None:
            self._alert.check()  # alerts raised before this connection concern earlier ones
        failures = []
        for address in self.hubs:
            with trio.move_on_after(CONNECT_TIMEOUT):
                try:
                    sock = await open_socket(address)
                except (OSError, ValueError) as e:
                    failures.append(f"{address} ({getattr(e, 'strerror', None) or e})")
                    continue
                conn = Connection(sock, address)
                self._conn, self.address = conn, address
                conn.send(protocol.client_handshake(self.audsid, self.serial))
                self._nursery.start_soon(self._write, conn)
                self._nursery.start_soon(self._read, conn)
                return
            failures.append(f"{address} (no answer within {CONNECT_TIMEOUT:g} s)")
        raise HubUnavailable("cannot connect to hub " + ", ".join(failures))

    async def _reconnect(self) -> None:
        """Connect again, retrying the hub list for a while: a hub that went away is usually restarting."""
        give_up = trio.current_time() + self.reconnect_timeout
        pause = RETRY_FIRST
        while True:
            try:
                await self._open()
            except HubUnavailable:
                if trio.current_time() + pause > give_up:
                    raise
            else:
                log.info("session %d: reconnected to hub %s", self.audsid, self.address)
                return
            await trio.sleep(pause)
            pause = min(2 * pause, RETRY_LONGEST)

    async def _leave_quitting_hub(self) -> None:
        """Read the replies the quitting hub still owes (it keeps delivering them), then disconnect."""
        log.info(
            "session %d: hub %s is quitting; reading %d pending replies",
            self.audsid,
            self.address,
            len(self._in_flight),
        )
        with trio.move_on_after(self.drain_timeout):
            while self._in_flight:
                await self._arrival(next(iter(self._in_flight)))
        self._disconnect(f"hub {self.address} quit without replying within {self.drain_timeout:g} s")

    async def _write(self, conn: Connection) -> None:
        try:
            await conn.writer()
        except ConnectionClosed as e:
            self._lost(conn, f"connection to hub {e} failed")

    async def _read(self, conn: Connection) -> None:
        """File the replies that arrive on ``conn`` for as long as it lives."""
        framer = protocol.Framer(self.max_pdu)
        try:
            while data := await conn.recv():
                for pdu in framer.feed(data):
                    self._file(pdu)
            reason = f"hub {conn.name} closed the connection"
        except ConnectionClosed as e:
            reason = f"connection to hub {e} failed"
        except protocol.ProtocolError as e:
            reason = f"hub {conn.name} broke the protocol: {e}"
        self._lost(conn, reason)

    def _lost(self, conn: Connection, reason: str) -> None:
        if conn is self._conn:
            log.info("session %d: %s", self.audsid, reason)
            self._disconnect(reason)

    def _disconnect(self, reason: str) -> None:
        """Close the connection; every request still in flight on it fails with HubLost."""
        conn, self._conn, self.address = self._conn, None, None
        self._hub_quitting = False
        if conn is None:
            return
        conn.close()
        lost, self._in_flight = self._in_flight, set()
        for rseq in lost:
            self._resolve(rseq, HubLost(f"no reply to request {rseq}: {reason}"))

    def _close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._queued_sync.clear()
        self._disconnect("the session was closed")


async def call(
    config: Config,
    proxy_id: int,
    text: str,
    *,
    oneway: bool = False,
    hub: str | None = None,
    timeout: float | None = None,
) -> int:
    """``dcod call PROXY TEXT``: send TEXT from a one-off session and print the reply.

    Returns the exit status: 0 done, 1 an error reply or no reply in time, 2 no hub reached.
    """
    # A random audsid: this session must not collide with another one on the hub.
    session = Session(
        hub or config.hub.advertise,
        audsid=random.randrange(1, 1 << 32),
        serial=os.getpid(),
        alert_file=config.alert_file,
        max_pdu=config.hub.max_pdu,
    )
    try:
        async with session:
            if oneway:
                session.write(text.encode())
                await session.send_request(proxy_id, oneway=True)
                return 0
            reply = await session.call_sync(proxy_id, text.encode(), timeout)
    except (DcoError, DcoTimeout) as e:
        print(f"dcod call: {e}", file=sys.stderr)
        return 1
    except ClientError as e:
        print(f"dcod call: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stdout.buffer.write(reply if reply.endswith(b"\n") else reply + b"\n")
    sys.stdout.buffer.flush()
    return 0
