"""The worker runtime: one instance of a worker proxy, serving its handler to every hub.

Hubs connect to the instance's listening socket, send the 4-byte magic, then request PDUs
(``len, audsid, rseq, body``); each request runs the handler, concurrently with the others
(see _Runners), and a sync one gets a reply (or an error reply if the handler raised).
Several hubs may be connected at once: during a rolling restart the old and the new hub both are.

Stopping is graceful: stop accepting, send each hub the quit notice, keep reading until the
hub half-closes (requests that crossed the notice are still served), let every request in
flight finish and its reply reach the kernel, then call the handler's ``done()``. A second
stop (SIGTERM) stops reading at once, though requests in flight still finish; past
``stop_timeout`` whatever is left is cancelled and the exit status says so.

One-way requests are acknowledged when the hub asks for it (our extension: ``ACK_ONEWAY`` as
the first PDU after the magic; Noradle's hub never sends it, and then nothing changes): each
then gets an empty reply ``12, audsid, rseq`` once its handler has returned or raised, never
when it was cancelled (``stop_timeout``) or not read at all, so the hub sends those again.
The ack comes after the handling, not on receipt: acking on receipt would lose what an
instance dies in the middle of, as without acks (at-most-once); acking after it means a
request whose ack died with the instance is handled twice (at-least-once), so a one-way
handler should tolerate a repeat (the audsid and rseq identify it). A failed request is acked
too: sent again, it would most likely fail again, and again.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import functools
import importlib
import inspect
import itertools
import logging
import os
import pkgutil
import signal
import socket
import sys
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from dcod import fs
from dcod.config import Config
from dcod.log import Throttle
from dcod.net import channel as control
from dcod.net import sockets
from dcod.net.connection import Connection, ConnectionClosed, accept
from dcod.protocol import (
    ACK_ONEWAY,
    DEFAULT_MAX_PDU,
    HEADER_SIZE,
    HUB_HANDSHAKE,
    HUB_MAGIC,
    QUIT_NOTICE,
    ROUTED_HEADER,
    ErrorCode,
    Framer,
    ProtocolError,
    error_reply,
    reply,
)

log = logging.getLogger(__name__)

BUILTIN_HANDLERS = "dcod.worker.handlers"  # handler = "echo" is the module dcod.worker.handlers.echo
MAX_ERROR_DETAIL = 1000  # characters of an exception's text put in an error reply

Result = bytes | bytearray | str | None


@dataclass(frozen=True, slots=True)
class Request:
    """What a handler gets: one request from one Oracle session (see dcod.worker for the rules)."""

    audsid: int  # the Oracle session's AUDSID
    rseq: int  # the request's number in that session: with audsid, the request's key
    body: bytes
    sync: bool  # the session waits for a reply; False for a one-way request (delivered at least once)


@dataclass(frozen=True)
class Handler:
    """A loaded handler: ``handle`` per request, ``init``/``done`` (sync or async) around serving."""

    handle: Callable[[Request], Awaitable[Result]]
    init: Callable[[], object] | None = None
    done: Callable[[], object] | None = None


class HandlerError(Exception):
    """A handler could not be loaded, or its init()/done() failed."""


class ReplyTooLarge(Exception):
    """A handler's reply would not fit in one PDU; the session gets an error reply instead."""


