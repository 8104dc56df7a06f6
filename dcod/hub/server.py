"""The ext-hub: Oracle sessions in, worker proxy instances out (DESIGN §3).

Each Oracle session sends requests tagged with a proxy id; the hub rewrites the proxy id
into the session's audsid and forwards the PDU to an instance of that proxy (the least
busy one, or the session's own one for an ``ordered`` proxy). Replies carry the audsid
back and go to the session that has it. Every sync request is tracked until its reply,
error reply or timeout; a request that cannot be forwarded at once is queued in the
proxy's spool, durably, and forwarded in order when an instance is there.

Hot path: one reactor task (dcod.net.reactor) reads every session and worker connection,
parses whole PDUs and hands each to its destination connection's outbox, rewriting 4 bytes
in place; no task per request or per connection.
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
from typing import Callable

import trio

from dcod import protocol
from dcod.net import channel as control, sockets
from dcod.config import Config, ProxyConfig
from dcod.net.connection import Connection, ConnectionClosed, accept, connect
from dcod.protocol import ROUTED_HEADER, ErrorCode, ProtocolError
from dcod.net.reactor import Reactor
from dcod.hub.spool import Spool, SpoolDir, SpoolFull

log = logging.getLogger("dcod.hub")

RECONNECT_MIN = 0.05  # seconds before the first reconnect to a worker; doubles up to:
RECONNECT_MAX = 2.0
SWEEP_INTERVAL = 0.05  # granularity of reply timeouts
PUMP_HIGH_WATER = 4 * 1024 * 1024  # bytes queued to one instance before the pump waits
SESSION_BACKLOG = 4 * 1024 * 1024  # bytes of unsent replies to one session before we stop reading it
WARN_EVERY = 10.0  # seconds between repeats of a warning about bad peers
ADOPT_INTERVAL = 1.0  # seconds between looks for spools left by hubs that are gone
FOREIGN_HANDSHAKE_PAUSE = 0.05  # seconds between the magic and the first request, for non-dcod workers
PROTOCOL_ERROR = "protocol error"  # why we closed a worker connection (already logged)


class Pending:
    """A sync request waiting for its reply."""

    __slots__ = ("key", "proxy", "session", "instance", "deadline", "started", "done")

    def __init__(self, key: tuple[int, int], proxy: Proxy, deadline: float, started: float,
                 session: Session | None = None) -> None:
        self.key = key
        self.proxy = proxy
        self.session = session  # None for a request replayed from a spool
        self.instance: Instance | None = None  # None while queued
        self.deadline = deadline
        self.started = started
        self.done = False
        if session is not None:
            session.inflight += 1

    def finish(self) -> None:
        """Answered (reply, error reply or timeout): no longer counts against its session."""
        self.done = True
        if self.session is not None:
            self.session.inflight -= 1
            self.session = None


class Counters:
    """What `dcod status` shows for a proxy (and, summed, for the hub)."""

    __slots__ = ("requests", "oneway", "acked", "replies", "errors", "error_replies", "timeouts", "worker_lost",
                 "refused", "queued", "requeued", "replayed", "expired", "duplicates", "orphan_replies",
                 "latency_sum", "latency_max")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


class Instance:
    """One worker instance of a proxy, as the hub sees it: a connection that comes and goes."""

    __slots__ = ("proxy", "index", "address", "conn", "_state", "_held", "inflight", "unacked", "acks", "connects")

    def __init__(self, proxy: Proxy, index: int, address: str) -> None:
        self.proxy = proxy
        self.index = index
        self.address = address
        self.conn: Connection | None = None
        self._state = "connecting"  # connecting | up | quitting
        self._held = False  # the supervisor asked us not to dispatch here (it is being restarted)
        self.inflight: dict[tuple[int, int], Pending] = {}
        # One-way requests sent and not yet acknowledged, in the order sent (only from a worker
        # running dcod's runtime, which acknowledges them: protocol.ACK_ONEWAY).
        self.unacked: dict[tuple[int, int], bytearray] = {}
        self.acks = proxy.config.handler != ""
        self.connects = 0

    @property
    def name(self) -> str:
        return f"{self.proxy.config.id}#{self.index}"

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self.proxy.update_available()

    @property
    def held(self) -> bool:
        return self._held

    @held.setter
    def held(self, held: bool) -> None:
        self._held = held
        self.proxy.update_available()

    @property
    def available(self) -> bool:
        return self._state == "up" and not self._held


class Proxy:
    """A proxy id: its instances, its durable queue, its counters."""

    def __init__(self, config: ProxyConfig, addresses: list[str], spool: Spool) -> None:
        self.config = config
        self.available: list[Instance] = []  # the instances to dispatch to; kept by update_available()
        self.instances = [Instance(self, i, a) for i, a in enumerate(addresses)]
        self.spool = spool
        self.waiting: dict[tuple[int, int], Pending] = {}  # queued sync requests
        self.counters = Counters()
        self.wake_pump = trio.Event()
        self._turn = 0  # where the round-robin among equally busy instances starts
        self._last_read = 0  # pick(): the session read it last picked for, and what
        self._last_pick: Instance | None = None

    def update_available(self) -> None:
        """An instance's state changed: recompute ``available``, so that pick() need not."""
        self.available = [i for i in self.instances if i.available]
        self._last_read = 0  # pick() chooses afresh

    def pick(self, audsid: int, read: int = 0) -> Instance | None:
        """The instance for a request: least outstanding first, or by session for ordered proxies.

        Ties go round-robin, so that one-way requests (never outstanding) spread too. The
        requests of one read from a session (``read`` numbers it) go to the same instance:
        their replies then come back together and reach the session in one write, and the
        session's next requests come together too.
        """
        available = self.available
        count = len(available)
        if count < 2:
            return available[0] if count else None
        if self.config.ordered:
            return available[audsid % count]
        if read and read == self._last_read:
            return self._last_pick
        self._turn = turn = (self._turn + 1) % count
        best = available[turn]
        for k in range(1, count):
            instance = available[(turn + k) % count]
            if len(instance.inflight) < len(best.inflight):
                best = instance
        self._last_read, self._last_pick = read, best
        return best


