"""The hub's routing, sans I/O: sessions, proxies, instances, pending requests, counters.

Each Oracle session sends requests tagged with a proxy id; the router rewrites the proxy id
into the session's audsid and the session's rseq into a number of the hub's own (see
dcod.protocol: audsids need not be unique), and forwards the PDU to an instance of that proxy
(the least busy one, or the session's own one for an ``ordered`` proxy). Every sync request is
tracked, with the session that sent it and its rseq, until its reply, error reply or timeout: a
reply goes to that session's connection only, its rseq restored. Error replies go only to
sessions that announced ``CAP_ERROR_REPLIES``; for the others they are withheld and counted.
A request that cannot be forwarded at once is queued in the proxy's queue (the spool, durable)
and forwarded in order when an instance is there. What the hub holds in memory for a proxy, the
one-way requests it forwarded and that were not acknowledged yet and the queued ones its queue
keeps in memory, is bounded by the proxy's ``memory_limit``: past it, one-way requests wait in
the queue (on disk), and whatever is queued behind them, and go once memory frees. (A sync
request is let go once written; ``max_inflight`` per session and the reply timeout bound those.)

Poison requests: a one-way request that an instance took and did not acknowledge before its
connection ended goes back to the queue with one more *attempt* (the count travels in its spool
record). Its last delivery before ``poison_after`` is made alone (a *suspect*: its instance gets
nothing else until it acknowledges it), so that a request is set aside only for a death it met
alone, never for one that another request caused. At ``poison_after`` attempts it is set aside
as poison (``set_aside``, the proxy's dead-letter store in the hub) and never delivered again
unless the operator retries it. The deliveries before the last go as any (after a worker's
death, its many unacknowledged requests go again at full speed).

The hub never sends a sync request twice, but sessions do: Noradle's PL/SQL and retry loops ask
again after DCO-0003. So a sync request is known by its *fingerprint* (a hash of its body, per
proxy): each death of an instance with it in flight counts one for the fingerprint, a reply from
a worker forgets it. With ``poison_after - 1`` deaths, the next such request goes alone (a
suspect, as above); if its instance dies too, it is set aside and answered with DCO-0008, and
every later request with that fingerprint is answered DCO-0008 at once, never forwarded, for as
long as this hub remembers it (until its dead letter is dropped: forget_poison; both memories
are bounded: FINGERPRINTS).

The router does no I/O and never waits, in the manner of h11: the hub's shell
(dcod.hub.server) reads the sockets, frames PDUs and calls the steps here (register,
request, reply, dispatch, requeue, expire, hold...), passing the time where it matters
(``now``, or the ``clock`` given at construction). What the router sends it hands to
outboxes: a session's or an instance's ``conn``, any object with ``send(bytes)`` (in the hub,
a dcod.net.connection.Connection, whose send() only queues). The queue of a proxy is any
object with append/peek/pop/commit and a count of records (Queue; dcod.hub.spool.Spool in
the hub, which the router's caller opens, syncs and closes).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from dcod import protocol
from dcod.config import ProxyConfig
from dcod.hub.spool import SpoolFull
from dcod.log import Throttle
from dcod.protocol import CAP_ERROR_REPLIES, HUB_RSEQ_MAX, ROUTED_HEADER, RSEQ, RSEQ_OFFSET, ErrorCode

log = logging.getLogger("dcod.hub.routing")

Key = tuple[int, int]  # (audsid, the hub's rseq): a request, as the worker's reply names it
FINGERPRINTS = 1024  # sync requests' fingerprints a proxy remembers, of each kind (deaths, poison): the oldest go


class Outbox(Protocol):
    """Where the router puts bytes for a peer; send() must not block."""

    def send(self, data: bytes | bytearray | memoryview) -> None: ...


class Queue(Protocol):
    """A proxy's FIFO of request PDUs waiting for an instance (dcod.hub.spool.Spool)."""

    records: int  # how many are queued: an attribute, as len() would cost a Python call per request
    durable: bool  # False while what is queued is held in memory only (the disk refuses it)
    # Bytes of records it may keep in memory; the router sets it to what its proxy's memory_limit
    # leaves once the unacknowledged one-way requests are counted. Past it, records are on disk
    # only, or, not durable, refused (SpoolFull).
    memory_limit: int

    def append(self, pdu: bytes | bytearray, queued_at: float | None = None, attempts: int = 0) -> None:
        """Queue a PDU (``attempts``: its deliveries so far that its instance did not survive);
        raises SpoolFull if it cannot."""

    def peek(self) -> tuple[float, bytes, int] | None:
        """The oldest (queued_at, pdu, attempts), left in the queue; None if there is none (or what
        was left turned out damaged)."""

    def pop(self) -> None:
        """Drop the oldest, about to be forwarded."""

    def commit(self) -> None:
        """The popped ones are forwarded (a batch ends)."""