def load_handler(spec: str, path: Sequence[str] = ()) -> Handler:
    """``"echo"`` -> the built-in module dcod.worker.handlers.echo; ``"package.module:function"`` -> that function.

    A module's ``handle`` (or the named function) must be an async function; its module's
    ``init()`` and ``done()``, where present, become the hooks. ``path`` (the proxy's
    handler_path) goes first on sys.path: the worker runs isolated (python -I), so that only
    these directories, besides the installed packages, are searched; each must be root's or
    ours, and writable by nobody else, since its modules run as this worker. Raises HandlerError.
    """
    for directory in path:
        try:
            fs.check_directory(Path(directory), "handler_path directory", owners=frozenset({0, os.geteuid()}))
        except fs.UntrustedDirectory as e:
            raise HandlerError(f"handler {spec!r}: {e}") from None
        except OSError as e:
            raise HandlerError(f"handler {spec!r}: handler_path directory {directory}: {e.strerror}") from None
    sys.path[:0] = [directory for directory in path if directory not in sys.path]
    module_name, colon, function = spec.partition(":")
    if not colon:
        module_name, function = f"{BUILTIN_HANDLERS}.{spec}", "handle"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if not colon and (e.name or "").startswith(f"{BUILTIN_HANDLERS}."):  # "mine.sms" without ":handle" too
            raise HandlerError(
                f"handler {spec!r}: no built-in handler of that name ({', '.join(builtin_handlers())}); "
                f'one of your own is "package.module:function"'
            ) from e
        raise HandlerError(f"handler {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise HandlerError(f"handler {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    handle = getattr(module, function, None)
    if not inspect.iscoroutinefunction(handle):
        raise HandlerError(f"handler {spec!r}: {module_name} has no async function {function!r}")
    return Handler(handle, getattr(module, "init", None), getattr(module, "done", None))


def builtin_handlers() -> list[str]:
    """The names of the built-in handlers (the modules of dcod.worker.handlers)."""
    package = importlib.import_module(BUILTIN_HANDLERS)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__))


def check(config: Config, proxy_id: int) -> int:
    """`dcod worker --check`: load the proxy's handler as the worker would (its handler_path, the
    import, an async ``handle``), without calling ``init()``, in this process, which runs as the
    workers do; 0, or 1 with the reason on stderr. `dcod config --check` and a reload run it."""
    proxy = config.proxy(proxy_id)
    try:
        if not proxy.handler:
            raise HandlerError(f"proxy {proxy_id} has no handler")
        load_handler(proxy.handler, proxy.handler_path)
    except HandlerError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


@dataclass
class _Counts:
    requests: int = 0  # handlers started (one-way ones included)
    oneway: int = 0
    replies: int = 0  # sync requests answered with a reply
    acks: int = 0  # one-way requests acknowledged to a hub that asked for it
    errors: int = 0  # handler failures: error replies sent, and failed one-way requests
    inflight: int = 0
    protocol_errors: int = 0  # hub connections closed for breaking the protocol
    abandoned: int = 0  # requests cut short when stop_timeout passed