class Session:
    """An Oracle session's connection."""

    __slots__ = ("conn", "framer", "audsid", "sid", "serial", "peer", "registered", "inflight")

    def __init__(self, conn: Connection, peer: str, max_pdu: int) -> None:
        self.conn = conn
        self.framer = protocol.Framer(max_pdu, preamble=protocol.ORACLE_HANDSHAKE.size, magic=protocol.ORACLE_MAGIC)
        self.peer = peer
        self.audsid = self.sid = self.serial = 0  # audsid 0 is a real one (SYS): see registered
        self.registered = False
        self.inflight = 0  # its sync requests not answered yet


class Hub:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.max_pdu = config.hub.max_pdu
        self.reply_timeout = config.hub.reply_timeout
        self.max_inflight = config.hub.max_inflight_per_session
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (last warned, suppressed since)
        self.allow = [ipaddress.ip_network(n, strict=False) for n in config.hub.allow]
        self.proxies: dict[int, Proxy] = {}
        self.spools = SpoolDir(config.state_dir / "spool", memory_limit=config.hub.queue_memory,
                               size_limit=config.hub.spool_max, max_record=config.hub.max_pdu)
        for p in config.proxies:
            self.proxies[p.id] = Proxy(p, config.worker_addresses(p), self.spools.open(p.id))
        self.sessions: dict[int, Session] = {}  # by audsid: where replies go
        self.connections = 0
        self.timeouts: collections.deque[Pending] = collections.deque()  # in deadline order
        self.totals = collections.Counter()  # hub-wide: sessions, protocol errors, refused connections...
        self.draining = False
        self.reactor: Reactor | None = None  # reads every session and worker connection; made by run()
        self._reads = 0  # reads from sessions that brought requests: Proxy.pick() keeps each one's together
        self._incomplete: dict[Session, float] = {}  # sessions mid-PDU or before their handshake: since when
        self._nursery: trio.Nursery | None = None
        self._listeners: list[socket.socket] = []

    # ------------------------------------------------------------ life cycle

    async def run(self, listeners: list[socket.socket], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Started means: listening, replaying, connecting to workers."""
        self._listeners = listeners
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.reactor = Reactor()
                nursery.start_soon(self.reactor.run)
                self._adopt_spools()
                nursery.start_soon(self._keep_adopting)
                for proxy in self.proxies.values():
                    nursery.start_soon(self._pump, proxy)
                    for instance in proxy.instances:
                        nursery.start_soon(self._keep_connected, instance)
                nursery.start_soon(self._sweep)
                nursery.start_soon(self._fsync_spools)
                for listener in listeners:
                    nursery.start_soon(self._accept, listener)
                task_status.started()
        finally:
            for proxy in self.proxies.values():
                proxy.spool.close()

    def workers_connected(self) -> bool:
        """Every proxy has at least one instance up: what `ready` waits for."""
        return all(any(i.state == "up" for i in p.instances) for p in self.proxies.values())

    def hold(self, proxy_id: int, index: int, held: bool = True) -> None:
        """Stop (or resume) dispatching to an instance: it is about to be restarted."""
        instance = self.proxies[proxy_id].instances[index]
        instance.held = held
        if not held:
            instance.proxy.wake_pump.set()

    def close_listeners(self) -> None:
        """Stop accepting sessions (the first step of a drain)."""
        self.draining = True
        for listener in self._listeners:
            trio.lowlevel.notify_closing(listener)
            listener.close()

    @property
    def inflight(self) -> int:
        return sum(len(i.inflight) + len(i.unacked) + len(p.waiting) for p in self.proxies.values() for i in p.instances)

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
                self._warn("allow", "refused a connection from %s: not in hub.allow", peer)
                sock.close()
                continue
            if self.connections >= self.config.hub.max_connections:
                self.totals["refused_connections"] += 1
                self._warn("max_connections", "refused a connection from %s: hub.max_connections (%d) reached",
                           peer, self.config.hub.max_connections)
                sock.close()
                continue
            session = Session(Connection(sock, peer), peer, self.max_pdu)
            self.connections += 1
            self._incomplete[session] = self.clock()  # until its handshake is in
            self.reactor.add(session.conn, functools.partial(self._on_session_data, session),
                             functools.partial(self._on_session_end, session))

    def _warn(self, kind: str, message: str, *args) -> None:
        """A warning that a flood of bad peers could repeat: at most one per kind every WARN_EVERY s."""
        now = self.clock()
        last, suppressed = self._warned.get(kind, (-WARN_EVERY, 0))
        if now - last < WARN_EVERY:
            self._warned[kind] = (last, suppressed + 1)
            return
        if suppressed:
            message += f" ({suppressed} more like it in the last {WARN_EVERY:g}s)"
        log.warning(message, *args)
        self._warned[kind] = (now, 0)

    def _allowed(self, family: int, addr) -> bool:
        if family not in (socket.AF_INET, socket.AF_INET6):
            return True
        ip = ipaddress.ip_address(addr[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def _on_session_data(self, session: Session, data: memoryview) -> None:
        framer = session.framer
        try:
            pdus = framer.feed(data)
            if not session.registered and framer.preamble:
                self._register(session, framer.preamble)
        except ProtocolError as e:
            self.totals["protocol_errors"] += 1
            log.warning("session %s audsid %d: %s; closing it", session.peer, session.audsid, e)
            session.conn.close()
            return
        if pdus:
            self._reads += 1
            for pdu in pdus:
                self._on_request(session, pdu)
        if framer.buffered or not session.registered:
            # Mid-PDU or before the handshake: a peer that stalls here holds a connection and
            # memory for nothing (slowloris); _sweep closes it after stall_timeout of silence.
            self._incomplete[session] = self.clock()
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

    def _on_session_end(self, session: Session, reason: str | None) -> None:
        self.connections -= 1
        self._incomplete.pop(session, None)
        if reason is None and session.framer.buffered:
            self.totals["truncated_pdus"] += 1
            log.warning("session %s audsid %d went away mid-PDU (%d bytes)", session.peer, session.audsid,
                        session.framer.buffered)
        if session.registered and self.sessions.get(session.audsid) is session:
            del self.sessions[session.audsid]

    def _register(self, session: Session, handshake: bytes) -> None:
        _, session.sid, session.serial, session.audsid = protocol.ORACLE_HANDSHAKE.unpack(handshake)
        session.registered = True
        self.totals["sessions"] += 1
        previous = self.sessions.get(session.audsid)
        if previous is not None:
            log.info("audsid %d connected again from %s; replies go to the new connection", session.audsid,
                     session.peer)
        self.sessions[session.audsid] = session

    def _on_request(self, session: Session, pdu: bytearray) -> None:
        length, proxy_id, rseq = protocol.REQUEST_HEADER.unpack_from(pdu)
        audsid = session.audsid
        proxy = self.proxies.get(proxy_id)
        if proxy is None:
            self.totals["unknown_proxy"] += 1
            if length > 0:
                session.conn.send(protocol.error_reply(audsid, rseq, ErrorCode.UNKNOWN_PROXY, f"unknown proxy {proxy_id}"))
            else:
                log.warning("one-way request for unknown proxy %d from audsid %d dropped", proxy_id, audsid)
            return
        ROUTED_HEADER.pack_into(pdu, 0, length, audsid, rseq)
        key = (audsid, rseq)
        counters = proxy.counters
        counters.requests += 1
        pending = None
        if length > 0:
            if session.inflight >= self.max_inflight:
                counters.refused += 1
                self.totals["overloaded"] += 1
                session.conn.send(protocol.error_reply(audsid, rseq, ErrorCode.OVERLOADED,
                                                       f"{self.max_inflight} requests in flight for this session"))
                return
            now = self.clock()
            pending = Pending(key, proxy, now + self.reply_timeout, now, session)
            self.timeouts.append(pending)
        else:
            counters.oneway += 1
        if not proxy.spool.records:  # nothing queued ahead of it
            instance = proxy.pick(audsid, self._reads)
            if instance is not None:
                self._forward(instance, pdu, key, pending)
                return
        self._enqueue(proxy, pdu, pending)

    def _forward(self, instance: Instance, pdu, key: tuple[int, int], pending: Pending | None) -> None:
        if pending is not None:
            pending.instance = instance
            instance.inflight[key] = pending
        elif instance.acks:
            instance.unacked[key] = pdu
        instance.conn.send(pdu)

    def _enqueue(self, proxy: Proxy, pdu, pending: Pending | None) -> None:
        try:
            proxy.spool.append(pdu)
        except (SpoolFull, OSError) as e:
            proxy.counters.refused += 1
            log.warning("proxy %d: request refused: %s", proxy.config.id, e)
            if pending is not None:
                pending.finish()
                self._error_to_session(pending, ErrorCode.QUEUE_FULL, f"queue full for proxy {proxy.config.id}")
            return
        proxy.counters.queued += 1
        if pending is not None:
            proxy.waiting[pending.key] = pending
        proxy.wake_pump.set()

    # ------------------------------------------------------------ the queue

    def _adopt_spools(self) -> None:
        """Take over what hubs that are gone left queued; sync requests still in time wait
        for their replies again (a session that reconnects to us gets them)."""
        now, wall = self.clock(), time.time()
        adopted = []
        for proxy in self.proxies.values():
            records, possible_duplicates = self.spools.adopt(proxy.spool, proxy.config.id)
            proxy.counters.replayed += len(records)
            proxy.counters.duplicates += possible_duplicates  # at most; the spool cannot tell better
            for queued_at, pdu in records:
                length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
                deadline = now + (queued_at + self.reply_timeout - wall)
                if length > 0 and deadline > now:
                    pending = Pending((audsid, rseq), proxy, deadline, now)
                    proxy.waiting[pending.key] = pending
                    adopted.append(pending)
            if records:
                proxy.wake_pump.set()
        if adopted:
            self.timeouts = collections.deque(sorted([*self.timeouts, *adopted], key=lambda p: p.deadline))

    async def _keep_adopting(self) -> None:
        """A hub that drains during a rollout may leave requests queued when it exits: take them."""
        while True:
            await trio.sleep(ADOPT_INTERVAL)
            self._adopt_spools()

    async def _pump(self, proxy: Proxy) -> None:
        """Forward queued requests, in order, whenever an instance is available."""
        spool = proxy.spool
        while True:
            await proxy.wake_pump.wait()
            proxy.wake_pump = trio.Event()
            while len(spool):
                instance = None
                while len(spool):
                    queued_at, pdu = spool.peek()
                    length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
                    instance = proxy.pick(audsid)
                    if instance is None:
                        break
                    spool.pop()
                    pending = proxy.waiting.pop((audsid, rseq), None) if length > 0 else None
                    if length > 0 and pending is None:
                        proxy.counters.expired += 1  # already answered with a timeout error
                    else:
                        self._forward(instance, pdu, (audsid, rseq), pending)
                    if instance.conn.pending_bytes > PUMP_HIGH_WATER:
                        break
                spool.commit()
                if instance is None:
                    break
                try:
                    await instance.conn.flush()
                except ConnectionClosed:
                    pass

    async def _fsync_spools(self) -> None:
        interval = self.config.hub.spool_fsync_interval
        while True:
            await trio.sleep(interval or SWEEP_INTERVAL)
            for proxy in self.proxies.values():
                if proxy.spool.dirty:
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
                    log.info("worker %s at %s not there yet (%s); retrying", instance.name, instance.address,
                             e.strerror)
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            await self._serve_instance(instance, Connection(sock, f"worker {instance.name}"))

    async def _serve_instance(self, instance: Instance, conn: Connection) -> None:
        instance.conn = conn
        instance.connects += 1
        try:
            await self._handshake(instance, conn)
            instance.state = "up"
            log.info("connected to worker %s at %s", instance.name, instance.address)
            instance.proxy.wake_pump.set()
            framer = protocol.Framer(self.max_pdu, accept_noradle_quit=True)
            reason = await self.reactor.serve(conn, functools.partial(self._on_instance_data, instance, framer))
            if reason is None:
                log.info("worker %s closed its connection", instance.name)
            elif reason != PROTOCOL_ERROR:
                log.warning("worker %s: connection lost: %s", instance.name, reason)
        except ConnectionClosed as e:
            log.warning("worker %s: connection lost: %s", instance.name, e)
        finally:
            conn.close()
            instance.state = "connecting"
            instance.conn = None
            self._requeue(instance, conn.take_unsent())
            self._fail_inflight(instance)

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

    def _on_instance_data(self, instance: Instance, framer: protocol.Framer, data: memoryview) -> None:
        try:
            pdus = framer.feed(data)
        except ProtocolError as e:
            self.totals["worker_protocol_errors"] += 1
            log.warning("worker %s: %s; closing the connection", instance.name, e)
            instance.conn.close(PROTOCOL_ERROR)
            return
        for pdu in pdus:
            self._on_reply(instance, pdu)

    def _on_reply(self, instance: Instance, pdu: bytearray) -> None:
        length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
        if not rseq and protocol.is_quit_notice(length, audsid, rseq):  # sessions count rseq from 1
            self._on_quit_notice(instance, half_close=length != protocol.NORADLE_QUIT_LENGTH)
            return
        counters = instance.proxy.counters
        pending = instance.inflight.pop((audsid, rseq), None)
        if pending is None:
            if instance.unacked.pop((audsid, rseq), None) is not None:
                counters.acked += 1  # the worker is done with a one-way request
            else:
                counters.orphan_replies += 1
            return
        pending.finish()
        latency = self.clock() - pending.started
        counters.latency_sum += latency
        if latency > counters.latency_max:
            counters.latency_max = latency
        if length < 0:
            counters.error_replies += 1
        else:
            counters.replies += 1
        session = self.sessions.get(audsid)
        if session is None:
            self.totals["replies_without_session"] += 1
            return
        session.conn.send(pdu)

    def _on_quit_notice(self, instance: Instance, half_close: bool) -> None:
        """The worker takes no more requests: stop dispatching and keep reading its replies.

        The half-close tells a dcod worker that nothing more is coming. Noradle's own worker
        (its notice has length 6) would close at once on it and lose its replies: leave it be.
        """
        log.info("worker %s is quitting; %d replies outstanding", instance.name, len(instance.inflight))
        instance.state = "quitting"
        if half_close:
            self._nursery.start_soon(self._half_close, instance.conn)

    async def _half_close(self, conn: Connection) -> None:
        try:
            await conn.flush()
            conn.shutdown_write()
        except (ConnectionClosed, OSError):
            pass

    def _requeue(self, instance: Instance, unsent: list) -> None:
        """Requests a worker that went away never got, or never finished: back to the queue,
        in the order they were sent.

        ``unsent`` is what never left us (the kernel took nothing of it): sync and one-way
        requests alike go again. Of what the kernel took, one-way requests not acknowledged go
        again too (the instance may have handled some of them: counted as possible duplicates);
        sync ones are answered by _fail_inflight (the worker may have acted on them: only the
        session can tell whether to ask again).
        """
        proxy = instance.proxy
        unsent = [pdu for pdu in unsent if pdu is not protocol.HUB_HANDSHAKE and pdu is not protocol.ACK_ONEWAY]
        headers = [ROUTED_HEADER.unpack_from(pdu) for pdu in unsent]
        unacked, instance.unacked = instance.unacked, {}
        for _, audsid, rseq in headers:
            unacked.pop((audsid, rseq), None)
        for pdu in unacked.values():  # all sent before anything in unsent
            self._enqueue(proxy, pdu, None)
        for pdu, (length, audsid, rseq) in zip(unsent, headers):
            pending = instance.inflight.pop((audsid, rseq), None) if length > 0 else None
            if pending is not None:
                pending.instance = None
            self._enqueue(proxy, pdu, pending)
        proxy.counters.requeued += len(unacked) + len(unsent)
        proxy.counters.duplicates += len(unacked)  # at most
        if unacked or unsent:
            log.info("worker %s went away: %d one-way requests it did not finish and %d requests it never got "
                     "are queued again", instance.name, len(unacked), len(unsent))

    def _fail_inflight(self, instance: Instance) -> None:
        """The instance is gone: its sync requests will never be answered; say so."""
        lost, instance.inflight = instance.inflight, {}
        if lost:
            log.warning("worker %s went away with %d sync requests in flight; answering them with errors",
                        instance.name, len(lost))
        for pending in lost.values():
            pending.finish()
            instance.proxy.counters.worker_lost += 1
            self._error_to_session(pending, ErrorCode.WORKER_LOST,
                                   f"worker {instance.name} of proxy {instance.proxy.config.id} went away before replying")

    def _error_to_session(self, pending: Pending, code: ErrorCode, detail: str) -> None:
        audsid, rseq = pending.key
        pending.proxy.counters.errors += 1
        session = self.sessions.get(audsid)
        if session is not None:
            session.conn.send(protocol.error_reply(audsid, rseq, code, detail))

    # ------------------------------------------------------------ timeouts

    async def _sweep(self) -> None:
        """Answer sync requests past their deadline; close sessions stalled mid-PDU."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = self.clock()
            self.expire(now)
            self._close_stalled(now)

    def expire(self, now: float) -> None:
        """Answer with an error the sync requests whose deadline has passed, and let go of the
        answered ones ahead of them."""
        timeouts = self.timeouts
        while timeouts and (timeouts[0].done or timeouts[0].deadline <= now):
            pending = timeouts.popleft()
            if pending.done:
                continue
            pending.finish()
            proxy = pending.proxy
            if pending.instance is not None:
                pending.instance.inflight.pop(pending.key, None)
            else:
                proxy.waiting.pop(pending.key, None)
            proxy.counters.timeouts += 1
            self._error_to_session(pending, ErrorCode.REPLY_TIMEOUT,
                                   f"no reply from proxy {proxy.config.id} within {self.reply_timeout:g}s")

    def _close_stalled(self, now: float) -> None:
        stall_timeout = self.config.hub.stall_timeout
        stalled = [s for s, since in self._incomplete.items() if now - since >= stall_timeout]
        for session in stalled:
            self.totals["stalled"] += 1
            self._warn("stalled", "session %s: stalled for %gs before a whole PDU (%d bytes); closing it",
                       session.peer, stall_timeout, session.framer.buffered)
            session.conn.close()

    # ------------------------------------------------------------ status

    def stats(self) -> dict:
        proxies = {}
        for p in self.proxies.values():
            c = p.counters.as_dict()
            c.update(queued_now=len(p.spool), spooled_bytes=p.spool.size, waiting=len(p.waiting),
                     inflight=sum(len(i.inflight) for i in p.instances), unacked=sum(len(i.unacked) for i in p.instances),
                     instances=[{"index": i.index, "address": i.address, "state": i.state, "held": i.held,
                                 "inflight": len(i.inflight), "unacked": len(i.unacked), "connects": i.connects}
                                for i in p.instances])
            proxies[p.config.id] = c
        return {"connections": self.connections, "sessions": len(self.sessions), "draining": self.draining,
                "inflight": self.inflight, "totals": dict(self.totals), "proxies": proxies}


def _peer_name(family: int, addr) -> str:
    if family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    if family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    return "unix"


# ---------------------------------------------------------------- the hub process


async def drain(hub: Hub, *, timeout: float, grace: float = 1.0,
                on_closed: Callable[[], None] | None = None) -> None:
    """Stop taking sessions and wait until every sync request is answered and sessions have gone.

    Sessions read their replies and reconnect elsewhere once the quit alert is raised; one
    that stays connected without anything in flight is closed after ``grace`` seconds of
    quiet. Past ``timeout`` what is still in flight is answered with error replies.
    """
    hub.close_listeners()
    if on_closed is not None:
        on_closed()
    with trio.move_on_after(timeout):
        quiet_since: dict[int, float] = {}
        while hub.inflight or hub.sessions:
            now = hub.clock()
            busy = {key[0] for p in hub.proxies.values() for i in p.instances for key in i.inflight}
            for audsid, session in list(hub.sessions.items()):
                if audsid in busy:
                    quiet_since.pop(audsid, None)
                elif now - quiet_since.setdefault(audsid, now) >= grace:
                    session.conn.close()
            await trio.sleep(SWEEP_INTERVAL)
        return
    left = [p for proxy in hub.proxies.values() for i in proxy.instances for p in i.inflight.values()]
    log.warning("drain timed out after %gs; answering %d requests still in flight with errors", timeout, len(left))
    for pending in left:
        pending.finish()
        pending.instance.inflight.pop(pending.key, None)
        hub._error_to_session(pending, ErrorCode.DRAINING, "hub stopped before the reply came")
    for session in list(hub.sessions.values()):
        await session.conn.flush()


async def serve(config: Config, listeners: list[socket.socket]) -> None:
    """Run a hub until SIGTERM/SIGINT (or its supervisor goes away), then drain it and return."""
    hub = Hub(config)
    channel = control.child_channel()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run, listeners)
            log.info("hub serving proxies %s on %s", ", ".join(map(str, hub.proxies)) or "(none)",
                     ", ".join(_listener_name(s) for s in listeners))
            stop = trio.Event()
            on_closed = None
            if channel is not None:
                nursery.start_soon(channel.writer)
                nursery.start_soon(control.heartbeat, channel, functools.partial(_report, hub),
                                   config.supervisor.heartbeat_interval)
                nursery.start_soon(_ready_when_connected, hub, channel)
                nursery.start_soon(control.obey, channel, functools.partial(_stop, stop),
                                   functools.partial(_on_command, hub, channel, nursery))
                on_closed = functools.partial(channel.send, control.event(control.Event.DRAINING))
            nursery.start_soon(_stop_on_signal, signals, stop)
            await stop.wait()
            await drain(hub, timeout=config.supervisor.drain_timeout, on_closed=on_closed)
            if channel is not None:
                with contextlib.suppress(ConnectionClosed):  # the supervisor may be gone already
                    await channel.conn.flush()
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
    while not hub.workers_connected():
        await trio.sleep(RECONNECT_MIN)
    # What it has now first: once the hub is ready, `dcod status` shows its instances connected.
    control.send_heartbeat(channel, functools.partial(_report, hub))
    channel.send(control.event(control.Event.READY))