class Pending:
    """A sync request waiting for its reply."""

    __slots__ = ("key", "proxy", "session", "rseq", "instance", "deadline", "started", "done", "fingerprint", "pdu")

    def __init__(
        self,
        key: Key,
        proxy: Proxy,
        deadline: float,
        started: float,
        session: Session | None = None,
        rseq: int = 0,
        fingerprint: int | None = None,
    ) -> None:
        self.key = key
        self.proxy = proxy
        self.session = session  # None for a request replayed from a spool: its reply goes nowhere
        self.rseq = rseq  # the session's own number for it, put back in the reply
        self.instance: Instance | None = None  # None while queued
        self.deadline = deadline
        self.started = started
        self.done = False  # answered: see Router._finish
        self.fingerprint = fingerprint  # of its body (None if replayed from a spool): see Router
        self.pdu: bytes | None = None  # kept only while sent alone as a suspect: set aside if its instance dies


@dataclasses.dataclass(slots=True)
class Counters:
    """What `dcod status` shows for a proxy (and, summed, for the hub)."""

    requests: int = 0
    oneway: int = 0
    acked: int = 0
    replies: int = 0
    errors: int = 0
    error_replies: int = 0
    timeouts: int = 0
    worker_lost: int = 0
    refused: int = 0
    queued: int = 0
    not_durable: int = 0  # queued while the spool could not write: held in memory only
    requeued: int = 0
    poisoned: int = 0  # requests set aside as poison (dead letters) by this hub
    poison_refused: int = 0  # sync requests answered DCO-0008 at once: the same body was set aside as poison
    replayed: int = 0
    expired: int = 0
    duplicates: int = 0
    orphan_replies: int = 0
    withheld: int = 0  # error replies not sent: the session does not take them (CAP_ERROR_REPLIES)
    drained: int = 0  # sync requests answered with DCO-0005 as the hub stopped (drain timeout, proxy removed)
    latency_sum: float = 0
    latency_max: float = 0

    def as_dict(self) -> dict[str, float]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


class Instance:
    """One worker instance of a proxy, as the hub sees it: a connection that comes and goes."""

    __slots__ = (
        "proxy",
        "index",
        "address",
        "conn",
        "_state",
        "_held",
        "_suspect",
        "inflight",
        "unacked",
        "acks",
        "connects",
    )

    def __init__(self, proxy: Proxy, index: int, address: str) -> None:
        self.proxy = proxy
        self.index = index
        self.address = address
        self.conn: Outbox | None = None  # while connected
        self._state = "connecting"  # connecting | up | quitting
        self._held = False  # the supervisor asked us not to dispatch here (it is being restarted)
        self._suspect: Key | None = None  # a request on its last attempt sent here: nothing else until acknowledged
        self.inflight: dict[Key, Pending] = {}
        # One-way requests sent and not yet acknowledged, in the order sent (only from a worker
        # running dcod's runtime, which acknowledges them: protocol.ACK_ONEWAY).
        self.unacked: dict[Key, bytes | bytearray] = {}
        self.acks = proxy.config.handler != ""
        self.connects = 0  # counted by the shell, for `dcod status`

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
    def suspect(self) -> Key | None:
        return self._suspect

    @suspect.setter
    def suspect(self, key: Key | None) -> None:
        self._suspect = key
        self.proxy.update_available()

    @property
    def available(self) -> bool:
        return self._state == "up" and not self._held and self._suspect is None


class Proxy:
    """A proxy id: its instances, its queue, its counters."""

    def __init__(
        self, config: ProxyConfig, addresses: list[str], spool: Queue, *, memory_limit: int = sys.maxsize
    ) -> None:
        self.config = config
        self.available: list[Instance] = []  # the instances to dispatch to; kept by update_available()
        self.instances = [Instance(self, i, a) for i, a in enumerate(addresses)]
        self.spool = spool
        # Bytes of requests the hub may hold in memory for this proxy (hub.queue_memory): one-way
        # ones forwarded and not acknowledged (``unacked_bytes``), and those its queue keeps in memory.
        self.memory_limit = memory_limit
        self.unacked_bytes = 0  # bytes of the one-way requests its instances have not acknowledged
        self.memory_waiting = False  # dispatch stopped at memory_limit: wake the pump once memory frees
        self.waiting: dict[Key, Pending] = {}  # queued sync requests
        self.attempts: dict[Key, int] = {}  # of the requests sent again and not acknowledged: see Router
        # Sync requests by fingerprint (see Router): deaths of instances they were in flight on, and
        # those set aside as poison (with their deaths); FINGERPRINTS of each at most.
        self.deaths: dict[int, int] = {}
        self.poison: dict[int, int] = {}
        self.idle_wanted = False  # such a request on its last delivery waits for an instance with nothing in flight
        self.counters = Counters()
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

    def memory_for_queue(self) -> None:
        """Let the queue keep in memory only what the unacknowledged requests leave of memory_limit."""
        self.spool.memory_limit = max(0, self.memory_limit - self.unacked_bytes)


