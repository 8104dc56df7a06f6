"""The hub against byte-level peers written from the spec: routing, errors, queueing, bad input."""

from __future__ import annotations

import functools
import socket
import struct

import pytest
import trio

from conftest import wait_for
from dcod.hub.server import drain
from peers import (
    HUB_HANDSHAKE,
    TAKES_ERROR_REPLIES,
    OracleSession,
    WorkerPeer,
    closed_by_peer,
    handshake,
    open_raw,
    read_pdu,
    recv_exactly,
    reply_pdu,
    request_pdu,
    send_all,
)

ONE_PROXY = """
[[proxy]]
id = 1
handler = "echo"
instances = {instances}
ordered = {ordered}
"""


def proxies(instances: int = 1, ordered: bool = False) -> str:
    return ONE_PROXY.format(instances=instances, ordered=str(ordered).lower())


@pytest.fixture
def hub_with_workers(make_config, start_hub):
    """await hub_with_workers(proxies_toml, **hub_keys) -> (hub, address, hub-side sockets of its
    worker peers): a hub serving the config, once it has connected to every worker peer."""

    async def start(toml: str | None = None, **hub_keys):
        config = make_config(toml or proxies(), **hub_keys)
        workers = await workers_for(config)
        hub, address = await start_hub(config)
        return hub, address, [await w.accept() for w in workers]

    return start


async def workers_for(config, proxy_id: int = 1) -> list:
    """Listening worker peers at the sockets the hub will connect to."""
    p = config.proxy(proxy_id)
    return [await WorkerPeer(str(config.worker_socket(proxy_id, i))).listen() for i in range(p.instances)]


def without_rseq(pdu: tuple[int, int, int, bytes]) -> tuple[int, int, bytes]:
    """A forwarded request but its rseq, which is the hub's number (not the session's)."""
    length, audsid, _, body = pdu
    return length, audsid, body