def _report(hub: Hub) -> tuple[control.StatusCounts, dict]:
    """The hub's heartbeat: its row in `dcod status`, and its stats() (the detail per proxy)."""
    stats = hub.stats()
    proxies = stats["proxies"].values()
    counts = control.StatusCounts(done=sum(p["replies"] + p["oneway"] for p in proxies), inflight=stats["inflight"],
                                  queued=sum(p["queued_now"] for p in proxies),
                                  spooled=sum(p["spooled_bytes"] for p in proxies),
                                  errors=sum(p["errors"] + p["error_replies"] for p in proxies))
    return counts, stats


def _on_command(hub: Hub, channel: control.Channel, nursery: trio.Nursery, message: dict) -> None:
    """Commands besides drain: hold/release an instance (answered once it is idle / connected again)."""
    if control.command_of(message) in (control.Command.HOLD, control.Command.RELEASE):
        nursery.start_soon(_hold, hub, channel, message)


async def _hold(hub: Hub, channel: control.Channel, message: dict) -> None:
    try:
        instance = hub.proxies[message["proxy"]].instances[message["instance"]]
    except (KeyError, IndexError, TypeError):
        channel.send(control.done(message.get("id"), f"no instance {message.get('proxy')}#{message.get('instance')}"))
        return
    held = control.command_of(message) == control.Command.HOLD
    if held:
        hub.hold(instance.proxy.config.id, instance.index)
    # Held: wait until its replies and acks are in. Released: until we are connected to it again,
    # and only then not held, so that `dcod status` never sees it down unless it is.
    while (instance.inflight or instance.unacked if held else instance.state != "up"):
        await trio.sleep(SWEEP_INTERVAL)
    if not held:
        hub.hold(instance.proxy.config.id, instance.index, False)
    channel.send(control.done(message.get("id")))


def main(config: Config, listen: str | None = None) -> int:
    """`dcod hub`: the listener from systemd-style LISTEN_FDS, else --listen, else hub.listen."""
    passed = sockets.listen_fds()
    listeners = list(passed.values()) or [sockets.bind(listen or config.hub.listen)]
    trio.run(serve, config, listeners)
    return 0


def _listener_name(sock: socket.socket) -> str:
    name = sock.getsockname()
    return _peer_name(sock.family, name) if sock.family != socket.AF_UNIX else str(name)