class Worker:
    """Serves one handler to every hub that connects, ``concurrency`` requests at a time in all."""

    def __init__(
        self, handler: Handler, *, concurrency: int = 64, max_pdu: int = DEFAULT_MAX_PDU, stop_timeout: float = 10.0
    ) -> None:
        self.handler = handler
        self.max_pdu = max_pdu
        self.stop_timeout = stop_timeout
        # A hub's reader takes a slot before starting a request and the request gives it back:
        # when all are taken, no hub is read from, and the hubs' sockets fill up instead of our memory.
        self._slots = trio.Semaphore(concurrency)
        self._hubs: dict[Connection, trio.CancelScope] = {}  # each connected hub -> the scope of its reading
        self._hub_numbers = itertools.count(1)
        self._stopping = trio.Event()
        self._counts = _Counts()
        self.warnings = Throttle(log)  # what a handler failing on every request would repeat

    def stats(self) -> dict[str, int]:
        return {**dataclasses.asdict(self._counts), "hubs": len(self._hubs)}

    def report(self) -> tuple[control.StatusCounts, dict[str, int]]:
        """Its heartbeat: its row in `dcod status`, and its stats()."""
        self.warnings.flush()  # on each heartbeat: a flood's summary does not wait for the next failure
        counts = self._counts
        return control.StatusCounts(
            done=counts.replies + counts.oneway, inflight=counts.inflight, errors=counts.errors
        ), self.stats()

    def stop(self, reason: str = "stop requested") -> None:
        """Stop gracefully. Called again: stop reading from hubs (requests in flight still finish)."""
        if not self._stopping.is_set():
            log.info("%s: stopping; quit notice to %d hubs", reason, len(self._hubs))
            self._stopping.set()
            for conn in self._hubs:
                conn.send(QUIT_NOTICE)
        else:
            log.info("%s again: no longer waiting for %d hubs to half-close", reason, len(self._hubs))
            for reading in self._hubs.values():
                reading.cancel()

    async def serve(self, listener: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> bool:
        """Run init(), serve hubs on ``listener`` (a listening socket, closed when stopping) until
        stop() and the drain that follows, then done(). Returns False if stop_timeout cut the drain short.
        """
        await _run_hook("init", self.handler.init)
        log.info("serving on %s", sockets.address_of(listener))
        with trio.CancelScope() as drain:
            async with trio.open_nursery() as hubs:
                accepting = trio.CancelScope()
                hubs.start_soon(self._accept, listener, hubs, accepting)
                task_status.started()
                await self._stopping.wait()
                accepting.cancel()
                drain.deadline = trio.current_time() + self.stop_timeout
        if drain.cancelled_caught:
            log.warning(
                "stop_timeout (%g s) passed: gave up on %d requests in flight",
                self.stop_timeout,
                self._counts.abandoned,
            )
        await _run_hook("done", self.handler.done)
        log.info("stopped: %s", " ".join(f"{k}={v}" for k, v in self.stats().items()))
        return not drain.cancelled_caught

    async def _accept(self, listener: socket.socket, hubs: trio.Nursery, accepting: trio.CancelScope) -> None:
        listener.setblocking(False)
        with listener, accepting:
            while True:
                sock, peer = await accept(listener)
                conn = Connection(sock, _hub_name(next(self._hub_numbers), peer))
                reading = self._hubs[conn] = trio.CancelScope()
                if self._stopping.is_set():  # accepted while stop() ran: it missed this one
                    conn.send(QUIT_NOTICE)
                hubs.start_soon(self._serve_hub, conn, reading)

    async def _serve_hub(self, conn: Connection, reading: trio.CancelScope) -> None:
        log.info("%s connected", conn.name)
        try:
            async with trio.open_nursery() as io:
                io.start_soon(_write, conn)
                async with trio.open_nursery() as requests:
                    with reading:
                        await self._read(conn, requests)
                # Every request read from this hub has its reply queued: get them out, then close.
                try:
                    await conn.flush()
                except ConnectionClosed:
                    pass
                conn.close()  # which ends the writer task
        finally:
            conn.close()
            del self._hubs[conn]
            log.info("%s disconnected", conn.name)

    async def _read(self, conn: Connection, requests: trio.Nursery) -> None:
        """Hand each request to the hub's runners until the hub half-closes; a broken hub is
        closed and logged."""
        framer = Framer(self.max_pdu, preamble=len(HUB_HANDSHAKE), magic=HUB_MAGIC)
        runners = None  # started with the first PDU, which says whether to acknowledge one-way requests
        try:
            while data := await conn.recv():
                for pdu in framer.feed(data):
                    if runners is None:
                        # Only there: later, it would be served as a request like any other.
                        ack = pdu == ACK_ONEWAY
                        runners = _Runners(requests, functools.partial(self._answer, conn, ack=ack), self._abandon)
                        if ack:
                            continue
                    try:
                        self._slots.acquire_nowait()  # no checkpoint per request: recv() has one per read
                    except trio.WouldBlock:
                        await self._slots.acquire()
                    runners.put(pdu)
        except ProtocolError as e:
            self._counts.protocol_errors += 1
            log.warning("%s: %s; closing the connection", conn.name, e)
            conn.close()
        except ConnectionClosed as e:
            if not conn.closed:  # else we closed it, or the writer did and said why
                log.warning("%s: connection lost: %s", conn.name, e)
        else:
            if framer.buffered:
                log.warning("%s: half-closed in the middle of a PDU (%d bytes dropped)", conn.name, framer.buffered)
        finally:
            if runners is not None:
                runners.close()  # what was read still runs

    async def _answer(self, conn: Connection, pdu: bytearray, *, ack: bool) -> None:
        """Run the handler for one request and queue its reply (a one-way one's ack, if ``ack``);
        holds one slot, released here."""
        length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
        req = Request(audsid, rseq, bytes(memoryview(pdu)[HEADER_SIZE:]), sync=length > 0)
        counts = self._counts
        counts.requests += 1
        if not req.sync:
            counts.oneway += 1
        counts.inflight += 1
        try:
            body = self._reply_body(await _in_own_context(self.handler.handle(req)))
        except Exception as e:
            counts.errors += 1
            detail = f"{type(e).__name__}: {e}"[:MAX_ERROR_DETAIL]
            # The journal's line starts with this instance's name ("worker 1#0: "): with the audsid
            # and rseq, the request's key; then the traceback, which the session never sees. A
            # handler that fails every request logs the first of each kind of error per interval.
            self.warnings.warn(
                f"handler {type(e).__name__}",
                "%s request (audsid %d, rseq %d) failed: %s",
                "sync" if req.sync else "one-way",
                audsid,
                rseq,
                detail,
                exc_info=True,
            )
            if req.sync:
                conn.send(error_reply(audsid, rseq, ErrorCode.HANDLER_FAILED, detail))
        except BaseException:
            counts.abandoned += 1
            raise  # unacked: the hub sends it again
        else:
            if req.sync:
                conn.send(reply(audsid, rseq, body))
                counts.replies += 1
        finally:
            counts.inflight -= 1
            self._slots.release()
        if ack and not req.sync:
            conn.send(reply(audsid, rseq, b""))
            counts.acks += 1

    def _abandon(self) -> None:
        """A request read but never started: stop_timeout passed first."""
        self._counts.abandoned += 1
        self._slots.release()

    def _reply_body(self, result: Result) -> bytes | bytearray:
        if result is None:
            return b""
        if isinstance(result, str):
            result = result.encode()
        if not isinstance(result, (bytes, bytearray)):
            raise TypeError(f"handler returned {type(result).__name__}, not bytes, str or None")
        if len(result) > self.max_pdu - HEADER_SIZE:
            raise ReplyTooLarge(f"reply of {len(result)} bytes does not fit in max_pdu {self.max_pdu}")
        return result


@types.coroutine
def _in_own_context(coro: Awaitable[Result]):
    """Await ``coro`` in a copy of the current context, as trio runs each new task: a context
    variable that one request's handler sets is not seen by the next request on its runner."""
    context = contextvars.copy_context()
    value, error = None, None
    while True:
        try:
            trap = context.run(coro.send, value) if error is None else context.run(coro.throw, error)
        except StopIteration as returned:
            return returned.value
        try:
            value, error = (yield trap), None
        except BaseException as e:  # thrown in by trio (a cancellation, say): the handler's to see
            value, error = None, e


class _Runners:
    """The tasks that run the requests read from one hub, taking them in turn.

    A task per request cost trio a spawn and an exit for each (6.6 µs, most of what an echo
    worker spent per request). A runner here runs one request after another for as long as
    requests are queued, and calls a second runner while any are left, so that a handler
    that waits (for the network, say) holds up nothing: the second one takes the next
    request meanwhile, and calls a third if need be. Handlers that never wait all run on
    one runner. Runners park when the queue is empty; there are never more of them than
    requests running plus one, so the worker's slots bound them too.
    """

    def __init__(
        self, nursery: trio.Nursery, answer: Callable[[bytearray], Awaitable[None]], abandon: Callable[[], None]
    ) -> None:
        self._nursery = nursery
        self._answer = answer
        self._abandon = abandon
        self._queue: collections.deque[bytearray] = collections.deque()
        self._idle: list[trio.lowlevel.Task] = []
        self._calling = False  # a runner has been called and has not yet looked at the queue
        self._closed = False

    def put(self, pdu: bytearray) -> None:
        self._queue.append(pdu)
        self._call()

    def close(self) -> None:
        """Nothing more is coming: each runner ends once the queue is empty."""
        self._closed = True
        while self._idle:
            trio.lowlevel.reschedule(self._idle.pop())

    def _call(self) -> None:
        if self._calling:
            return
        self._calling = True
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())
        else:
            self._nursery.start_soon(self._run)

    async def _run(self) -> None:
        queue = self._queue
        try:
            while True:
                self._calling = False
                while queue:
                    pdu = queue.popleft()
                    if queue:
                        self._call()
                    await self._answer(pdu)
                if self._closed:
                    return
                await self._park()
        except BaseException:
            # Cancelled (stop_timeout): what is still queued will never run.
            for _ in range(len(queue)):
                self._abandon()
            queue.clear()
            raise

    def _park(self):
        task = trio.lowlevel.current_task()
        self._idle.append(task)

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            self._idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return trio.lowlevel.wait_task_rescheduled(abort)