async def test_request_is_rewritten_and_the_reply_gets_the_sessions_rseq_back(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    session = await OracleSession.connect(address, audsid=0xFEDCBA98)  # above 2^31: stays unsigned

    await session.send(1, 1, b"hello")
    length, audsid, number, body = await read_pdu(hub_side)
    assert (length, audsid, body) == (17, 0xFEDCBA98, b"hello") and number > 0
    await send_all(hub_side, reply_pdu(0xFEDCBA98, number, b"world!"))
    assert await session.read() == (18, 0xFEDCBA98, 1, b"world!")


async def test_oneway_keeps_negative_length_and_is_tracked_until_acknowledged(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    session = await OracleSession.connect(address, audsid=7)
    await session.send(1, 1, b"fire and forget", oneway=True)
    forwarded = await read_pdu(hub_side)
    assert without_rseq(forwarded) == (-27, 7, b"fire and forget")
    assert hub.router.inflight == 1
    await send_all(hub_side, reply_pdu(7, forwarded[2], b""))  # the worker's ack: not for the session
    await wait_for(lambda: hub.router.inflight == 0)
    assert (hub.router.proxies[1].counters.oneway, hub.router.proxies[1].counters.acked) == (1, 1)
    await session.send(1, 2, b"ask")
    forwarded = await read_pdu(hub_side)
    assert without_rseq(forwarded) == (15, 7, b"ask")
    await send_all(hub_side, reply_pdu(7, forwarded[2], b"answer"))
    assert await session.read() == (18, 7, 2, b"answer")  # the first thing the session gets


async def test_oneway_requests_an_instance_did_not_acknowledge_go_to_another(hub_with_workers):
    hub, address, [first, second] = await hub_with_workers(proxies(instances=2))
    await wait_for(lambda: all(i.state == "up" for i in hub.router.proxies[1].instances))
    session = await OracleSession.connect(address, audsid=8)
    for rseq in range(1, 5):
        await session.send(1, rseq, b"o%d" % rseq, oneway=True)
        await wait_for(lambda rseq=rseq: hub.router.proxies[1].counters.oneway == rseq)  # one read each: they alternate
    by_side = {side: [await read_pdu(side) for _ in range(2)] for side in (first, second)}
    await send_all(first, reply_pdu(8, by_side[first][0][2], b""))  # acks one, then dies
    await wait_for(lambda: hub.router.proxies[1].counters.acked == 1)
    first.close()
    unfinished = by_side[first][1]
    assert await read_pdu(second) == unfinished  # sent again to the instance still there
    counters = hub.router.proxies[1].counters
    assert (counters.requeued, counters.duplicates) == (1, 1)  # it may have handled it: a possible duplicate


async def test_pdus_split_and_coalesced_at_any_boundary(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    for audsid in range(1, 3 * 15 + 16 + 2):
        # The handshake and three PDUs as one byte string, sent in two writes cut at every offset.
        stream = handshake(audsid, 1, 2) + b"".join(request_pdu(1, n, b"ab%d" % n) for n in (1, 2, 3))
        cut = audsid - 1
        raw = await open_raw(address)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await send_all(raw, stream[:cut])
        await send_all(raw, stream[cut:])
        for n in (1, 2, 3):
            assert without_rseq(await read_pdu(hub_side)) == (15, audsid, b"ab%d" % n)
        raw.close()


async def test_unknown_proxy_gets_error_reply_and_oneway_is_counted(make_config, start_hub):
    config = make_config(proxies())
    hub, address = await start_hub(config)
    session = await OracleSession.connect(address, audsid=5, sid=TAKES_ERROR_REPLIES)
    await session.send(7, 1, b"x", oneway=True)
    await session.send(7, 2, b"x")
    length, audsid, rseq, text = await session.read()
    assert (audsid, rseq) == (5, 2) and length == -(12 + len(text))
    assert text == b"DCO-0001 unknown proxy 7"
    assert hub.router.totals["unknown_proxy"] == 2


async def test_least_outstanding_instance_first(hub_with_workers):
    hub, address, sides = await hub_with_workers(proxies(instances=2))
    session = await OracleSession.connect(address, audsid=3)
    await session.send(1, 1, b"a")
    await wait_for(lambda: hub.router.inflight == 1)  # read apart: the requests of one read go to one instance
    await session.send(1, 2, b"b")
    got = sorted([(await read_pdu(sides[0]))[3], (await read_pdu(sides[1]))[3]])
    assert got == [b"a", b"b"]  # one each, since the first is still outstanding on its instance


async def test_ordered_proxy_keeps_a_session_on_one_instance(hub_with_workers):
    hub, address, sides = await hub_with_workers(proxies(instances=2, ordered=True))
    instances = hub.router.proxies[1].instances
    await wait_for(lambda: hub.router.workers_connected() and all(i.state == "up" for i in instances))
    session = await OracleSession.connect(address, audsid=4)
    for rseq in range(1, 6):
        await session.send(1, rseq, b"n%d" % rseq)
    mine = sides[4 % 2]
    assert [(await read_pdu(mine))[3] for _ in range(5)] == [b"n1", b"n2", b"n3", b"n4", b"n5"]


async def test_reply_timeout_gets_error_reply_and_late_reply_is_dropped(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies(), reply_timeout=0.2)
    session = await OracleSession.connect(address, audsid=11, sid=TAKES_ERROR_REPLIES)
    await session.send(1, 1, b"slow")
    number = (await read_pdu(hub_side))[2]
    length, _, rseq, text = await session.read()
    assert length < 0 and rseq == 1 and text.startswith(b"DCO-0002 ")
    await send_all(hub_side, reply_pdu(11, number, b"too late"))
    await wait_for(lambda: hub.router.proxies[1].counters.orphan_replies == 1)
    assert hub.router.inflight == 0


async def test_worker_death_answers_its_inflight_sync_requests(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    session = await OracleSession.connect(address, audsid=12, sid=TAKES_ERROR_REPLIES)
    await session.send(1, 1, b"doomed")
    await session.send(1, 2, b"doomed too", oneway=True)
    await read_pdu(hub_side)
    await read_pdu(hub_side)
    hub_side.close()
    length, _, rseq, text = await session.read()
    assert length < 0 and rseq == 1 and text.startswith(b"DCO-0003 ")
    assert hub.router.proxies[1].counters.worker_lost == 1


async def test_requests_queue_while_no_instance_and_arrive_in_order(make_config, start_hub):
    config = make_config(proxies())
    hub, address = await start_hub(config)
    session = await OracleSession.connect(address, audsid=13)
    for rseq in range(1, 5):
        await session.send(1, rseq, b"q%d" % rseq, oneway=rseq % 2 == 0)
    await wait_for(lambda: len(hub.router.proxies[1].spool) == 4)
    [worker] = await workers_for(config)  # the worker starts late; the hub reconnects
    hub_side = await worker.accept()
    got = [await read_pdu(hub_side) for _ in range(4)]
    assert [(g[3], g[0] > 0) for g in got] == [(b"q1", True), (b"q2", False), (b"q3", True), (b"q4", False)]
    await send_all(hub_side, reply_pdu(13, got[2][2], b"r3") + reply_pdu(13, got[0][2], b"r1"))
    assert {(await session.read())[2] for _ in range(2)} == {1, 3}
    await wait_for(lambda: hub.router.proxies[1].spool.size == 0)


async def test_full_queue_refuses_with_error_reply(make_config, start_hub):
    config = make_config(proxies(), spool_max=100)
    hub, address = await start_hub(config)
    session = await OracleSession.connect(address, audsid=14, sid=TAKES_ERROR_REPLIES)
    await session.send(1, 1, b"x" * 40)  # fits: 16-byte record header + 52
    await session.send(1, 2, b"x" * 40)  # does not
    length, _, rseq, text = await session.read()
    assert length < 0 and rseq == 2 and text.startswith(b"DCO-0004 ")
    assert hub.router.proxies[1].counters.refused == 1 and len(hub.router.proxies[1].spool) == 1


async def test_empty_reply_is_a_reply_not_a_quit_notice(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    session = await OracleSession.connect(address, audsid=15)
    await session.send(1, 1, b"anything")
    number = (await read_pdu(hub_side))[2]
    await send_all(hub_side, reply_pdu(15, number, b""))
    assert await session.read() == (12, 15, 1, b"")
    assert hub.router.proxies[1].instances[0].state == "up"


@pytest.mark.parametrize("notice_length", [12, 6])  # 6: what Noradle's own worker wrote
async def test_quit_notice_stops_dispatch_and_replies_still_flow(hub_with_workers, notice_length):
    hub, address, sides = await hub_with_workers(proxies(instances=2))
    await wait_for(lambda: all(i.state == "up" for i in hub.router.proxies[1].instances))
    session = await OracleSession.connect(address, audsid=16)
    await session.send(1, 1, b"in flight when the worker quits")
    await wait_for(lambda: hub.router.inflight == 1)
    busy = next(i for i in hub.router.proxies[1].instances if i.inflight).index
    quitting, other = sides[busy], sides[1 - busy]
    number = (await read_pdu(quitting))[2]

    await send_all(quitting, struct.pack(">iii", notice_length, 0, 0))
    if notice_length == 12:
        assert await closed_by_peer(quitting)  # the hub half-closed: no more requests for it
    else:
        # Noradle's worker would close on a half-close and lose its replies: none is sent.
        await wait_for(lambda: hub.router.proxies[1].instances[busy].state == "quitting")
    assert hub.router.proxies[1].instances[busy].state == "quitting"
    await session.send(1, 2, b"after the notice")
    assert (await read_pdu(other))[3] == b"after the notice"
    await send_all(quitting, reply_pdu(16, number, b"late but delivered"))
    assert await session.read() == (30, 16, 1, b"late but delivered")
    if notice_length == 6:
        with socket.fromfd(quitting.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as peek:
            with pytest.raises(BlockingIOError):  # not at end of stream: no half-close came
                peek.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)


async def test_non_oracle_first_packet_closes_only_that_connection(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    good = await OracleSession.connect(address, audsid=21)
    bad = await open_raw(address)
    await send_all(bad, b"GET / HTTP/1.0\r\n\r\n")
    assert await closed_by_peer(bad)
    await good.send(1, 1, b"still here")
    assert (await read_pdu(hub_side))[3] == b"still here"
    assert hub.totals["protocol_errors"] == 1


@pytest.mark.parametrize("length", [11, -5, 0, 1 << 20])
async def test_bad_length_closes_only_that_session(hub_with_workers, length):
    hub, address, [hub_side] = await hub_with_workers(proxies(), max_pdu=65536)
    good = await OracleSession.connect(address, audsid=22)
    bad = await OracleSession.connect(address, audsid=23)
    await send_all(bad.sock, struct.pack(">iii", length, 1, 1))
    assert await closed_by_peer(bad.sock)
    await good.send(1, 1, b"ok")
    assert (await read_pdu(hub_side))[1] == 22
    assert hub.totals["protocol_errors"] == 1


async def test_session_vanishing_mid_pdu_is_counted(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    bad = await OracleSession.connect(address, audsid=24)
    await send_all(bad.sock, request_pdu(1, 1, b"x" * 100)[:50])
    await wait_for(lambda: any(s.audsid == 24 for s in hub.router.sessions))
    bad.close()
    await wait_for(lambda: hub.totals["truncated_pdus"] == 1)
    good = await OracleSession.connect(address, audsid=25)
    await good.send(1, 1, b"ok")
    assert (await read_pdu(hub_side))[1] == 25


async def test_reply_for_unknown_session_is_counted_and_harmless(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    await send_all(hub_side, reply_pdu(999, 1, b"nobody asked"))
    await wait_for(lambda: hub.router.proxies[1].counters.orphan_replies == 1)
    session = await OracleSession.connect(address, audsid=26)
    await session.send(1, 1, b"ping")
    number = (await read_pdu(hub_side))[2]
    await send_all(hub_side, reply_pdu(26, number, b"pong"))
    assert (await session.read())[3] == b"pong"


async def test_garbage_from_worker_closes_that_worker_connection_only(make_config, start_hub):
    config = make_config(proxies(instances=2))
    workers = await workers_for(config)
    hub, address = await start_hub(config)
    sides = [await w.accept() for w in workers]
    await send_all(sides[0], b"\xff\xff\xff\xff garbage")  # length -1
    assert await closed_by_peer(sides[0])
    assert hub.totals["worker_protocol_errors"] == 1
    reconnected = await workers[0].accept()  # the hub reconnects with backoff
    assert reconnected is not None
    session = await OracleSession.connect(address, audsid=27)
    await session.send(1, 1, b"ok")
    await wait_for(lambda: hub.router.inflight == 1)


async def test_external_worker_over_tcp(make_config, start_hub):
    from conftest import free_port

    port = free_port()
    config = make_config(f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{port}"\n')
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", port))
    listener.listen()
    hub, address = await start_hub(config)
    hub_side, _ = await listener.accept()
    assert await recv_exactly(hub_side, 4) == HUB_HANDSHAKE
    session = await OracleSession.connect(address, audsid=28)
    await session.send(2, 1, b"tcp")
    assert without_rseq(await read_pdu(hub_side)) == (15, 28, b"tcp")


async def test_connection_from_outside_allow_list_is_refused(make_config, start_hub):
    config = make_config(proxies(), allow=["10.0.0.0/8"])
    hub, address = await start_hub(config)
    session = await OracleSession.connect(address, audsid=29)
    assert await closed_by_peer(session.sock)
    assert hub.totals["refused_connections"] == 1


async def test_oneway_requests_spread_over_instances(hub_with_workers):
    hub, address, sides = await hub_with_workers(proxies(instances=2))
    await wait_for(lambda: all(i.state == "up" for i in hub.router.proxies[1].instances))
    session = await OracleSession.connect(address, audsid=30)
    for rseq in range(1, 5):
        await session.send(1, rseq, b"o%d" % rseq, oneway=True)
        # One read each: the requests of one read all go to one instance.
        await wait_for(lambda rseq=rseq: hub.router.proxies[1].counters.oneway == rseq)
    got = [[(await read_pdu(side))[3] for _ in range(2)] for side in sides]
    assert sorted(got[0] + got[1]) == [b"o1", b"o2", b"o3", b"o4"]


async def test_requests_a_dead_worker_never_got_are_queued_again(make_config, start_hub):
    config = make_config(proxies())
    [worker] = await workers_for(config)
    hub, address = await start_hub(config)
    stuck = await worker.accept()  # it reads nothing: the hub's outbox backs up behind the socket
    session = await OracleSession.connect(address, audsid=40, sid=TAKES_ERROR_REPLIES)

    def body(rseq: int) -> bytes:
        return b"%03d" % rseq + b"b" * 65533

    for rseq in range(1, 121):  # ~8 MB: more than the socket buffers hold
        await session.send(1, rseq, body(rseq), oneway=rseq % 4 != 0)
    instance = hub.router.proxies[1].instances[0]
    await wait_for(lambda: hub.router.proxies[1].counters.requests == 120 and instance.conn.pending_bytes > 1 << 20)
    stuck.close()  # the worker dies with the outbox still full
    fresh = await worker.accept()  # the hub reconnects; the requests it never sent come first
    requeued = hub.router.proxies[1].counters.requeued
    assert requeued > 0
    got = [await read_pdu(fresh) for _ in range(requeued)]
    rseqs = [int(g[3][:3]) for g in got]
    assert rseqs == sorted(set(rseqs)) and rseqs[-1] == 120  # each once, in order, up to the last
    assert all(g[3] == body(rseq) and (g[0] > 0) == (rseq % 4 == 0) for g, rseq in zip(got, rseqs))
    # Sync ones among them are answered for real; only those the kernel had taken got DCO-0003.
    sync_requeued = [(g, rseq) for g, rseq in zip(got, rseqs) if g[0] > 0]
    for g, _ in sync_requeued:
        await send_all(fresh, reply_pdu(40, g[2], b"ok"))
    answers = {}
    for _ in range(30):  # 30 sync requests in all: each gets exactly one answer
        length, _, rseq, text = await session.read()
        answers[rseq] = text if length > 0 else text[:8]
    assert sorted(answers) == list(range(4, 121, 4))
    assert {answers[rseq] for _, rseq in sync_requeued} == {b"ok"}
    assert set(answers.values()) <= {b"ok", b"DCO-0003"}


async def test_drain_closes_each_quiet_connection_and_keeps_busy_ones(hub_with_workers):
    hub, address, [hub_side] = await hub_with_workers(proxies())
    # One audsid on both (two SYS sessions): whether a session is busy goes by its connection.
    busy, quiet = [await OracleSession.connect(address, audsid=0, sid=sid) for sid in (1, 2)]
    await busy.send(1, 1, b"in flight")
    number = (await read_pdu(hub_side))[2]
    await wait_for(lambda: len(hub.router.sessions) == 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(drain, hub, timeout=30, flush_timeout=1.0, grace=0.2))
        assert await closed_by_peer(quiet.sock)
        with socket.fromfd(busy.sock.fileno(), socket.AF_INET, socket.SOCK_STREAM) as peek:
            with pytest.raises(BlockingIOError):  # still open: its reply is owed
                peek.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        await send_all(hub_side, reply_pdu(0, number, b"owed"))
        assert await busy.read() == (16, 0, 1, b"owed")
        assert await closed_by_peer(busy.sock)  # then quiet for its grace too
