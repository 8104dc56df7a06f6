"""The hub's Router alone: no sockets, no trio; outboxes are lists, the clock is a number, the queue
a deque (or a real Spool). PDUs are built and read with struct, from the spec, not with dcod's code.

Requests carry their session's rseq as their body (unless a test gives one), so that what a worker
got can be told apart although the hub renumbers requests (dcod.protocol: request numbers)."""

from __future__ import annotations

import collections
import struct
import subprocess
import sys

import pytest

from dcod.config import ProxyConfig
from dcod.hub import routing
from dcod.hub.routing import Proxy, Router, Session
from dcod.hub.spool import Spool, SpoolFull
from dcod.protocol import ErrorCode

ORACLE_MAGIC = 197610262
ORACLE_SID = 17  # an Oracle session's sid field: no capabilities (Noradle's PL/SQL)
CAPABLE_SID = 0xDC0D0001  # the sid field of a session that parses error replies (dcod's client)
RSEQ_MAX = 2**31 - 1
FIRST = 5000  # the first number the hub gives (random in the hub)
REPLY_TIMEOUT = 5.0


# ---------------------------------------------------------------- fakes


class Outbox:
    """A connection as the router sees it: what was sent, as PDUs; a worker's also keeps all it got."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.got: list[tuple[int, int, int, bytes]] = []  # every PDU ever sent, take() or not
        self.got_pdus: list[bytes] = []  # the same, as bytes

    def send(self, data) -> None:
        data = bytes(data)  # the router may hand over a buffer it reuses: copy it now
        self.sent.append(data)
        self.got.append(parse(data))
        self.got_pdus.append(data)

    def take(self) -> list[tuple[int, int, int, bytes]]:
        """(length, audsid, rseq, body) of each PDU sent since the last take()."""
        pdus = [parse(data) for data in self.sent]
        self.sent.clear()
        return pdus

    def rseqs(self) -> list[int]:
        """The rseq of each PDU (a session's outbox: its own numbers)."""
        return [rseq for _, _, rseq, _ in self.take()]

    def tags(self) -> list[int]:
        """The session rseqs that the requests forwarded (a worker's outbox) carry as their bodies."""
        return [int(body) for _, _, _, body in self.take()]

    def number(self, tag: int, audsid: int | None = None) -> tuple[int, int]:
        """(audsid, the hub's rseq) of the last request forwarded here with body ``tag``."""
        return next((a, rseq) for _, a, rseq, body in reversed(self.got) if body == b"%d" % tag and audsid in (None, a))


def parse(data: bytes) -> tuple[int, int, int, bytes]:
    length, audsid, rseq = struct.unpack_from(">iIi", data)
    assert abs(length) == len(data), "one PDU per send()"
    return length, audsid, rseq, data[12:]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class MemoryQueue:
    """The queue interface the router uses, in memory, with a bound on the records it holds."""

    def __init__(self, limit: int = 1000) -> None:
        self.items: collections.deque[tuple[float, bytes, int]] = collections.deque()
        self.records = 0
        self.durable = True
        self.limit = limit
        self.commits = 0

    def append(self, pdu, queued_at: float | None = None, attempts: int = 0) -> None:
        if self.records >= self.limit:
            raise SpoolFull("full")
        self.items.append((0.0, bytes(pdu), attempts))
        self.records += 1

    def peek(self):
        return self.items[0] if self.items else None

    def pop(self) -> None:
        self.items.popleft()
        self.records -= 1

    def commit(self) -> None:
        self.commits += 1


# ---------------------------------------------------------------- helpers


def request(proxy_id: int, rseq: int, body: bytes | None = None, oneway: bool = False) -> bytearray:
    body = b"%d" % rseq if body is None else body
    size = 12 + len(body)
    return bytearray(struct.pack(">iii", -size if oneway else size, proxy_id, rseq) + body)


def reply(audsid: int, rseq: int, body: bytes = b"ok", error: bool = False) -> bytearray:
    size = 12 + len(body)
    return bytearray(struct.pack(">iIi", -size if error else size, audsid, rseq) + body)


def routed(audsid: int, rseq: int, oneway: bool = False) -> bytes:
    """A request as a hub forwards (and queues) it: the proxy id replaced with the audsid, the rseq its own."""
    return struct.pack(">iIi", -13 if oneway else 13, audsid, rseq) + b"x"


def make_proxy(
    proxy_id: int = 1,
    instances: int = 1,
    *,
    ordered: bool = False,
    handler: str = "echo",
    queue=None,
    memory_limit: int = 1 << 30,
) -> Proxy:
    config = ProxyConfig(id=proxy_id, handler=handler, instances=instances, ordered=ordered)
    addresses = [f"worker {proxy_id}#{i}" for i in range(instances)]
    return Proxy(config, addresses, MemoryQueue() if queue is None else queue, memory_limit=memory_limit)


class Hub:
    """A Router with fake outboxes for its instances and sessions, the proxies it woke, what it warned."""

    def __init__(
        self, *proxies: Proxy, max_inflight: int = 100, first_rseq: int | None = FIRST, poison_after: int = 3
    ) -> None:
        self.clock = Clock()
        self.woken: list[int] = []
        self.warned: list[str] = []
        self.dead: list[tuple[int, bytes, int]] = []  # set aside as poison: proxy id, PDU, attempts
        self.workers: dict[tuple[int, int], Outbox] = {}
        self.router = Router(
            proxies or [make_proxy()],
            reply_timeout=REPLY_TIMEOUT,
            max_inflight=max_inflight,
            clock=self.clock,
            wake_pump=lambda proxy: self.woken.append(proxy.config.id),
            warnings=self,
            first_rseq=first_rseq,
            poison_after=poison_after,
            set_aside=lambda proxy, pdu, attempts: self.dead.append((proxy.config.id, bytes(pdu), attempts)),
        )

    def warn(self, kind: str, message: str, *args) -> None:
        """The router's warnings (dcod.log.Throttle in the hub): their kinds, in order."""
        self.warned.append(kind)

    def instance(self, index: int = 0, proxy_id: int = 1):
        return self.router.proxies[proxy_id].instances[index]

    def up(self, index: int = 0, proxy_id: int = 1) -> Outbox:
        """Connect an instance; returns its outbox."""
        outbox = self.workers[proxy_id, index] = Outbox()
        self.router.connected(self.instance(index, proxy_id), outbox)
        return outbox

    def session(self, audsid: int, capable: bool = True) -> tuple[Session, Outbox]:
        """A session's connection; ``capable``: it announces that it parses error replies, as dcod's client does."""
        outbox = Outbox()
        session = Session(outbox, f"session {audsid}")
        self.router.register(
            session, struct.pack(">iIiI", ORACLE_MAGIC, CAPABLE_SID if capable else ORACLE_SID, 2, audsid)
        )
        return session, outbox

    def answer(
        self,
        tag: int,
        body: bytes = b"ok",
        *,
        index: int = 0,
        proxy_id: int = 1,
        audsid: int | None = None,
        error: bool = False,
    ) -> bool:
        """The worker instance replies to the request it got with body ``tag``; returns what reply() did."""
        audsid, rseq = self.workers[proxy_id, index].number(tag, audsid)
        return self.router.reply(self.instance(index, proxy_id), reply(audsid, rseq, body, error))

    def ack(self, tag: int, index: int = 0, proxy_id: int = 1) -> None:
        """A dcod worker is done with the one-way request it got with body ``tag``."""
        audsid, rseq = self.workers[proxy_id, index].number(tag)
        self.router.reply(self.instance(index, proxy_id), reply(audsid, rseq, b""))

    def dispatch(self, proxy_id: int = 1, budget: int = 1 << 30):
        return self.router.dispatch(self.router.proxies[proxy_id], budget)


def error_code(pdu: tuple[int, int, int, bytes]) -> bytes:
    length, _, _, text = pdu
    assert length < 0, "an error reply has a negative length"
    return text[:8]


# ---------------------------------------------------------------- requests and replies


def test_request_is_rewritten_to_the_audsid_and_a_number_of_the_hubs_and_the_reply_restored():
    hub = Hub()
    worker = hub.up()
    session, oracle = hub.session(0xFEDCBA98)  # above 2^31: read unsigned
    hub.router.requests(session, [request(1, 7, b"hello")])
    assert worker.take() == [(17, 0xFEDCBA98, FIRST, b"hello")]
    assert session.inflight == 1
    hub.clock.now += 0.25
    assert hub.router.reply(hub.instance(), reply(0xFEDCBA98, FIRST, b"world")) is False
    assert oracle.take() == [(17, 0xFEDCBA98, 7, b"world")]  # the session's own rseq again
    counters = hub.router.proxies[1].counters
    assert (counters.requests, counters.replies, counters.latency_max, session.inflight) == (1, 1, 0.25, 0)
    assert hub.router.inflight == 0


def test_hub_numbers_count_on_from_a_random_start_and_wrap_past_0():
    hub = Hub(first_rseq=RSEQ_MAX - 1)
    worker = hub.up()
    session, _ = hub.session(3)
    hub.router.requests(session, [request(1, 1), request(1, 1, oneway=True), request(1, 1)])
    assert [rseq for _, _, rseq, _ in worker.take()] == [RSEQ_MAX - 1, RSEQ_MAX, 1]  # never 0, never negative
    firsts = set()
    for _ in range(2):
        hub = Hub(first_rseq=None)
        worker = hub.up()
        hub.router.requests(hub.session(3)[0], [request(1, 1)])
        [(_, _, rseq, _)] = worker.take()
        assert 1 <= rseq <= RSEQ_MAX
        firsts.add(rseq)
    assert len(firsts) == 2  # two hubs start apart (they meet one time in 2^31)


def test_numbers_still_in_use_are_skipped():
    hub = Hub(first_rseq=RSEQ_MAX - 1)
    proxy = hub.router.proxies[1]
    worker = hub.up()
    session, oracle = hub.session(3)

    def adopt(*records: bytes) -> None:
        for pdu in records:
            proxy.spool.append(pdu)  # the shell moves them into our queue
        hub.router.adopt(proxy, [(1000.0, pdu, 0) for pdu in records], 0, 1000.0)

    hub.router.requests(session, [request(1, 1)])  # RSEQ_MAX - 1, in flight
    assert [rseq for _, _, rseq, _ in worker.take()] == [RSEQ_MAX - 1]
    adopt(routed(3, 1), routed(3, 2), routed(3, 4, oneway=True))  # a gone hub's, queued: 1 and 2 sync, 4 one-way
    hub.router.requests(session, [request(1, 2)])  # RSEQ_MAX
    hub.router.requests(session, [request(1, 3), request(1, 4), request(1, 5)])  # then 1 again: 1 and 2 in use
    hub.dispatch()
    assert [rseq for _, _, rseq, _ in worker.take()] == [1, 2, 4, RSEQ_MAX, 3, 5, 6]  # never 0, never negative
    adopt(routed(3, 8, oneway=True))  # ahead of the count: skipped when the count gets there
    hub.router.requests(session, [request(1, 6), request(1, 7)])
    hub.dispatch()
    assert [rseq for _, _, rseq, _ in worker.take()] == [8, 7, 9]
    for tag in (2, 1):
        hub.answer(tag)
    assert oracle.rseqs() == [2, 1]


def test_two_connections_with_the_same_audsid_each_get_their_own_replies():
    # Every SYS session has audsid 0; two databases can collide; a reconnect can overlap the old connection.
    hub = Hub()
    worker = hub.up()
    first, first_out = hub.session(0)
    second, second_out = hub.session(0)
    hub.router.requests(first, [request(1, 1, b"first")])
    hub.router.requests(second, [request(1, 1, b"second")])
    [(_, a1, n1, _), (_, a2, n2, _)] = worker.take()
    assert a1 == a2 == 0 and n1 != n2
    hub.router.reply(hub.instance(), reply(0, n2, b"for second"))
    hub.router.reply(hub.instance(), reply(0, n1, b"for first"))
    assert first_out.take() == [(21, 0, 1, b"for first")]
    assert second_out.take() == [(22, 0, 1, b"for second")]
    assert (first.inflight, second.inflight) == (0, 0)


def test_a_reply_for_a_closed_connection_is_dropped_not_given_to_a_new_one_with_its_audsid():
    hub = Hub()
    worker = hub.up()
    first, first_out = hub.session(5)
    hub.router.requests(first, [request(1, 1), request(1, 2)])
    again, again_out = hub.session(5)  # reconnected while the old connection lingers
    hub.answer(1)
    assert (first_out.rseqs(), again_out.rseqs()) == ([1], [])
    hub.router.unregister(first)
    hub.answer(2)
    assert (first_out.rseqs(), again_out.rseqs()) == ([], [])
    assert hub.router.totals["replies_without_session"] == 1
    assert len(worker.take()) == 2 and hub.router.sessions == {again}


@pytest.mark.parametrize("rseq", [0, -1])
def test_a_sessions_rseq_0_or_minus_1_is_never_a_quit_notice_nor_an_ack_request(rseq):
    hub = Hub(make_proxy(instances=2))
    workers = [hub.up(i) for i in range(2)]
    session, oracle = hub.session(0)  # a SYS session
    hub.router.requests(session, [request(1, rseq, b"")])  # its echo would be "12, 0, 0" unchanged
    [index] = [i for i, w in enumerate(workers) if w.sent]
    [forwarded] = workers[index].sent
    assert forwarded not in (struct.pack(">iIi", 12, 0, 0), struct.pack(">iIi", 12, 0, -1))  # quit notice, ACK_ONEWAY
    _, audsid, number, _ = workers[index].take()[0]
    assert hub.router.reply(hub.instance(index), reply(audsid, number, b"")) is False  # the echo: no quit notice
    assert oracle.take() == [(12, 0, rseq, b"")]
    assert [hub.instance(i).state for i in range(2)] == ["up", "up"]


def test_oneway_requests_are_tracked_until_acknowledged_by_a_dcod_worker():
    hub = Hub(make_proxy(1), make_proxy(2, handler=""))  # proxy 2: a worker not running dcod's runtime
    ours, foreign = hub.up(0, 1), hub.up(0, 2)
    session, oracle = hub.session(3)
    hub.router.requests(session, [request(1, 1, b"x", oneway=True), request(2, 2, b"x", oneway=True)])
    assert [pdu[0] for pdu in ours.take() + foreign.take()] == [-13, -13]
    assert (hub.router.inflight, list(hub.instance(0, 1).unacked)) == (1, [(3, FIRST)])
    hub.router.reply(hub.instance(0, 1), reply(3, FIRST, b""))
    assert (hub.router.inflight, hub.router.proxies[1].counters.acked, oracle.take()) == (0, 1, [])


def test_unknown_proxy_answers_sync_requests_and_drops_oneway_ones():
    hub = Hub()
    hub.up()
    session, oracle = hub.session(9)
    hub.router.requests(session, [request(7, 1), request(7, 2, oneway=True)])
    [answer] = oracle.take()
    assert answer[1:3] == (9, 1) and error_code(answer) == b"DCO-0001"
    assert hub.router.totals["unknown_proxy"] == 2 and session.inflight == 0


def test_orphan_replies_are_counted_and_go_nowhere():
    hub = Hub()
    worker = hub.up()
    session, oracle = hub.session(4)
    hub.router.requests(session, [request(1, 1)])
    hub.router.reply(hub.instance(), reply(4, FIRST + 1))  # never asked
    hub.answer(1)
    hub.answer(1)  # twice
    assert oracle.rseqs() == [1]
    assert hub.router.proxies[1].counters.orphan_replies == 2 and len(worker.take()) == 1


def test_sync_requests_past_max_inflight_per_session_are_refused():
    hub = Hub(max_inflight=2)
    worker = hub.up()
    session, oracle = hub.session(6)
    other, _ = hub.session(7)
    hub.router.requests(session, [request(1, 1), request(1, 2), request(1, 3), request(1, 4, oneway=True)])
    hub.router.requests(other, [request(1, 1)])  # the limit is per session
    [refused] = oracle.take()
    assert refused[2] == 3 and error_code(refused) == b"DCO-0007"
    assert worker.tags() == [1, 2, 4, 1]
    hub.answer(1, audsid=6)
    hub.router.requests(session, [request(1, 5)])  # room again
    assert worker.tags() == [5]
    assert (hub.router.totals["overloaded"], hub.router.proxies[1].counters.refused) == (1, 1)


# ---------------------------------------------------------------- error replies only to sessions that take them


def unknown_proxy(hub: Hub, session: Session) -> None:
    hub.router.requests(session, [request(7, 1)])


def reply_timeout(hub: Hub, session: Session) -> None:
    hub.router.requests(session, [request(1, 1)])
    hub.router.expire(hub.clock.now + REPLY_TIMEOUT)


def worker_lost(hub: Hub, session: Session) -> None:
    hub.router.requests(session, [request(1, 1)])
    hub.router.requeue(hub.instance(), [])


def queue_full(hub: Hub, session: Session) -> None:
    hub.router.hold(hub.instance())
    hub.router.proxies[1].spool.limit = 0
    hub.router.requests(session, [request(1, 1)])


def draining(hub: Hub, session: Session) -> None:
    hub.router.requests(session, [request(1, 1)])
    hub.router.fail(hub.instance(), ErrorCode.DRAINING, "hub stopped")


def handler_failed(hub: Hub, session: Session) -> None:
    hub.router.requests(session, [request(1, 1)])
    hub.answer(1, b"DCO-0006 ValueError: boom", error=True)


def overloaded(hub: Hub, session: Session) -> None:
    hub.router.max_inflight = 0
    hub.router.requests(session, [request(1, 1)])


def poison(hub: Hub, session: Session) -> None:
    hub.router.proxies[1].poison[fingerprint(b"1")] = 3
    hub.router.requests(session, [request(1, 1)])


@pytest.mark.parametrize(
    "code, make_error",
    [
        (b"DCO-0001", unknown_proxy),
        (b"DCO-0002", reply_timeout),
        (b"DCO-0003", worker_lost),
        (b"DCO-0004", queue_full),
        (b"DCO-0005", draining),
        (b"DCO-0006", handler_failed),
        (b"DCO-0007", overloaded),
        (b"DCO-0008", poison),
    ],
)
@pytest.mark.parametrize("capable", [True, False], ids=["capable", "plsql"])
def test_error_replies_go_only_to_sessions_that_announced_they_take_them(code, make_error, capable):
    hub = Hub()
    hub.up()
    session, oracle = hub.session(8, capable=capable)
    make_error(hub, session)
    counters = hub.router.proxies[1].counters
    withheld = hub.router.totals["withheld"] if make_error is unknown_proxy else counters.withheld
    if capable:
        [answer] = oracle.take()
        assert answer[2] == 1 and error_code(answer) == code
        assert (withheld, hub.warned.count("withheld")) == (0, 0)
    else:
        assert oracle.take() == []  # nothing: Noradle's PL/SQL would read the text as the next header
        assert (withheld, hub.warned.count("withheld")) == (1, 1)
    assert session.inflight == 0


def test_withheld_error_replies_are_counted_per_proxy_and_good_replies_still_go():
    hub = Hub(make_proxy(1), make_proxy(2))
    hub.up(0, 1)
    hub.up(0, 2)
    session, oracle = hub.session(8, capable=False)
    hub.router.requests(session, [request(1, 1), request(2, 2), request(2, 3), request(9, 4), request(1, 5)])
    hub.answer(1, error=True, proxy_id=1)
    hub.answer(2, error=True, proxy_id=2)
    hub.answer(3, b"fine", proxy_id=2)
    hub.answer(5, b"fine too", proxy_id=1)
    assert [(rseq, body) for _, _, rseq, body in oracle.take()] == [(3, b"fine"), (5, b"fine too")]
    proxies = hub.router.proxies
    assert (proxies[1].counters.withheld, proxies[2].counters.withheld, hub.router.totals["withheld"]) == (1, 1, 1)
    assert proxies[1].counters.as_dict()["withheld"] == 1  # what `dcod status` shows
    assert (proxies[1].counters.error_replies, proxies[2].counters.error_replies) == (1, 1)


# ---------------------------------------------------------------- pick


def test_least_outstanding_instance_first():
    hub = Hub(make_proxy(instances=3))
    workers = [hub.up(i) for i in range(3)]
    session, _ = hub.session(1)
    hub.router.requests(session, [request(1, 1), request(1, 2)])  # one read: both to one instance
    busy = next(i for i, w in enumerate(workers) if w.take())
    for rseq in range(3, 7):  # each in a read of its own: never to the busy one, 2 each to the others
        hub.router.requests(session, [request(1, rseq)])
    assert [len(w.take()) for w in workers] == [0 if i == busy else 2 for i in range(3)]


def test_ties_go_round_robin_so_oneway_requests_spread():
    hub = Hub(make_proxy(instances=3, handler=""))  # no acknowledgements: one-way requests are never outstanding
    workers = [hub.up(i) for i in range(3)]
    session, _ = hub.session(1)
    for rseq in range(1, 10):
        hub.router.requests(session, [request(1, rseq, oneway=True)])
    got = [w.tags() for w in workers]
    assert sorted(len(g) for g in got) == [3, 3, 3]
    assert all(len({rseq % 3 for rseq in g}) == 1 for g in got)  # in turn: every third to the same one


def test_a_reads_requests_go_to_one_instance():
    hub = Hub(make_proxy(instances=2))
    workers = [hub.up(i) for i in range(2)]
    session, _ = hub.session(1)
    hub.router.requests(session, [request(1, 1)])
    hub.router.requests(session, [request(1, rseq) for rseq in range(2, 6)])  # the other is less busy after one
    assert sorted(w.tags() for w in workers) == [[1], [2, 3, 4, 5]]


def test_ordered_proxy_keeps_each_session_on_one_instance():
    hub = Hub(make_proxy(instances=2, ordered=True))
    workers = [hub.up(i) for i in range(2)]
    sessions = [hub.session(audsid)[0] for audsid in (10, 11)]
    for rseq in range(1, 5):
        for session in sessions:
            hub.router.requests(session, [request(1, rseq)])  # however busy its instance is
    assert [[pdu[1] for pdu in w.take()] for w in workers] == [[10] * 4, [11] * 4]  # audsid % 2


# ---------------------------------------------------------------- the queue


def test_queued_requests_keep_their_order_and_later_ones_do_not_overtake(tmp_path):
    spool = Spool(tmp_path / "proxy-1.spool", memory_limit=1 << 20, size_limit=1 << 30, max_record=1 << 20)
    hub = Hub(make_proxy(queue=spool))
    session, oracle = hub.session(2)
    hub.router.requests(session, [request(1, 1), request(1, 2, oneway=True)])
    hub.router.requests(session, [request(1, 3)])
    assert len(spool) == 3 and hub.woken == [1, 1, 1] and hub.dispatch() is None
    worker = hub.up()
    assert hub.woken == [1] * 4  # the pump may go; before it runs, a new request must queue behind the others
    hub.router.requests(session, [request(1, 4)])
    assert worker.take() == [] and len(spool) == 4
    assert hub.dispatch() is hub.instance() and len(spool) == 0
    assert worker.tags() == [1, 2, 3, 4]
    hub.router.requests(session, [request(1, 5)])  # the queue is empty: straight to the instance
    assert worker.tags() == [5]
    hub.answer(1)
    assert oracle.rseqs() == [1]


def test_dispatch_stops_past_its_budget_and_goes_on_when_called_again():
    hub = Hub()
    session, _ = hub.session(2)
    hub.router.requests(session, [request(1, rseq, b"%d" % rseq * 88) for rseq in range(1, 6)])  # 100 bytes each
    worker = hub.up()
    assert hub.dispatch(budget=250) is hub.instance()
    assert [body[0] for _, _, _, body in worker.take()] == [*b"123"]
    hub.dispatch(budget=250)
    assert [body[0] for _, _, _, body in worker.take()] == [*b"45"]


def test_a_full_queue_refuses_with_an_error_reply():
    hub = Hub(make_proxy(queue=MemoryQueue(limit=1)))
    session, oracle = hub.session(8)
    hub.router.requests(session, [request(1, 1), request(1, 2), request(1, 3, oneway=True)])
    [refused] = oracle.take()
    assert refused[2] == 2 and error_code(refused) == b"DCO-0004"
    assert hub.router.proxies[1].counters.refused == 2 and session.inflight == 1


def test_adopted_requests_are_forwarded_in_time_and_their_replies_dropped():
    proxy = make_proxy()
    hub = Hub(proxy)
    wall = 1_000_000.0
    records = [
        (wall - 1, routed(3, 1), 0),
        (wall - 10, routed(3, 2), 0),  # 10 s old: past reply_timeout
        (wall - 1, routed(3, 3, oneway=True), 0),
        (wall - 2, routed(3, 4), 0),
    ]
    for _, pdu, _ in records:
        proxy.spool.append(pdu)  # the shell moved them into our queue
    hub.router.adopt(proxy, records, 1, wall)
    assert list(proxy.waiting) == [(3, 1), (3, 4)] and hub.woken == [1]
    counters = proxy.counters
    assert (counters.replayed, counters.duplicates) == (4, 1)
    worker = hub.up()
    hub.dispatch()
    assert [rseq for _, _, rseq, _ in worker.take()] == [1, 3, 4] and counters.expired == 1  # numbers kept
    # A session with their audsid connects to us: it did not send them (audsids need not be unique).
    _, oracle = hub.session(3)
    hub.router.reply(hub.instance(), reply(3, 1))
    assert oracle.take() == [] and hub.router.totals["replies_without_session"] == 1
    assert counters.replies == 1
    hub.router.expire(hub.clock.now + REPLY_TIMEOUT - 2.001)
    assert list(proxy.instances[0].inflight) == [(3, 4)]
    hub.router.expire(hub.clock.now + REPLY_TIMEOUT - 2)  # rseq 4 was queued 2 s ago
    assert oracle.take() == [] and counters.timeouts == 1 and not proxy.instances[0].inflight


# ---------------------------------------------------------------- timeouts


def test_expire_answers_requests_past_their_deadline_and_no_others():
    hub = Hub()
    worker = hub.up()
    session, oracle = hub.session(1)
    hub.router.requests(session, [request(1, 1)])
    hub.clock.now += 1
    hub.router.requests(session, [request(1, 2)])
    hub.router.expire(hub.clock.now + REPLY_TIMEOUT - 1.001)
    assert oracle.take() == []
    hub.router.expire(hub.clock.now + REPLY_TIMEOUT - 1)
    [timeout] = oracle.take()
    assert timeout[2] == 1 and error_code(timeout) == b"DCO-0002"
    hub.answer(1)  # too late: nobody waits for it any more
    hub.answer(2)
    assert oracle.rseqs() == [2]
    counters = hub.router.proxies[1].counters
    assert (counters.timeouts, counters.orphan_replies, counters.replies, session.inflight) == (1, 1, 1, 0)
    assert len(worker.take()) == 2
    hub.router.expire(hub.clock.now)
    assert not hub.router.timeouts  # the answered ones are let go


def test_a_queued_request_that_times_out_is_never_forwarded():
    hub = Hub()
    session, oracle = hub.session(1)
    hub.router.requests(session, [request(1, 1), request(1, 2, oneway=True)])
    hub.router.expire(hub.clock.now + REPLY_TIMEOUT)
    assert error_code(oracle.take()[0]) == b"DCO-0002"
    worker = hub.up()
    hub.dispatch()
    assert worker.tags() == [2] and hub.router.proxies[1].counters.expired == 1


# ---------------------------------------------------------------- an instance goes


def test_requeue_when_an_instance_goes():
    hub = Hub(make_proxy(instances=2))
    gone = hub.up(0)
    session, oracle = hub.session(1)
    hub.router.requests(
        session,
        [
            request(1, 1),
            request(1, 2, oneway=True),
            request(1, 3, oneway=True),
            request(1, 4),
            request(1, 5, oneway=True),
            request(1, 6),
        ],
    )
    sent = gone.sent[:]
    assert len(sent) == 6
    hub.ack(2)
    # The kernel took 1..3; 4..6 were still in the connection's outbox.
    hub.router.requeue(hub.instance(0), [bytearray(pdu) for pdu in sent[3:]])
    [lost] = oracle.take()
    assert lost[2] == 1 and error_code(lost) == b"DCO-0003"  # sent: the worker may have acted on it
    assert hub.instance(0).state == "connecting" and hub.instance(0).conn is None
    other = hub.up(1)
    hub.dispatch()
    assert other.tags() == [3, 4, 5, 6]  # the unacknowledged one-way request first: it was sent first
    assert [rseq for _, _, rseq, _ in other.got] == [rseq for _, _, rseq, _ in gone.got[2:]]  # the same numbers
    for tag in (4, 6):
        hub.answer(tag, index=1)
    assert oracle.rseqs() == [4, 6]
    counters = hub.router.proxies[1].counters
    assert (counters.requeued, counters.duplicates, counters.worker_lost) == (4, 1, 1)


# ---------------------------------------------------------------- poison requests


def test_a_oneway_request_whose_instance_goes_away_poison_after_times_is_set_aside():
    """Each delivery its instance did not survive is an attempt; the last before poison_after goes
    alone, so that only the request that kills its instance is set aside, not its neighbours."""
    hub = Hub(make_proxy(instances=3), poison_after=3)
    workers = [hub.up(i) for i in range(3)]
    session, _ = hub.session(1)
    hub.router.requests(session, [request(1, 1, oneway=True), request(1, 2, oneway=True)])  # one read: one instance
    [first] = [i for i, w in enumerate(workers) if w.sent]
    assert workers[first].tags() == [1, 2]
    hub.router.requeue(hub.instance(first), [])  # it died with both unacknowledged
    queue = hub.router.proxies[1].spool
    assert [attempts for _, _, attempts in queue.items] == [1, 1]
    second, third = [i for i in range(3) if i != first]
    hub.router.hold(hub.instance(third))
    hub.dispatch()
    assert workers[second].tags() == [1, 2]  # not their last attempt: together, as any
    hub.router.requeue(hub.instance(second), [])
    assert [attempts for _, _, attempts in queue.items] == [2, 2]
    workers[first] = hub.up(first)
    hub.router.hold(hub.instance(third), False)
    hub.dispatch()
    alone = {i: w.tags() for i, w in enumerate(workers) if w.sent}  # their last attempt: each alone
    assert sorted(alone.values()) == [[1], [2]] and second not in alone
    innocent = next(i for i, tags in alone.items() if tags == [2])
    poison = next(i for i, tags in alone.items() if tags == [1])
    hub.ack(2, index=innocent)  # it survived: forgotten
    assert hub.instance(innocent).available
    assert hub.router.proxies[1].attempts.keys() == {hub.workers[1, poison].number(1)}
    hub.router.requeue(hub.instance(poison), [])
    assert queue.records == 0 and hub.dead == [(1, routed_body(hub, 1, poison), 3)]
    counters = hub.router.proxies[1].counters
    assert (counters.poisoned, counters.requeued, counters.acked) == (1, 4, 1)
    assert hub.warned == ["poison 1"]  # logged once, with its key
    assert hub.router.inflight == 0 and not hub.router.proxies[1].attempts
    hub.router.requests(session, [request(1, 3)])  # the proxy serves on
    assert workers[innocent].tags() == [3]


def fingerprint(body: bytes) -> int:
    """How the router knows a sync request again when a session sends it again (in this process)."""
    return hash(body)


def die_with(hub: Hub, body: bytes, session: Session, rseq: int) -> None:
    """The session sends a sync request; the instance gets it and dies; it comes back up."""
    hub.router.requests(session, [request(1, rseq, body)])
    assert hub.workers[1, 0].take()[-1][3] == body
    hub.router.requeue(hub.instance(), [])
    hub.up()


def test_a_sync_request_sent_again_whose_instance_dies_poison_after_times_is_set_aside_and_refused():
    """A session asks again after each DCO-0003; the delivery that reaches poison_after goes alone;
    then the request is a dead letter, answered DCO-0008, and asking again costs no instance."""
    hub = Hub(make_proxy(instances=1), poison_after=3)
    hub.up()
    session, oracle = hub.session(1)
    other, other_oracle = hub.session(2)
    for rseq in (1, 2):
        die_with(hub, b"77", session, rseq)
    assert [error_code(pdu) for pdu in oracle.take()] == [b"DCO-0003"] * 2
    hub.router.requests(session, [request(1, 3, b"77")])  # its last delivery: alone
    assert hub.workers[1, 0].take()[0][3] == b"77" and not hub.instance().available
    hub.router.requests(other, [request(1, 1)])  # waits behind it
    assert hub.workers[1, 0].take() == [] and hub.router.proxies[1].spool.records == 1
    hub.router.requeue(hub.instance(), [])
    [answer] = oracle.take()
    assert answer[2] == 3 and error_code(answer) == b"DCO-0008" and b"3 times" in answer[3]
    [(proxy_id, pdu, deaths)] = hub.dead
    assert (proxy_id, pdu[12:], deaths) == (1, b"77", 3) and struct.unpack_from(">i", pdu)[0] == 14
    counters = hub.router.proxies[1].counters
    assert (counters.poisoned, counters.worker_lost, counters.poison_refused) == (1, 2, 0)
    assert hub.warned == ["poison 1"]

    hub.up()
    hub.dispatch()
    assert hub.workers[1, 0].tags() == [1]  # the proxy serves on
    hub.answer(1)
    assert other_oracle.rseqs() == [1]
    hub.router.requests(session, [request(1, 4, b"77")])  # asked again: refused at once
    [answer] = oracle.take()
    assert answer[2] == 4 and error_code(answer) == b"DCO-0008"
    assert hub.workers[1, 0].take() == [] and counters.poison_refused == 1 and session.inflight == 0
    assert hub.router.inflight == 0 and len(hub.dead) == 1


def test_a_reply_forgets_a_sync_requests_deaths_and_only_the_one_that_dies_alone_is_set_aside():
    """Two requests die together twice: each goes alone next; the one that is answered is forgotten."""
    hub = Hub(make_proxy(instances=1), poison_after=3)
    hub.up()
    session, oracle = hub.session(1)
    for rseq in (1, 3):
        hub.router.requests(session, [request(1, rseq, b"1"), request(1, rseq + 1, b"2")])
        hub.router.requeue(hub.instance(), [])
        hub.up()
    assert hub.router.proxies[1].deaths == {fingerprint(b"1"): 2, fingerprint(b"2"): 2}
    hub.router.requests(session, [request(1, 5, b"1"), request(1, 6, b"2")])
    assert hub.workers[1, 0].tags() == [1]  # alone: the other waits
    hub.answer(1)
    assert hub.router.proxies[1].deaths == {fingerprint(b"2"): 2}
    hub.dispatch()
    assert hub.workers[1, 0].tags() == [2]
    hub.router.requeue(hub.instance(), [])
    assert [pdu[12:] for _, pdu, _ in hub.dead] == [b"2"]
    assert [error_code(pdu) if pdu[0] < 0 else b"ok" for pdu in oracle.take()] == [b"DCO-0003"] * 4 + [
        b"ok",
        b"DCO-0008",
    ]
    assert hub.router.proxies[1].poison.keys() == {fingerprint(b"2")}


def test_a_sync_request_on_its_last_delivery_waits_for_an_instance_with_nothing_in_flight():
    """Sent next to another request, it would be blamed for the other's death: it waits until one is idle."""
    hub = Hub(make_proxy(instances=1), poison_after=2)
    hub.up()
    session, oracle = hub.session(1)
    die_with(hub, b"9", session, 1)
    hub.router.requests(session, [request(1, 2, b"5"), request(1, 3, b"9"), request(1, 4, b"6")])
    assert hub.workers[1, 0].tags() == [5]  # the others wait: in order, behind it
    hub.woken.clear()
    hub.dispatch()
    assert hub.workers[1, 0].take() == [] and hub.woken == []
    hub.answer(5)
    assert hub.woken == [1]  # idle now
    hub.dispatch()
    assert hub.workers[1, 0].tags() == [9]  # alone
    hub.answer(9)
    hub.dispatch()
    assert hub.workers[1, 0].tags() == [6]
    assert oracle.rseqs() == [1, 2, 3] and hub.dead == []


def test_a_sync_suspect_that_times_out_gives_its_instance_back():
    hub = Hub(make_proxy(instances=1), poison_after=2)
    hub.up()
    session, oracle = hub.session(1)
    die_with(hub, b"9", session, 1)
    hub.router.requests(session, [request(1, 2, b"9")])
    hub.clock.now += 1
    hub.router.requests(session, [request(1, 3)])
    assert hub.workers[1, 0].tags() == [9]
    hub.router.expire(hub.clock.now + REPLY_TIMEOUT - 1)  # its deadline, not the other's
    assert hub.instance().available and [error_code(pdu) for pdu in oracle.take()] == [b"DCO-0003", b"DCO-0002"]
    hub.dispatch()
    assert hub.workers[1, 0].tags() == [3]


def test_a_poison_sync_request_forgotten_once_its_dead_letter_is_dropped_is_forwarded_again():
    hub = Hub(make_proxy(instances=1), poison_after=2)
    hub.up()
    session, oracle = hub.session(1)
    die_with(hub, b"7", session, 1)
    die_with(hub, b"7", session, 2)
    proxy = hub.router.proxies[1]
    assert hub.router.forget_poison(proxy, {fingerprint(b"7")}) == 0  # its dead letter is kept: refused
    hub.router.requests(session, [request(1, 3, b"7")])
    assert hub.workers[1, 0].take() == []
    assert hub.router.forget_poison(proxy, set()) == 1
    hub.router.requests(session, [request(1, 4, b"7")])
    assert hub.workers[1, 0].tags() == [7]
    assert [error_code(pdu) for pdu in oracle.take()] == [b"DCO-0003", b"DCO-0008", b"DCO-0008"]


def test_what_a_proxy_remembers_of_sync_requests_is_bounded(monkeypatch):
    monkeypatch.setattr(routing, "FINGERPRINTS", 2)
    hub = Hub(make_proxy(instances=1), poison_after=3)
    hub.up()
    session, _ = hub.session(1)
    for rseq in (1, 2, 3):
        die_with(hub, b"%d" % rseq, session, rseq)
    assert hub.router.proxies[1].deaths == {fingerprint(b"2"): 1, fingerprint(b"3"): 1}


def routed_body(hub: Hub, tag: int, index: int) -> bytes:
    """The PDU the instance got with body ``tag``, as the hub forwarded it."""
    return next(data for data in hub.workers[1, index].got_pdus if data[12:] == b"%d" % tag)


def test_a_request_on_its_last_attempt_has_its_instance_to_itself_until_it_acknowledges():
    hub = Hub(make_proxy(instances=1), poison_after=2)
    worker = hub.up()
    session, oracle = hub.session(1)
    hub.router.requests(session, [request(1, 1, oneway=True)])
    worker.take()
    hub.router.requeue(hub.instance(), [])
    worker = hub.up()
    hub.dispatch()
    assert worker.tags() == [1]
    hub.router.requests(session, [request(1, 2), request(1, 3, oneway=True)])  # wait behind it
    assert worker.take() == [] and hub.router.proxies[1].spool.records == 2
    hub.ack(1)
    hub.dispatch()
    assert worker.tags() == [2, 3]
    hub.answer(2)
    assert oracle.rseqs() == [2]


def test_requests_merely_queued_or_never_sent_get_no_attempt():
    """Only a delivery the kernel took counts: what never left the hub goes back as it was."""
    hub = Hub(make_proxy(instances=1), poison_after=2)
    worker = hub.up()
    session, _ = hub.session(1)
    hub.router.requests(session, [request(1, 1, oneway=True)])
    sent = worker.sent[:]
    hub.router.requeue(hub.instance(), [bytearray(pdu) for pdu in sent])
    assert [attempts for _, _, attempts in hub.router.proxies[1].spool.items] == [0] and hub.dead == []
    hub.router.hold(hub.instance())
    hub.up()
    hub.router.requests(session, [request(1, 2, oneway=True)])  # queued behind it
    hub.router.requeue(hub.instance(), [])
    assert [attempts for _, _, attempts in hub.router.proxies[1].spool.items] == [0, 0]


def test_fail_answers_every_request_in_flight_with_the_code_given():
    hub = Hub()
    hub.up()
    session, oracle = hub.session(1)
    hub.router.requests(session, [request(1, 1), request(1, 2)])
    assert hub.router.fail(hub.instance(), ErrorCode.DRAINING, "hub stopped") == 2
    assert [error_code(pdu) for pdu in oracle.take()] == [b"DCO-0005"] * 2
    assert hub.router.inflight == 0 and session.inflight == 0


# ---------------------------------------------------------------- the memory bound of a proxy


def done_with(hub: Hub, first: bytes) -> None:
    """The worker answers (or acknowledges) the request it got whose body starts with ``first``."""
    _, audsid, rseq, _ = next(pdu for pdu in hub.workers[1, 0].got if pdu[3][:1] == first)
    hub.router.reply(hub.instance(), reply(audsid, rseq, b""))


def test_requests_past_a_proxys_memory_limit_wait_in_the_queue_until_half_of_it_is_free():
    """One-way requests count until acknowledged; past memory_limit the rest waits in the queue
    (whatever the instance could take), sync ones too, in order."""
    hub = Hub(make_proxy(memory_limit=1000))
    proxy = hub.router.proxies[1]
    worker = hub.up()
    session, oracle = hub.session(2)
    hub.router.requests(session, [request(1, n, b"%d" % n * 88, oneway=True) for n in range(1, 5)])  # 100 bytes each
    hub.router.requests(session, [request(1, 5, b"5" * 688, oneway=True)])  # 700 bytes: past the bound, queued
    hub.router.requests(session, [request(1, 6, b"6" * 88)])  # a sync one, queued behind it
    assert [body[0] for _, _, _, body in worker.take()] == [*b"1234"]
    assert (proxy.unacked_bytes, proxy.spool.records) == (400, 2)
    assert hub.dispatch() is None and proxy.memory_waiting  # the pump waits for memory
    hub.woken.clear()
    done_with(hub, b"1")  # 300 left: half of it free
    assert hub.woken == [1] and not proxy.memory_waiting
    assert hub.dispatch() is hub.instance()  # 300 + 700 fit; the sync one (not counted) follows
    assert [body[0] for _, _, _, body in worker.take()] == [*b"56"]
    assert (proxy.unacked_bytes, proxy.spool.records) == (1000, 0)
    done_with(hub, b"6")
    assert proxy.unacked_bytes == 1000 and oracle.rseqs() == [6]
    for tag in b"2345":
        done_with(hub, bytes([tag]))
    assert proxy.unacked_bytes == 0


def test_a_wake_for_memory_comes_once_half_of_it_is_free_not_at_every_acknowledgement():
    hub = Hub(make_proxy(memory_limit=1000))
    proxy = hub.router.proxies[1]
    hub.up()
    session, _ = hub.session(2)
    hub.router.requests(session, [request(1, n, b"%d" % (n % 10) * 88, oneway=True) for n in range(1, 12)])
    assert (proxy.unacked_bytes, proxy.spool.records) == (1000, 1)
    hub.dispatch()
    hub.woken.clear()
    for tag in b"1234":
        done_with(hub, bytes([tag]))
    assert hub.woken == [] and proxy.unacked_bytes == 600
    done_with(hub, b"5")
    assert hub.woken == [1]


def test_a_lost_instance_gives_back_the_memory_of_its_unacknowledged_requests():
    hub = Hub(make_proxy(memory_limit=1000))
    proxy = hub.router.proxies[1]
    worker = hub.up()
    session, _ = hub.session(2)
    hub.router.requests(session, [request(1, n, b"%d" % n * 88, oneway=True) for n in range(1, 4)])
    sent = worker.sent[:]
    assert proxy.unacked_bytes == 300
    hub.router.requeue(hub.instance(), [bytearray(pdu) for pdu in sent[2:]])  # 3 never left
    assert proxy.unacked_bytes == 0 and proxy.spool.records == 3  # all three queued again, in order


def test_the_queue_keeps_in_memory_only_what_the_requests_in_flight_leave(tmp_path):
    """Not durable (its directory cannot be made), the spool holds requests in memory: within the
    proxy's memory_limit together with those in flight; past it they are refused, sync ones with
    DCO-0004, and counted."""
    (tmp_path / "file").write_text("")
    spool = Spool(tmp_path / "file" / "proxy-1.spool", memory_limit=1000, size_limit=1 << 30, max_record=1 << 20)
    assert not spool.durable
    hub = Hub(make_proxy(queue=spool, memory_limit=1000))
    proxy = hub.router.proxies[1]
    hub.up()
    session, oracle = hub.session(2)
    hub.router.requests(session, [request(1, n, b"%d" % n * 88, oneway=True) for n in range(1, 8)])
    assert (proxy.unacked_bytes, len(spool)) == (700, 0)
    hub.router.hold(hub.instance())  # from now on, requests are queued
    hub.router.requests(session, [request(1, n, b"%d" % (n % 10) * 88, oneway=True) for n in range(8, 11)])
    hub.router.requests(session, [request(1, 11, b"x" * 88), request(1, 12, b"y" * 88, oneway=True)])
    assert len(spool) == 3 and spool.memory_bytes == 300  # 8, 9, 10 (PDUs of 100 bytes)
    [refused] = oracle.take()
    assert refused[2] == 11 and error_code(refused) == b"DCO-0004"
    assert proxy.counters.refused == 2 and proxy.unacked_bytes + spool.memory_bytes == 1000


def test_fail_queued_answers_the_queued_sync_requests_which_are_then_never_forwarded():
    hub = Hub()
    session, oracle = hub.session(1)
    hub.router.requests(session, [request(1, 1), request(1, 2, oneway=True), request(1, 3)])
    assert hub.router.fail_queued(hub.router.proxies[1], ErrorCode.DRAINING, "proxy 1 removed") == 2
    assert [(pdu[2], error_code(pdu)) for pdu in oracle.take()] == [(1, b"DCO-0005"), (3, b"DCO-0005")]
    assert hub.router.inflight == 0 and session.inflight == 0
    worker = hub.up()
    hub.dispatch()
    assert worker.tags() == [2] and hub.router.proxies[1].counters.expired == 2


# ---------------------------------------------------------------- hold, quit


def test_a_held_instance_gets_nothing_until_released():
    hub = Hub(make_proxy(instances=2))
    workers = [hub.up(i) for i in range(2)]
    session, _ = hub.session(1)
    hub.router.hold(hub.instance(0))
    for rseq in range(1, 5):
        hub.router.requests(session, [request(1, rseq)])
    assert [len(w.take()) for w in workers] == [0, 4]
    hub.router.hold(hub.instance(1))
    hub.router.requests(session, [request(1, 5)])
    assert [len(w.take()) for w in workers] == [0, 0] and hub.dispatch() is None
    assert hub.router.inflight == 5  # the queued one counted once, not once per instance
    hub.woken.clear()
    hub.router.hold(hub.instance(0), held=False)
    assert hub.woken == [1]  # the pump: the queue can go now
    hub.dispatch()
    assert workers[0].tags() == [5]


@pytest.mark.parametrize("length, half_close", [(12, True), (6, False)])  # 6: Noradle's worker
def test_a_quit_notice_stops_dispatch_but_its_replies_still_arrive(length, half_close):
    hub = Hub(make_proxy(instances=2))
    workers = [hub.up(i) for i in range(2)]
    session, oracle = hub.session(1)
    hub.router.requests(session, [request(1, 1)])
    quitting = next(i for i, w in enumerate(workers) if w.take())
    assert hub.router.reply(hub.instance(quitting), bytearray(struct.pack(">iii", length, 0, 0))) is half_close
    assert hub.instance(quitting).state == "quitting"
    for rseq in range(2, 5):
        hub.router.requests(session, [request(1, rseq)])
    assert workers[quitting].take() == [] and len(workers[1 - quitting].take()) == 3
    hub.answer(1, index=quitting)
    assert oracle.rseqs() == [1]


def test_workers_connected_once_every_proxy_has_an_instance_up():
    hub = Hub(make_proxy(1, instances=2), make_proxy(2))
    hub.up(0, 1)
    assert not hub.router.workers_connected()
    hub.up(0, 2)
    assert hub.router.workers_connected()


def test_the_router_imports_no_io():
    """Sans-IO stays so: importing the router brings in neither trio nor sockets."""
    code = "import sys, dcod.hub.routing; print(sorted({'trio', 'socket', 'select'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