async def _write(conn: Connection) -> None:
    """The connection's writer task; a write error closes the connection, which ends its reader."""
    try:
        await conn.writer()
    except ConnectionClosed as e:
        log.warning("%s: connection lost: %s", conn.name, e)
        conn.close()


async def _run_hook(name: str, hook: Callable[[], object] | None) -> None:
    if hook is None:
        return
    try:
        result = hook()
        if inspect.isawaitable(result):
            await result
    except Exception as e:
        raise HandlerError(f"{name}() failed: {type(e).__name__}: {e}") from e


def _hub_name(number: int, peer: object) -> str:
    """Like "hub 3 (10.0.0.5:40122)"; a Unix socket peer is unnamed, so just "hub 3"."""
    return f"hub {number} ({peer[0]}:{peer[1]})" if isinstance(peer, tuple) else f"hub {number}"


# ---------------------------------------------------------------- entry point


def main(config: Config, proxy_id: int, instance: int = 0, listen: str | None = None) -> int:
    """Run one worker instance until SIGTERM/SIGINT; the exit status (logging is the caller's to set up).

    The listening socket is the first one passed by systemd or the supervisor, else ``listen``
    (host:port or a Unix socket path), else the instance's socket under the runtime dir.
    """
    proxy = config.proxy(proxy_id)
    if not proxy.handler:
        log.error("proxy %d has no handler (it is %s)", proxy_id, "external" if proxy.address else "a command")
        return 1
    try:
        handler = load_handler(proxy.handler, proxy.handler_path)
    except HandlerError as e:
        log.error("%s", e)
        return 1
    try:
        listener = _listener(config, proxy_id, instance, listen)
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    worker = Worker(
        handler, concurrency=proxy.concurrency, max_pdu=config.hub.max_pdu, stop_timeout=config.supervisor.stop_timeout
    )
    log.info("proxy %d: handler %s, %d requests at a time", proxy_id, proxy.handler, proxy.concurrency)
    return trio.run(_run, worker, listener, config.supervisor.heartbeat_interval)