class Session:
    """An Oracle session's connection, as the router sees it: where its replies go, what it
    understands, and its sync requests not answered yet. Another connection may present the
    same audsid: replies follow the connection, never the audsid."""

    __slots__ = ("conn", "peer", "audsid", "sid", "serial", "capabilities", "registered", "closed", "inflight")

    def __init__(self, conn: Outbox, peer: str) -> None:
        self.conn = conn
        self.peer = peer
        self.audsid = self.sid = self.serial = 0  # audsid 0 is a real one (SYS): see registered
        self.capabilities = 0  # dcod.protocol.capabilities(): 0 for Noradle's PL/SQL
        self.registered = False
        self.closed = False  # its connection is gone: replies for it are dropped
        self.inflight = 0  # its sync requests not answered yet, queued ones included


class Router:
    """The hub's routing state and its synchronous steps; no I/O (see the module's docstring).

    ``wake_pump(proxy)`` is called when a proxy's queue may be forwarded (a request was queued,
    an instance came up or was released, records were adopted): the caller then calls
    ``dispatch(proxy, ...)`` until the queue is empty or dispatch returns None.
    ``warnings`` (dcod.log.Throttle) logs what a flood could repeat.
    ``first_rseq`` is the first request number to give (random if None).
    ``set_aside(proxy, pdu, attempts)`` keeps a poison request (see the module's docstring) in the
    proxy's dead-letter store, after ``poison_after`` attempts (at least 2: the last one alone).
    """

    def __init__(
        self,
        proxies: Iterable[Proxy],
        *,
        reply_timeout: float,
        max_inflight: int,
        clock: Callable[[], float] = time.monotonic,
        wake_pump: Callable[[Proxy], None] = lambda proxy: None,
        warnings: Throttle | None = None,
        first_rseq: int | None = None,
        poison_after: int = 3,
        set_aside: Callable[[Proxy, bytes | bytearray, int], None] = lambda proxy, pdu, attempts: None,
    ) -> None:
        self.proxies = {p.config.id: p for p in proxies}
        self.warnings = warnings or Throttle(log)
        self.reply_timeout = reply_timeout
        self.max_inflight = max_inflight
        self.clock = clock
        self.sessions: set[Session] = set()  # registered and connected (for drain and status, not routing)
        self.timeouts: collections.deque[Pending] = collections.deque()  # in deadline order
        self.totals: collections.Counter[str] = collections.Counter()  # sessions, unknown_proxy, overloaded...
        self._wake_pump = wake_pump
        self.poison_after = poison_after
        self._set_aside = set_aside
        self._reads = 0  # reads from sessions that brought requests: Proxy.pick() keeps each one's together
        # The hub's request numbers: the next to give, and the first number from there on that may be
        # in use (past it, _free_rseq looks); random, so that a restarted hub does not repeat them.
        self._next_rseq = random.randint(1, HUB_RSEQ_MAX) if first_rseq is None else first_rseq
        self._rseq_limit = HUB_RSEQ_MAX + 1
        self._adopted: set[int] = set()  # numbers of records taken over from other hubs' spools, still queued

    @property
    def inflight(self) -> int:
        """Sync requests not answered, queued ones included, and one-way requests not acknowledged."""
        return sum(
            len(p.waiting) + sum(len(i.inflight) + len(i.unacked) for i in p.instances) for p in self.proxies.values()
        )

    def workers_connected(self) -> bool:
        """Every proxy has at least one instance up: what `ready` waits for."""
        return all(any(i.state == "up" for i in p.instances) for p in self.proxies.values())

    # ------------------------------------------------------------ sessions

    def register(self, session: Session, handshake: bytes) -> None:
        """A session's 16-byte handshake is in (its magic checked by the framer): its audsid, and
        the capabilities its sid field announces."""
        _, session.sid, session.serial, session.audsid = protocol.ORACLE_HANDSHAKE.unpack(handshake)
        session.capabilities = protocol.capabilities(session.sid)
        session.registered = True
        self.totals["sessions"] += 1
        self.sessions.add(session)

    def unregister(self, session: Session) -> None:
        """The session's connection is gone: the replies to its requests are dropped."""
        session.closed = True
        self.sessions.discard(session)

    def requests(self, session: Session, pdus: list[bytearray]) -> None:
        """The request PDUs of one read from a session (they go to one instance where they can)."""
        self._reads += 1
        read = self._reads
        for pdu in pdus:
            self.request(session, pdu, read)

    def request(self, session: Session, pdu: bytearray, read: int = 0) -> None:
        """A request PDU from a session: its header rewritten in place (the audsid for the proxy id,
        the hub's number for the rseq), then forwarded or queued."""
        length, proxy_id, rseq = protocol.REQUEST_HEADER.unpack_from(pdu)
        audsid = session.audsid
        proxy = self.proxies.get(proxy_id)
        if proxy is None:
            self.totals["unknown_proxy"] += 1
            if length > 0:
                self._send_error(session, None, rseq, ErrorCode.UNKNOWN_PROXY, f"unknown proxy {proxy_id}")
            else:
                self.warnings.warn(
                    "unknown proxy", "one-way request for unknown proxy %d from audsid %d dropped", proxy_id, audsid
                )
            return
        number = self._next_rseq
        if number >= self._rseq_limit:
            number = self._free_rseq()
        self._next_rseq = number + 1
        ROUTED_HEADER.pack_into(pdu, 0, length, audsid, number)
        key = (audsid, number)
        counters = proxy.counters
        counters.requests += 1
        pending = None
        if length > 0:
            if session.inflight >= self.max_inflight:
                counters.refused += 1
                self.totals["overloaded"] += 1
                self._send_error(
                    session,
                    counters,
                    rseq,
                    ErrorCode.OVERLOADED,
                    f"{self.max_inflight} requests in flight for this session",
                )
                return
            fingerprint = body_fingerprint(pdu)
            if proxy.poison and fingerprint in proxy.poison:
                proxy.counters.poison_refused += 1
                self.warnings.warn(
                    f"poison refused {proxy.config.id}",
                    "proxy %d: request %d of audsid %d refused: the same request was set aside as poison",
                    proxy.config.id,
                    rseq,
                    audsid,
                )
                self._send_error(session, counters, rseq, ErrorCode.POISON, self._poison_text(proxy, fingerprint))
                return
            now = self.clock()
            pending = Pending(key, proxy, now + self.reply_timeout, now, session, rseq, fingerprint)
            session.inflight += 1
            self.timeouts.append(pending)
        else:
            counters.oneway += 1
        # Nothing queued ahead of it, and (one-way) memory for it: else it waits in the queue, on disk.
        if not proxy.spool.records and (length > 0 or proxy.unacked_bytes + len(pdu) <= proxy.memory_limit):
            instance = self._pick(proxy, audsid, pending, read)
            if instance is not None:
                self.forward(instance, pdu, key, pending)
                return
        self.enqueue(proxy, pdu, pending)

    def _free_rseq(self) -> int:
        """The next request number that no request the router knows of has, counting on from
        ``_next_rseq`` (after HUB_RSEQ_MAX comes 1); ``_rseq_limit`` becomes the next one in use.

        Called when the count reaches the limit: once per wrap around (2**31 requests), and at
        numbers taken over from other hubs' spools. A one-way request of ours still queued when
        the count comes round again is not looked for: it would take a collision of its audsid
        too to confuse its acknowledgement with another's."""
        in_use = set(self._adopted)
        for proxy in self.proxies.values():
            in_use.update(key[1] for key in proxy.waiting)
            for instance in proxy.instances:
                in_use.update(key[1] for key in instance.inflight)
                in_use.update(key[1] for key in instance.unacked)
        used = sorted(in_use)
        number = self._next_rseq if self._next_rseq <= HUB_RSEQ_MAX else 1
        i = bisect.bisect_left(used, number)
        while i < len(used) and used[i] == number:  # in use: try the next
            number += 1
            i += 1
            if number > HUB_RSEQ_MAX:
                number, i = 1, 0
        self._rseq_limit = used[i] if i < len(used) else HUB_RSEQ_MAX + 1
        return number

    def forward(self, instance: Instance, pdu: bytes | bytearray, key: Key, pending: Pending | None) -> None:
        """Send a request to an instance that is up, and track it there: a one-way one, and its bytes,
        until acknowledged (the hub holds the PDU until then); a sync one until answered (its PDU is
        let go once written)."""
        if pending is not None:
            pending.instance = instance
            instance.inflight[key] = pending
            if instance.proxy.deaths and self._on_last_delivery(pending):
                instance.suspect = key  # nothing else goes to its instance until it is answered
                pending.pdu = bytes(pdu)
        elif instance.acks:
            instance.unacked[key] = pdu
            instance.proxy.unacked_bytes += len(pdu)
        instance.conn.send(pdu)  # type: ignore[union-attr]  # an instance that is up has one

    def _on_last_delivery(self, pending: Pending) -> bool:
        """A sync request with poison_after - 1 deaths: it goes alone (see the module's docstring)."""
        deaths = pending.proxy.deaths
        return pending.fingerprint in deaths and deaths[pending.fingerprint] >= self.poison_after - 1  # type: ignore[index]

    def _pick(self, proxy: Proxy, audsid: int, pending: Pending | None, read: int = 0) -> Instance | None:
        """The instance for a request: Proxy.pick(), or, for a sync request on its last delivery, an
        instance with nothing in flight, so that no other request's death is blamed on it; if none is
        idle, it waits in the queue (and what comes after it) until one is (``idle_wanted``)."""
        if pending is None or not proxy.deaths or not self._on_last_delivery(pending):
            return proxy.pick(audsid, read)
        instance = next((i for i in proxy.available if not i.inflight and not i.unacked), None)
        proxy.idle_wanted = instance is None
        return instance

    def _maybe_idle(self, instance: Instance) -> None:
        """A request of the instance's is done: if it is idle now, the request waiting for one may go."""
        if not instance.inflight and not instance.unacked:
            instance.proxy.idle_wanted = False
            self._wake_pump(instance.proxy)

    def enqueue(self, proxy: Proxy, pdu: bytes | bytearray, pending: Pending | None, attempts: int = 0) -> None:
        """Queue a request for the proxy's next available instance; refuse it if the queue is full."""
        spool = proxy.spool
        proxy.memory_for_queue()
        try:
            spool.append(pdu, attempts=attempts)
        except SpoolFull as e:
            proxy.counters.refused += 1
            self.warnings.warn(f"refused {proxy.config.id}", "proxy %d: request refused: %s", proxy.config.id, e)
            if pending is not None:
                self._answer_error(pending, ErrorCode.QUEUE_FULL, f"queue full for proxy {proxy.config.id}")
            return
        proxy.counters.queued += 1
        if not spool.durable:
            proxy.counters.not_durable += 1  # held in memory only: a hub crash would lose it
        if pending is not None:
            proxy.waiting[pending.key] = pending
        self._wake_pump(proxy)

    def dispatch(self, proxy: Proxy, budget: int) -> Instance | None:
        """Forward queued requests, in order, while an instance is available, until the queue is
        empty or more than ``budget`` bytes went out. Returns the instance forwarded to last (the
        caller lets its connection drain before it calls again), or None if none is available or
        the proxy's memory_limit is reached (wake_pump says when memory frees)."""
        spool = proxy.spool
        instance = None
        sent = 0
        while spool.records:
            proxy.memory_for_queue()  # what it reads back from disk, it keeps in memory
            record = spool.peek()
            if record is None:  # what was left turned out damaged when read back (counted by the spool)
                break
            _, pdu, attempts = record
            length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
            if length < 0 and proxy.unacked_bytes and proxy.unacked_bytes + len(pdu) > proxy.memory_limit:
                proxy.memory_waiting = True
                instance = None
                break
            pending = proxy.waiting.get((audsid, rseq)) if length > 0 else None
            instance = self._pick(proxy, audsid, pending)
            if instance is None:
                break
            spool.pop()
            if self._adopted:
                self._adopted.discard(rseq)
            if pending is not None:
                del proxy.waiting[pending.key]
            elif length > 0:
                proxy.counters.expired += 1  # already answered with a timeout error
                continue
            if pending is not None and proxy.poison and pending.fingerprint in proxy.poison:
                proxy.counters.poison_refused += 1  # set aside while it was queued
                self._answer_error(pending, ErrorCode.POISON, self._poison_text(proxy, pending.fingerprint))
                continue
            self.forward(instance, pdu, (audsid, rseq), pending)
            if attempts and pending is None and instance.acks:
                proxy.attempts[audsid, rseq] = attempts
                if attempts >= self.poison_after - 1:  # its last delivery: alone on its instance
                    instance.suspect = (audsid, rseq)
            sent += len(pdu)
            if sent > budget:
                break
        spool.commit()
        return instance

    def adopt(
        self, proxy: Proxy, records: list[tuple[float, bytes, int]], possible_duplicates: int, wall: float
    ) -> None:
        """Records of hubs that are gone, now in ``proxy``'s queue (queued_at is wall time, as is
        ``wall``, the time now; their attempts stay in the queue). They are forwarded with the
        numbers they have (a one-way request sent again keeps its identity at the worker), which
        we then do not give to others. The sync requests still in time are tracked to their
        deadline, but their replies go nowhere: no connection of ours sent them (the audsid is not
        enough to tell whose they are)."""
        proxy.counters.replayed += len(records)
        proxy.counters.duplicates += possible_duplicates  # at most; the spool cannot tell better
        now = self.clock()
        adopted = []
        for queued_at, pdu, _ in records:
            length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
            self._adopted.add(rseq)
            if self._next_rseq <= rseq < self._rseq_limit:
                self._rseq_limit = rseq
            deadline = now + (queued_at + self.reply_timeout - wall)
            if length > 0 and deadline > now:
                pending = Pending((audsid, rseq), proxy, deadline, now)
                proxy.waiting[pending.key] = pending
                adopted.append(pending)
        if records:
            self._wake_pump(proxy)
        if adopted:
            self.timeouts = collections.deque(sorted([*self.timeouts, *adopted], key=lambda p: p.deadline))

    # ------------------------------------------------------------ instances

    def connected(self, instance: Instance, conn: Outbox) -> None:
        """The instance's connection is up (its handshake sent): dispatch to it."""
        instance.conn = conn
        instance.state = "up"
        self._wake_pump(instance.proxy)

    def hold(self, instance: Instance, held: bool = True) -> None:
        """Stop (or resume) dispatching to an instance: it is about to be restarted."""
        instance.held = held
        if not held:
            self._wake_pump(instance.proxy)

    def reply(self, instance: Instance, pdu: bytearray) -> bool:
        """A PDU from a worker instance: a reply, an acknowledgement or a quit notice.

        Returns True for a dcod worker's quit notice: the caller half-closes the connection
        once what was sent to it is written (see _quit)."""
        length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
        if not rseq and protocol.is_quit_notice(length, audsid, rseq):  # the hub numbers requests from 1
            return self._quit(instance, half_close=length != protocol.NORADLE_QUIT_LENGTH)
        counters = instance.proxy.counters
        key = (audsid, rseq)
        pending = instance.inflight.pop(key, None)
        done = instance.unacked.pop(key, None) if pending is None else None
        if instance.proxy.idle_wanted:
            self._maybe_idle(instance)
        if pending is None:
            if done is not None:
                counters.acked += 1  # the worker is done with a one-way request
                self._release(instance.proxy, len(done))
                if instance.proxy.attempts:  # it was sent again, and survived
                    instance.proxy.attempts.pop(key, None)
                    if instance._suspect == key:  # its instance takes others again
                        instance.suspect = None
                        self._wake_pump(instance.proxy)
            else:
                counters.orphan_replies += 1
            return False
        if instance._suspect is not None or instance.proxy.deaths:
            self._survived(instance, pending)
        session = self._finish(pending)
        latency = self.clock() - pending.started
        counters.latency_sum += latency
        if latency > counters.latency_max:
            counters.latency_max = latency
        if length < 0:
            counters.error_replies += 1
            if session is not None and not session.capabilities & CAP_ERROR_REPLIES:
                self._withhold(session, counters, "a worker's error reply", pending.rseq)
                return False
        else:
            counters.replies += 1
        if session is None:
            self.totals["replies_without_session"] += 1
            return False
        RSEQ.pack_into(pdu, RSEQ_OFFSET, pending.rseq)
        session.conn.send(pdu)
        return False

    def _quit(self, instance: Instance, half_close: bool) -> bool:
        """The worker takes no more requests: stop dispatching and keep reading its replies.

        The half-close tells a dcod worker that nothing more is coming. Noradle's own worker
        (its notice has length 6) would close at once on it and lose its replies: leave it be.
        """
        log.info("worker %s is quitting; %d replies outstanding", instance.name, len(instance.inflight))
        instance.state = "quitting"
        return half_close

    def requeue(self, instance: Instance, unsent: list) -> None:
        """The instance's connection is gone. Requests it never got, or never finished, go back to
        the queue in the order they were sent; its sync requests in flight are answered with
        WORKER_LOST errors.

        ``unsent`` is the request PDUs that never left us (the kernel took nothing of them):
        sync and one-way requests alike go again. Of what the kernel took, one-way requests not
        acknowledged go again too (the instance may have handled some of them: counted as
        possible duplicates), each with one more attempt, or set aside as poison at
        ``poison_after``; sync ones are answered with errors (the worker may have acted on
        them: only the session can tell whether to ask again).
        """
        suspect, instance._suspect = instance._suspect, None
        instance.state = "connecting"
        instance.conn = None
        proxy = instance.proxy
        headers = [ROUTED_HEADER.unpack_from(pdu) for pdu in unsent]
        unacked, instance.unacked = instance.unacked, {}
        self._release(proxy, sum(map(len, unacked.values())))
        for _, audsid, rseq in headers:
            unacked.pop((audsid, rseq), None)
        poisoned = 0
        for key, pdu in unacked.items():  # all sent before anything in unsent
            attempts = proxy.attempts.pop(key, 0) + 1
            if attempts >= self.poison_after:
                poisoned += 1
                self._poison(proxy, pdu, attempts)
            else:
                self.enqueue(proxy, pdu, None, attempts)
        for pdu, (length, audsid, rseq) in zip(unsent, headers):
            pending = instance.inflight.pop((audsid, rseq), None) if length > 0 else None
            if pending is not None:
                pending.instance = None
            self.enqueue(proxy, pdu, pending, proxy.attempts.pop((audsid, rseq), 0))  # not delivered: no attempt
        unacked_requeued = len(unacked) - poisoned
        proxy.counters.requeued += unacked_requeued + len(unsent)
        proxy.counters.duplicates += unacked_requeued  # at most
        if unacked_requeued or unsent:
            log.info(
                "worker %s went away: %d one-way requests it did not finish and %d requests it never got "
                "are queued again",
                instance.name,
                unacked_requeued,
                len(unsent),
            )
        if instance.inflight:
            log.warning(
                "worker %s went away with %d sync requests in flight; answering them with errors",
                instance.name,
                len(instance.inflight),
            )
        if instance.inflight:
            self._count_deaths(instance, suspect)
        detail = f"worker {instance.name} of proxy {proxy.config.id} went away before replying"
        proxy.counters.worker_lost += self.fail(instance, ErrorCode.WORKER_LOST, detail)

    def _count_deaths(self, instance: Instance, suspect: Key | None) -> None:
        """The instance died with these sync requests in flight: one death for each fingerprint. The
        suspect (sent alone) that reaches poison_after is set aside as poison and answered DCO-0008;
        the others stay one short of it, so that their next delivery goes alone."""
        proxy = instance.proxy
        counted = set()
        for key, pending in list(instance.inflight.items()):
            fingerprint = pending.fingerprint
            if fingerprint is None or fingerprint in counted:
                continue
            counted.add(fingerprint)
            deaths = proxy.deaths.pop(fingerprint, 0) + 1
            if key == suspect and deaths >= self.poison_after:
                del instance.inflight[key]
                self._poison_sync(pending, deaths)
            else:
                _remember(proxy.deaths, fingerprint, min(deaths, self.poison_after - 1))

    def _survived(self, instance: Instance, pending: Pending) -> None:
        """A worker answered a sync request: its fingerprint is not poison; a suspect's instance takes
        others again."""
        if pending.fingerprint is not None:
            instance.proxy.deaths.pop(pending.fingerprint, None)
        if instance._suspect == pending.key:
            instance.suspect = None
            self._wake_pump(instance.proxy)

    def _poison_sync(self, pending: Pending, deaths: int) -> None:
        """A sync request sent alone whose instance died on it, its ``deaths``-th: into the proxy's
        dead-letter store, answered DCO-0008, and its fingerprint refused from now on."""
        proxy, fingerprint, pdu = pending.proxy, pending.fingerprint, pending.pdu
        assert fingerprint is not None and pdu is not None  # see _count_deaths
        proxy.counters.poisoned += 1
        _remember(proxy.poison, fingerprint, deaths)
        _, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
        self.warnings.warn(
            f"poison {proxy.config.id}",
            "proxy %d: sync request %d of audsid %d (%d bytes) set aside as poison: its worker instance went "
            "away before answering it %d times",
            proxy.config.id,
            rseq,
            audsid,
            len(pdu),
            deaths,
        )
        self._set_aside(proxy, pdu, deaths)
        self._answer_error(pending, ErrorCode.POISON, self._poison_text(proxy, fingerprint))

    def forget_poison(self, proxy: Proxy, kept: set[int]) -> int:
        """The operator dropped dead letters: refuse only the fingerprints still ``kept`` (those of the
        proxy's sync dead letters); returns how many are forgotten."""
        gone = [fingerprint for fingerprint in proxy.poison if fingerprint not in kept]
        for fingerprint in gone:
            del proxy.poison[fingerprint]
        return len(gone)

    def _poison_text(self, proxy: Proxy, fingerprint: int) -> str:
        return (
            f"request set aside as poison in proxy {proxy.config.id}'s dead letters: "
            f"its worker died on it {proxy.poison[fingerprint]} times"
        )

    def _poison(self, proxy: Proxy, pdu: bytes | bytearray, attempts: int) -> None:
        """A one-way request whose instance went away before acknowledging it ``attempts`` times:
        into the proxy's dead-letter store, logged once (a flood of them: a summary per interval)."""
        proxy.counters.poisoned += 1
        length, audsid, rseq = ROUTED_HEADER.unpack_from(pdu)
        self.warnings.warn(
            f"poison {proxy.config.id}",
            "proxy %d: one-way request %d of audsid %d (%d bytes) set aside as poison: its worker instance "
            "went away before finishing it %d times",
            proxy.config.id,
            rseq,
            audsid,
            -length,
            attempts,
        )
        self._set_aside(proxy, pdu, attempts)

    def fail(self, instance: Instance, code: ErrorCode, detail: str) -> int:
        """Answer the instance's sync requests in flight with errors; returns how many."""
        lost, instance.inflight = instance.inflight, {}
        for pending in lost.values():
            self._answer_error(pending, code, detail)
        return len(lost)

    def fail_queued(self, proxy: Proxy, code: ErrorCode, detail: str) -> int:
        """Answer the proxy's queued sync requests with errors; returns how many. Their records stay
        in the queue: forwarded later, they are skipped as answered (counted ``expired``)."""
        waiting, proxy.waiting = proxy.waiting, {}
        for pending in waiting.values():
            self._answer_error(pending, code, detail)
        return len(waiting)

    # ------------------------------------------------------------ timeouts

    def expire(self, now: float) -> None:
        """Answer with an error the sync requests whose deadline has passed, and let go of the
        answered ones ahead of them."""
        timeouts = self.timeouts
        while timeouts and (timeouts[0].done or timeouts[0].deadline <= now):
            pending = timeouts.popleft()
            if pending.done:
                continue
            proxy = pending.proxy
            if pending.instance is not None:
                pending.instance.inflight.pop(pending.key, None)
                if proxy.idle_wanted:
                    self._maybe_idle(pending.instance)
                if pending.instance._suspect == pending.key:  # no death, no answer: it blocks nothing more
                    pending.instance.suspect = None
                    self._wake_pump(proxy)
            else:
                proxy.waiting.pop(pending.key, None)
            proxy.counters.timeouts += 1
            self._answer_error(
                pending,
                ErrorCode.REPLY_TIMEOUT,
                f"no reply from proxy {proxy.config.id} within {self.reply_timeout:g}s",
            )

    # ------------------------------------------------------------ where answers go

    def _finish(self, pending: Pending) -> Session | None:
        """A sync request is answered (reply, error reply or timeout): it no longer counts against
        its session. Returns the session the answer goes to: the connection that sent the request,
        None if it is gone (or the request came from a spool). This is where that is decided, for
        replies and error replies alike; whether an error reply may go is decided where it is sent
        (reply() for a worker's, _send_error() for the hub's)."""
        pending.done = True
        session = pending.session
        if session is None:
            return None
        session.inflight -= 1
        pending.session = None
        return None if session.closed else session

    def _release(self, proxy: Proxy, size: int) -> None:
        """Bytes of one-way requests the hub is done with; once half of memory_limit is free, the
        queue that waited for memory may go on (by halves: batches, not a wake-up per reply)."""
        proxy.unacked_bytes -= size
        if proxy.memory_waiting and proxy.unacked_bytes <= proxy.memory_limit // 2:
            proxy.memory_waiting = False
            self._wake_pump(proxy)

    def _answer_error(self, pending: Pending, code: ErrorCode, detail: str) -> None:
        """Answer a sync request with an error reply."""
        session = self._finish(pending)
        counters = pending.proxy.counters
        counters.errors += 1
        if session is not None:
            self._send_error(session, counters, pending.rseq, code, detail)

    def _send_error(self, session: Session, counters: Counters | None, rseq: int, code: ErrorCode, detail: str) -> None:
        """Every error reply the hub makes goes out here, to a session that takes error replies
        (``counters``: its proxy's, None for an unknown proxy)."""
        if session.capabilities & CAP_ERROR_REPLIES:
            session.conn.send(protocol.error_reply(session.audsid, rseq, code, detail))
        else:
            self._withhold(session, counters, code.text(detail), rseq)

    def _withhold(self, session: Session, counters: Counters | None, what: str, rseq: int) -> None:
        """An error reply for a session that cannot parse one (Noradle's PL/SQL reads no body for a
        negative length and would take the text for the next header): nothing goes to it, as from
        Noradle's hub; its own timeout decides."""
        if counters is None:
            self.totals["withheld"] += 1
        else:
            counters.withheld += 1
        self.warnings.warn(
            "withheld",
            "withheld from session %s (audsid %d), request %d: %s (it takes no error replies: its own timeout decides)",
            session.peer,
            session.audsid,
            rseq,
            what,
        )


def body_fingerprint(pdu: bytes | bytearray) -> int:
    """A sync request's fingerprint: Python's hash of its body, SipHash with a key of this process's,
    so that no session can make a body with another's fingerprint (and cheaper than hashlib's: half,
    a quarter for 64 KiB)."""
    return hash(bytes(memoryview(pdu)[12:]))


def _remember(memory: dict[int, int], fingerprint: int, count: int) -> None:
    """Keep ``fingerprint`` (as the newest) in a proxy's memory of them, dropping the oldest past FINGERPRINTS."""
    memory.pop(fingerprint, None)
    memory[fingerprint] = count
    if len(memory) > FINGERPRINTS:
        del memory[next(iter(memory))]
