"""The ext-hub's shell: sockets, tasks and the hub process around the router (dcod.hub.routing).

The router decides where each PDU goes and does no I/O; this module does the rest: accept
Oracle sessions (allow list, max_connections), connect to worker instances (and reconnect),
frame what they send and hand the PDUs to the router, stop reading a session whose replies
pile up (backpressure), forward queued requests when an instance is there (the pump), answer
timeouts and close stalled sessions (the sweep), adopt the spools of hubs that are gone, fsync
the spools; and the hub process: serve, drain, the supervisor's hold/release commands.

Hot path: one reactor task (dcod.net.reactor) reads every session and worker connection and
hands whole PDUs to the router, which rewrites 4 bytes in place and queues each PDU on its
destination connection; no task per request or per connection.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterable

import trio

from dcod import protocol
from dcod.config import Config
from dcod.hub.deadletter import DeadLetters
from dcod.hub.routing import Instance, Proxy, Router, Session, body_fingerprint
from dcod.hub.spool import SpoolDir
from dcod.log import Throttle
from dcod.net import channel as control
from dcod.net import sockets
from dcod.net.connection import Connection, ConnectionClosed, accept, connect
from dcod.net.reactor import Reactor
from dcod.protocol import ErrorCode, ProtocolError

log = logging.getLogger("dcod.hub")

RECONNECT_MIN = 0.05  # seconds before the first reconnect to a worker; doubles up to:
RECONNECT_MAX = 2.0
SWEEP_INTERVAL = 0.05  # granularity of reply timeouts
PUMP_HIGH_WATER = 4 * 1024 * 1024  # bytes the pump forwards before it waits for them to be written
SESSION_BACKLOG = 4 * 1024 * 1024  # bytes of unsent replies to one session before we stop reading it
WARN_EVERY = 10.0  # seconds between repeats of a warning about bad peers
ADOPT_INTERVAL = 1.0  # seconds between looks for spools left by hubs that are gone
FOREIGN_HANDSHAKE_PAUSE = 0.05  # seconds between the magic and the first request, for non-dcod workers
PROTOCOL_ERROR = "protocol error"  # why we closed a worker connection (already logged)


class Hub:
    """One hub: a Router, and the tasks that feed it from sockets (see the module's docstring).

    The router's outboxes are dcod.net.connection.Connection objects: ``session.conn`` and
    ``instance.conn`` are connections here."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.max_pdu = config.hub.max_pdu
        self.warnings = Throttle(log, WARN_EVERY, clock)  # for what a flood of bad peers could repeat
        self.allow = [ipaddress.ip_network(n, strict=False) for n in config.hub.allow]
        self.spools = SpoolDir(
            config.state_dir / "spool",
            memory_limit=config.hub.queue_memory,
            size_limit=config.hub.spool_max,
            max_record=config.hub.max_pdu,
        )
        self._pump_wanted = {p.id: trio.Event() for p in config.proxies}
        self.dead_letters = {p.id: DeadLetters(config.state_dir, p.id) for p in config.proxies}
        self.held_letters: dict[int, list[tuple[bytes, int]]] = {p.id: [] for p in config.proxies}  # (pdu, attempts)
        self._letters_seen: dict[int, tuple[int, int, int] | None] = {}  # each file's signature: see _forget_dropped
        self.router = Router(
            [
                Proxy(p, config.worker_addresses(p), self.spools.open(p.id), memory_limit=config.hub.queue_memory)
                for p in config.proxies
            ],
            reply_timeout=config.hub.reply_timeout,
            max_inflight=config.hub.max_inflight_per_session,
            clock=clock,
            wake_pump=self._wake_pump,
            warnings=self.warnings,
            poison_after=config.hub.poison_after,
            set_aside=self._set_aside,
        )
        self.connections = 0
        self.totals = collections.Counter()  # the shell's (protocol errors, refused connections...); see stats()
        self.draining = False
        self.reactor: Reactor | None = None  # reads every session and worker connection; made by run()
        # Sessions mid-PDU or before their handshake: since when, and their framer.
        self._incomplete: dict[Session, tuple[float, protocol.Framer]] = {}
        self._nursery: trio.Nursery | None = None
        self._listeners: list[socket.socket] = []
        # Under a supervisor (``hold_after_loss``: how long a hold of our own lasts without its word):
        # the instances it told us to hold, not released since.
        self.hold_after_loss: float | None = None
        self.held_by_supervisor: set[Instance] = set()

    # ------------------------------------------------------------ life cycle

    async def run(self, listeners: list[socket.socket], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Started means: listening, replaying, connecting to workers."""
        self._listeners = listeners
        proxies = self.router.proxies.values()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.reactor = Reactor()
                nursery.start_soon(self.reactor.run)
                self._adopt_spools()
                nursery.start_soon(self._keep_adopting)
                for proxy in proxies:
                    nursery.start_soon(self._pump, proxy)
                    for instance in proxy.instances:
                        nursery.start_soon(self._keep_connected, instance)
                nursery.start_soon(self._sweep)
                nursery.start_soon(self._fsync_spools)
                for listener in listeners:
                    nursery.start_soon(self._accept, listener)
                task_status.started()
        finally:
            for proxy in proxies:
                proxy.spool.close()
            self.spools.close()
            self._write_held_letters()
            for proxy_id, held in self.held_letters.items():
                if held:
                    log.error("proxy %d: %d poison requests not written as dead letters are lost", proxy_id, len(held))

    def close_listeners(self) -> None:
        """Stop accepting sessions (the first step of a drain)."""
        self.draining = True
        for listener in self._listeners:
            trio.lowlevel.notify_closing(listener)
            listener.close()

    # ------------------------------------------------------------ Oracle side

    async def _accept(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        while True:
            try:
                sock, addr = await accept(listener)
            except trio.ClosedResourceError:
                return  # closed by a drain
            peer = _peer_name(sock.family, addr)
            if not self._allowed(sock.family, addr):
                self.totals["refused_connections"] += 1
                self.warnings.warn("allow", "refused a connection from %s: not in hub.allow", peer)
                sock.close()
                continue
            if self.connections >= self.config.hub.max_connections:
                self.totals["refused_connections"] += 1
                self.warnings.warn(
                    "max_connections",
                    "refused a connection from %s: hub.max_connections (%d) reached",
                    peer,
                    self.config.hub.max_connections,
                )
                sock.close()
                continue
            session = Session(Connection(sock, peer), peer)
            framer = protocol.Framer(self.max_pdu, preamble=protocol.ORACLE_HANDSHAKE.size, magic=protocol.ORACLE_MAGIC)
            self.connections += 1
            self._incomplete[session] = (self.clock(), framer)  # until its handshake is in
            self.reactor.add(
                session.conn,
                functools.partial(self._on_session_data, session, framer),
                functools.partial(self._on_session_end, session, framer),
            )

    def _allowed(self, family: int, addr) -> bool:
        if family not in (socket.AF_INET, socket.AF_INET6):
            return True
        ip = ipaddress.ip_address(addr[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def _on_session_data(self, session: Session, framer: protocol.Framer, data: memoryview) -> None:
        try:
            pdus = framer.feed(data)
            if not session.registered and framer.preamble:
                self.router.register(session, framer.preamble)
        except ProtocolError as e:
            self.totals["protocol_errors"] += 1
            log.warning("session %s audsid %d: %s; closing it", session.peer, session.audsid, e)
            session.conn.close()
            return
        if pdus:
            self.router.requests(session, pdus)
        if framer.buffered or not session.registered:
            # Mid-PDU or before the handshake: a peer that stalls here holds a connection and
            # memory for nothing (slowloris); _sweep closes it after stall_timeout of silence.
            self._incomplete[session] = (self.clock(), framer)
        elif self._incomplete:
            self._incomplete.pop(session, None)
        if session.conn.pending_bytes > SESSION_BACKLOG:
            # Its replies pile up unread: read no more from it until they are gone, so the
            # session's own socket, not our memory, absorbs what it keeps sending.
            self.totals["slow_readers"] += 1
            self.reactor.pause(session.conn)
            self._nursery.start_soon(self._resume_when_flushed, session.conn)

    async def _resume_when_flushed(self, conn: Connection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await conn.flush()
            self.reactor.pause(conn, reading=True)

    def _on_session_end(self, session: Session, framer: protocol.Framer, reason: str | None) -> None:
        self.connections -= 1
        self._incomplete.pop(session, None)
        if reason is None and framer.buffered:
            self.totals["truncated_pdus"] += 1
            log.warning(
                "session %s audsid %d went away mid-PDU (%d bytes)", session.peer, session.audsid, framer.buffered
            )
        self.router.unregister(session)

    # ------------------------------------------------------------ the queue

    def _wake_pump(self, proxy: Proxy) -> None:
        self._pump_wanted[proxy.config.id].set()

    def _set_aside(self, proxy: Proxy, pdu: bytes | bytearray, attempts: int) -> None:
        """A poison request (the router logged it): into the proxy's dead-letter store, or, while the
        store cannot take it (a full or read-only disk), held here until it can (_write_held_letters)."""
        try:
            self.dead_letters[proxy.config.id].add(pdu, attempts)
        except OSError as e:
            _, audsid, rseq = protocol.ROUTED_HEADER.unpack_from(pdu)
            self.held_letters[proxy.config.id].append((bytes(pdu), attempts))
            log.error(
                "proxy %d: the poison request %d of audsid %d cannot be kept in %s (%s): held in memory "
                "until it can be written",
                proxy.config.id,
                rseq,
                audsid,
                self.dead_letters[proxy.config.id].path,
                e.strerror or e,
            )

    def _write_held_letters(self) -> None:
        for proxy_id, held in self.held_letters.items():
            while held:
                try:
                    self.dead_letters[proxy_id].add(*held[0])
                except OSError:
                    break
                held.pop(0)

    def _adopt_spools(self) -> None:
        """Take over what hubs that are gone left queued (the router tracks their sync requests again)."""
        wall = time.time()
        for proxy in self.router.proxies.values():
            records, possible_duplicates = self.spools.adopt(proxy.spool, proxy.config.id)
            self.router.adopt(proxy, records, possible_duplicates, wall)

    async def _keep_adopting(self) -> None:
        """A hub that drains during a rollout may leave requests queued when it exits: take them."""
        while True:
            await trio.sleep(ADOPT_INTERVAL)
            self._adopt_spools()
            self._forget_dropped()

    def _forget_dropped(self) -> None:
        """Sync requests set aside as poison are refused (DCO-0008) while their dead letters are kept:
        once the operator drops them (`dcod dead-letters drop`), the same requests go to workers again."""
        for proxy in self.router.proxies.values():
            if not proxy.poison:
                continue
            store = self.dead_letters[proxy.config.id]
            signature = store.signature()
            if self._letters_seen.get(proxy.config.id) == signature:
                continue
            self._letters_seen[proxy.config.id] = signature
            kept = {body_fingerprint(pdu) for pdu, _ in self.held_letters[proxy.config.id]}
            try:
                kept.update(body_fingerprint(letter.pdu) for letter in store.letters() if not letter.oneway)
            except OSError:
                continue  # unreadable: refuse on (the error shows where it is written)
            forgotten = self.router.forget_poison(proxy, kept)
            if forgotten:
                log.info(
                    "proxy %d: %d poison sync requests dropped from its dead letters: served again",
                    proxy.config.id,
                    forgotten,
                )

    async def _pump(self, proxy: Proxy) -> None:
        """Forward queued requests, in order, whenever an instance is available."""
        proxy_id = proxy.config.id
        while True:
            await self._pump_wanted[proxy_id].wait()
            self._pump_wanted[proxy_id] = trio.Event()
            while len(proxy.spool):
                instance = self.router.dispatch(proxy, PUMP_HIGH_WATER)
                if instance is None:
                    break
                with contextlib.suppress(ConnectionClosed):
                    await instance.conn.flush()

    async def _fsync_spools(self) -> None:
        interval = self.config.hub.spool_fsync_interval
        while True:
            await trio.sleep(interval or SWEEP_INTERVAL)
            self._write_held_letters()
            for proxy in self.router.proxies.values():
                if not proxy.spool.durable:
                    # In the loop's thread: it rewrites the queue's bookkeeping, which the router reads.
                    proxy.spool.retry_durable()
                elif proxy.spool.dirty:
                    await trio.to_thread.run_sync(proxy.spool.sync)

    # ------------------------------------------------------------ worker side

    async def _keep_connected(self, instance: Instance) -> None:
        """Connect to a worker instance, serve it while it lives, reconnect with backoff."""
        delay = RECONNECT_MIN
        while True:
            try:
                sock = await connect(instance.address)
            except OSError as e:
                if instance.connects == 0 and delay == RECONNECT_MIN:
                    log.info(
                        "worker %s at %s not there yet (%s); retrying", instance.name, instance.address, e.strerror
                    )
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            await self._serve_instance(instance, Connection(sock, f"worker {instance.name}"))

    async def _serve_instance(self, instance: Instance, conn: Connection) -> None:
        instance.connects += 1
        reason: str | None = "handshake"
        try:
            await self._handshake(instance, conn)
            self.router.connected(instance, conn)
            log.info("connected to worker %s at %s", instance.name, instance.address)
            framer = protocol.Framer(self.max_pdu, accept_noradle_quit=True)
            reason = await self.reactor.serve(conn, functools.partial(self._on_instance_data, instance, conn, framer))
            if reason is None:
                log.info("worker %s closed its connection", instance.name)
            elif reason != PROTOCOL_ERROR:
                log.warning("worker %s: connection lost: %s", instance.name, reason)
        except ConnectionClosed as e:
            log.warning("worker %s: connection lost: %s", instance.name, e)
        finally:
            conn.close()
            unsent = [
                pdu
                for pdu in conn.take_unsent()
                if pdu is not protocol.HUB_HANDSHAKE and pdu is not protocol.ACK_ONEWAY
            ]
            lost = instance.state != "quitting" and reason != PROTOCOL_ERROR
            self.router.requeue(instance, unsent)
            if lost and instance.acks and self.hold_after_loss is not None:
                self._nursery.start_soon(self._hold_after_loss, instance, self.hold_after_loss)

    async def _hold_after_loss(self, instance: Instance, timeout: float) -> None:
        """A dcod worker's connection ended with no quit notice: its process died. The supervisor holds
        it until a new one is ready, but its `hold` comes after the kernel told us (it reaps the process
        first), and our reconnect would succeed at once, into the backlog of the socket it keeps for a
        next process, which may never come: hold it ourselves meanwhile. Had it not died (the
        supervisor does not hold it within ``timeout``), use it again."""
        self.router.hold(instance)
        await trio.sleep(timeout)
        if instance.held and instance not in self.held_by_supervisor:
            log.warning("worker %s: its connection ended, but it is not down: using it again", instance.name)
            self.router.hold(instance, False)

    async def _handshake(self, instance: Instance, conn: Connection) -> None:
        """The magic; to a worker of our own, the request to acknowledge one-way requests too.

        Noradle's Node worker drops 12 bytes (not 4) from a first chunk longer than the magic,
        so a worker not our own gets the magic alone and time to read it by itself."""
        conn.send(protocol.HUB_HANDSHAKE)
        if instance.acks:
            conn.send(protocol.ACK_ONEWAY)
        await conn.flush()
        if not instance.acks:
            await trio.sleep(FOREIGN_HANDSHAKE_PAUSE)

    def _on_instance_data(
        self, instance: Instance, conn: Connection, framer: protocol.Framer, data: memoryview
    ) -> None:
        try:
            pdus = framer.feed(data)
        except ProtocolError as e:
            self.totals["worker_protocol_errors"] += 1
            log.warning("worker %s: %s; closing the connection", instance.name, e)
            conn.close(PROTOCOL_ERROR)
            return
        reply = self.router.reply
        for pdu in pdus:
            if reply(instance, pdu):  # a dcod worker's quit notice: nothing more is coming, tell it
                self._nursery.start_soon(self._half_close, conn)

    async def _half_close(self, conn: Connection) -> None:
        try:
            await conn.flush()
            conn.shutdown_write()
        except (ConnectionClosed, OSError):
            pass

    # ------------------------------------------------------------ timeouts

    async def _sweep(self) -> None:
        """Answer sync requests past their deadline; close sessions stalled mid-PDU."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = self.clock()
            self.router.expire(now)
            self._close_stalled(now)
            self.warnings.flush()

    def _close_stalled(self, now: float) -> None:
        stall_timeout = self.config.hub.stall_timeout
        stalled = [(s, framer) for s, (since, framer) in self._incomplete.items() if now - since >= stall_timeout]
        for session, framer in stalled:
            self.totals["stalled"] += 1
            self.warnings.warn(
                "stalled",
                "session %s: stalled for %gs before a whole PDU (%d bytes); closing it",
                session.peer,
                stall_timeout,
                framer.buffered,
            )
            session.conn.close()

    # ------------------------------------------------------------ status

    def stats(self) -> dict:
        router = self.router
        proxies = {}
        for p in router.proxies.values():
            c = p.counters.as_dict()
            spool = p.spool
            c.update(
                queued_now=len(spool),
                spooled_bytes=spool.size,
                waiting=len(p.waiting),
                durable=spool.durable,
                not_durable_reason=spool.not_durable_reason,
                memory_only=spool.memory_only,
                damaged_ranges=spool.damaged_ranges,
                damaged_bytes=spool.damaged_bytes,
                torn_bytes=spool.torn_bytes,
                damaged_copies=[str(path) for path in spool.damaged_copies],
                dead_letters=self.dead_letters[p.config.id].count() + len(self.held_letters[p.config.id]),
                dead_letter_file=str(self.dead_letters[p.config.id].path),
                inflight=sum(len(i.inflight) for i in p.instances),
                unacked=sum(len(i.unacked) for i in p.instances),
                memory_bytes=p.unacked_bytes + spool.memory_bytes,  # bounded by hub.queue_memory
                instances=[
                    {
                        "index": i.index,
                        "address": i.address,
                        "state": i.state,
                        "held": i.held,
                        "inflight": len(i.inflight),
                        "unacked": len(i.unacked),
                        "connects": i.connects,
                    }
                    for i in p.instances
                ],
            )
            proxies[p.config.id] = c
        return {
            "connections": self.connections,
            "sessions": len(router.sessions),
            "draining": self.draining,
            "inflight": router.inflight,
            "totals": dict(self.totals + router.totals),
            "proxies": proxies,
        }


def _peer_name(family: int, addr) -> str:
    if family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    if family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    return "unix"


# ---------------------------------------------------------------- the hub process


async def drain(
    hub: Hub,
    *,
    timeout: float,
    flush_timeout: float,
    grace: float = 1.0,
    removed: Iterable[int] = (),
    on_closed: Callable[[], None] | None = None,
) -> None:
    """Stop taking sessions and wait until every sync request is answered and sessions have gone.

    Sessions read their replies and reconnect elsewhere once the quit alert is raised; one
    that stays connected without a sync request in flight (or queued) is closed after ``grace``
    seconds of quiet: Noradle's PL/SQL counts its one-way requests among the replies it waits
    for at the alert, so it would wait for us forever. The sync requests queued for a proxy a
    reload ``removed`` will never be forwarded: they are answered at once. Past ``timeout`` what
    is still in flight or queued is answered with error replies, which get ``flush_timeout`` to
    be written (a session that does not read them does not keep the hub).
    """
    hub.close_listeners()
    router = hub.router
    for proxy_id in removed:
        proxy = router.proxies.get(proxy_id)
        if proxy is not None and proxy.waiting:
            answered = router.fail_queued(
                proxy, ErrorCode.DRAINING, f"proxy {proxy_id} removed by a reload before the request was forwarded"
            )
            proxy.counters.drained += answered
            log.warning("proxy %d removed: %d sync requests queued for it answered with errors", proxy_id, answered)
    if on_closed is not None:
        on_closed()
    with trio.move_on_after(timeout):
        quiet_since: dict[Session, float] = {}
        while router.inflight or router.sessions:
            now = hub.clock()
            for session in list(router.sessions):  # per connection: audsids need not be unique
                if session.inflight:
                    quiet_since.pop(session, None)
                elif now - quiet_since.setdefault(session, now) >= grace:
                    session.conn.close()
            await trio.sleep(SWEEP_INTERVAL)
        return
    left = queued = 0
    lost = "hub stopped before the reply came"
    for proxy in router.proxies.values():
        in_flight = sum(router.fail(instance, ErrorCode.DRAINING, lost) for instance in proxy.instances)
        # Their records stay in the spool: the next hub forwards those still in time, and their replies go nowhere.
        waiting = router.fail_queued(
            proxy, ErrorCode.DRAINING, "hub stopped before the request was forwarded (a later hub may still forward it)"
        )
        proxy.counters.drained += in_flight + waiting
        left, queued = left + in_flight, queued + waiting
    log.warning(
        "drain timed out after %gs; answered %d sync requests in flight and %d queued with errors",
        timeout,
        left,
        queued,
    )
    with trio.move_on_after(flush_timeout):
        for session in list(router.sessions):
            with contextlib.suppress(ConnectionClosed):
                await session.conn.flush()
    unread = [session for session in router.sessions if session.conn.pending_bytes]
    if unread:
        log.warning("%d sessions did not read their last answers within %gs; closing them", len(unread), flush_timeout)
        for session in unread:
            session.conn.close()


async def serve(config: Config, listeners: list[socket.socket]) -> None:
    """Run a hub until SIGTERM/SIGINT (or its supervisor goes away), then drain it and return."""
    hub = Hub(config)
    for proxy_id, index in control.held_at_start():  # instances that are down: see Slot.held
        with contextlib.suppress(KeyError, IndexError):  # not in this configuration
            instance = hub.router.proxies[proxy_id].instances[index]
            hub.held_by_supervisor.add(instance)
            hub.router.hold(instance)
    channel = control.child_channel()
    if channel is not None:
        hub.hold_after_loss = config.supervisor.heartbeat_timeout
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run, listeners)
            log.info(
                "hub serving proxies %s on %s",
                ", ".join(map(str, hub.router.proxies)) or "(none)",
                ", ".join(_listener_name(s) for s in listeners),
            )
            stop = trio.Event()
            drain_command: dict = {}  # the supervisor's drain command, once it came
            on_closed = None
            if channel is not None:
                nursery.start_soon(channel.writer)
                nursery.start_soon(
                    control.heartbeat, channel, functools.partial(_report, hub), config.supervisor.heartbeat_interval
                )
                nursery.start_soon(_ready_when_connected, hub, channel)
                nursery.start_soon(
                    control.obey,
                    channel,
                    functools.partial(_stop, stop),
                    functools.partial(_on_command, hub, channel, nursery, drain_command),
                )
                on_closed = functools.partial(_say_draining, hub, channel)
            nursery.start_soon(_stop_on_signal, signals, stop)
            await stop.wait()
            limits = config.supervisor
            await drain(
                hub,
                timeout=limits.drain_timeout,
                flush_timeout=limits.stop_timeout / 2,  # the supervisor kills us at drain_timeout + stop_timeout
                removed=drain_command.get("removed", ()),
                on_closed=on_closed,
            )
            if channel is not None:
                with contextlib.suppress(ConnectionClosed), trio.move_on_after(limits.stop_timeout / 2):
                    await channel.conn.flush()  # the supervisor may be gone already, or not reading
            nursery.cancel_scope.cancel()
    log.info("hub stopped")


def _stop(stop: trio.Event, reason: str) -> None:
    if not stop.is_set():
        log.info("%s: draining", reason)
        stop.set()


async def _stop_on_signal(signals, stop: trio.Event) -> None:
    async for signum in signals:
        _stop(stop, signal.Signals(signum).name)


async def _ready_when_connected(hub: Hub, channel: control.Channel) -> None:
    """Tell the supervisor once every proxy has an instance connected."""
    while not hub.router.workers_connected():
        await trio.sleep(RECONNECT_MIN)
    # What it has now first: once the hub is ready, `dcod status` shows its instances connected.
    control.send_heartbeat(channel, functools.partial(_report, hub))
    channel.send(control.event(control.Event.READY))


def _report(hub: Hub) -> tuple[control.StatusCounts, dict]:
    """The hub's heartbeat: its row in `dcod status`, and its stats() (the detail per proxy)."""
    stats = hub.stats()
    proxies = stats["proxies"].values()
    counts = control.StatusCounts(
        done=sum(p["replies"] + p["oneway"] for p in proxies),
        inflight=stats["inflight"],
        queued=sum(p["queued_now"] for p in proxies),
        spooled=sum(p["spooled_bytes"] for p in proxies),
        errors=sum(p["errors"] + p["error_replies"] for p in proxies),
        dead=sum(p["dead_letters"] for p in proxies),
    )
    return counts, stats


def _say_draining(hub: Hub, channel: control.Channel) -> None:
    """The listener is closed: say so, after a heartbeat with what the drain answered at once
    (the supervisor reads them in order: a reload reports the counts)."""
    control.send_heartbeat(channel, functools.partial(_report, hub))
    channel.send(control.event(control.Event.DRAINING))


def _on_command(hub: Hub, channel: control.Channel, nursery: trio.Nursery, drain_command: dict, message: dict) -> None:
    """hold/release an instance (answered once it is idle / connected again); drain: keep what it
    asks besides stopping (the proxies a reload removed)."""
    command = control.command_of(message)
    if command in (control.Command.HOLD, control.Command.RELEASE):
        nursery.start_soon(_hold, hub, channel, message)
    elif command == control.Command.DRAIN:
        drain_command.update(message)


async def _hold(hub: Hub, channel: control.Channel, message: dict) -> None:
    """Held: wait until its replies and acks are in, at most drain_timeout (its process, told to
    stop next, finishes what it can in stop_timeout; a one-way request it does not finish goes to
    the queue again). Released: wait until we are connected to it again, at most ready_timeout,
    and only then not held, so that `dcod status` never sees it down unless it is."""
    try:
        instance = hub.router.proxies[message["proxy"]].instances[message["instance"]]
    except (KeyError, IndexError, TypeError):
        channel.send(control.done(message.get("id"), f"no instance {message.get('proxy')}#{message.get('instance')}"))
        return
    limits = hub.config.supervisor
    held = control.command_of(message) == control.Command.HOLD
    error = None
    if held:
        hub.held_by_supervisor.add(instance)
        hub.router.hold(instance, True)
        with trio.move_on_after(limits.drain_timeout):
            while instance.inflight or instance.unacked:
                await trio.sleep(SWEEP_INTERVAL)
        if instance.inflight or instance.unacked:
            log.warning(
                "worker %s: held, with %d requests still not finished after drain_timeout (%gs)",
                instance.name,
                len(instance.inflight) + len(instance.unacked),
                limits.drain_timeout,
            )
    else:
        hub.held_by_supervisor.discard(instance)
        with trio.move_on_after(limits.ready_timeout):
            while instance.state != "up":
                await trio.sleep(SWEEP_INTERVAL)
        if instance.state != "up":  # not held all the same: it is used once we connect
            error = f"not connected to it within ready_timeout ({limits.ready_timeout:g}s)"
        hub.router.hold(instance, False)
    channel.send(control.done(message.get("id"), error))


def main(config: Config, listen: str | None = None) -> int:
    """`dcod hub`: the listener from systemd-style LISTEN_FDS, else --listen, else hub.listen."""
    passed = sockets.listen_fds()
    listeners = list(passed.values()) or [sockets.bind(listen or config.hub.listen)]
    trio.run(serve, config, listeners)
    return 0


def _listener_name(sock: socket.socket) -> str:
    name = sock.getsockname()
    return _peer_name(sock.family, name) if sock.family != socket.AF_UNIX else str(name)