def _listener(config: Config, proxy_id: int, instance: int, listen: str | None) -> socket.socket:
    inherited = sockets.listen_fds()
    if inherited:
        return next(iter(inherited.values()))
    if listen:
        return sockets.bind(listen)
    path = config.worker_socket(proxy_id, instance)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return sockets.bind(str(path))


async def _run(worker: Worker, listener: socket.socket, heartbeat_interval: float) -> int:
    channel = control.child_channel()
    outcome: list[bool] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, worker, signals)
            try:
                await nursery.start(_serve, worker, listener, outcome, nursery.cancel_scope)
            except HandlerError as e:  # init() failed
                log.error("%s", e)
                nursery.cancel_scope.cancel()
                return 1
            if channel is not None:
                # Serving (init() done): tell the supervisor, then heartbeat until the end.
                nursery.start_soon(channel.writer)
                channel.send(control.event(control.Event.READY))
                nursery.start_soon(control.heartbeat, channel, worker.report, heartbeat_interval)
                nursery.start_soon(control.obey, channel, worker.stop)
    return 0 if outcome and outcome[0] else 1


async def _serve(
    worker: Worker,
    listener: socket.socket,
    outcome: list[bool],
    done: trio.CancelScope,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """worker.serve(), then end the tasks that only live alongside it."""
    try:
        outcome.append(await worker.serve(listener, task_status=task_status))
    except HandlerError as e:
        log.error("%s", e)
    done.cancel()


async def _stop_on_signals(worker: Worker, signals) -> None:
    async for signum in signals:
        worker.stop(signal.Signals(signum).name)
