"""Limits: what the hub does when a peer or the disk pushes it past its bounds."""

from __future__ import annotations

import pytest

from conftest import wait_for
from dcod.hub.spool import Spool
from mounts import remount, tmpfs
from peers import (
    TAKES_ERROR_REPLIES,
    OracleSession,
    WorkerPeer,
    closed_by_peer,
    open_raw,
    read_pdu,
    reply_pdu,
    request_pdu,
    send_all,
)

ECHO1 = '[[proxy]]\nid = 1\nhandler = "echo"\n'


async def started(make_config, start_hub, **hub):
    config = make_config(ECHO1, **hub)
    worker = await WorkerPeer(str(config.worker_socket(1, 0))).listen()
    hub_, address = await start_hub(config)
    return hub_, address, await worker.accept()


async def test_connections_past_max_connections_are_refused(make_config, start_hub):
    hub, address, _ = await started(make_config, start_hub, max_connections=2)
    first = await OracleSession.connect(address, audsid=1)
    second = await OracleSession.connect(address, audsid=2)
    await wait_for(lambda: hub.connections == 2)
    third = await OracleSession.connect(address, audsid=3)
    assert await closed_by_peer(third.sock)
    assert hub.totals["refused_connections"] == 1
    first.close()
    await wait_for(lambda: hub.connections == 1)
    fourth = await OracleSession.connect(address, audsid=4)  # room again
    await wait_for(lambda: hub.connections == 2)
    second.close(), fourth.close()


async def test_sync_requests_past_the_session_limit_get_an_error_reply(make_config, start_hub):
    hub, address, worker = await started(make_config, start_hub, max_inflight_per_session=2)
    session = await OracleSession.connect(address, audsid=5, sid=TAKES_ERROR_REPLIES)
    for rseq in (1, 2, 3):
        await session.send(1, rseq, b"wait %d" % rseq)
    length, _, rseq, text = await session.read()
    assert (length < 0, rseq) == (True, 3) and text.startswith(b"DCO-0007 ")
    await session.send(1, 4, b"one-way is not limited", oneway=True)
    got = [await read_pdu(worker) for _ in range(3)]
    assert [body for _, _, _, body in got] == [b"wait 1", b"wait 2", b"one-way is not limited"]
    await send_all(worker, reply_pdu(5, got[0][2], b"done"))
    assert (await session.read())[2] == 1
    await session.send(1, 5, b"room again")
    assert (await read_pdu(worker))[3] == b"room again"
    assert hub.router.totals["overloaded"] == 1


@pytest.mark.parametrize("sent", [b"", b"\x0b\xc7\x4b\x16\x00\x00", "half a PDU"])
async def test_a_peer_stalling_before_a_whole_pdu_is_closed(make_config, start_hub, sent):
    hub, address, worker = await started(make_config, start_hub, stall_timeout=0.2)
    if sent == "half a PDU":
        slow = await OracleSession.connect(address, audsid=6)
        await send_all(slow.sock, request_pdu(1, 1, b"x" * 100)[:40])
        sock = slow.sock
    else:
        sock = await open_raw(address)  # nothing, or part of the handshake
        await send_all(sock, sent)
    good = await OracleSession.connect(address, audsid=7)
    await good.send(1, 1, b"unaffected")
    assert (await read_pdu(worker))[3] == b"unaffected"
    assert await closed_by_peer(sock)
    assert hub.totals["stalled"] == 1


async def test_a_full_disk_holds_requests_in_memory_then_refuses_and_corrupts_nothing(make_config, start_hub, tmp_path):
    with tmpfs(tmp_path / "tiny") as state:
        # No worker: everything queues. 16 KiB of memory for what the disk cannot take.
        hub, address = await start_hub(make_config(ECHO1, state_dir=state, queue_memory=16384))
        session = await OracleSession.connect(address, audsid=8, sid=TAKES_ERROR_REPLIES)
        body = b"q" * 3997
        proxy = hub.router.proxies[1]
        for rseq in range(1, 40):  # 40 x 4 KB fit neither in 64 KB of disk nor in 16 KB of memory
            await session.send(1, rseq, b"%03d" % rseq + body)
            await wait_for(lambda rseq=rseq: proxy.counters.requests == rseq)
            if proxy.counters.refused:
                break
        length, _, refused, text = await session.read()
        assert length < 0 and text.startswith(b"DCO-0004 ") and proxy.counters.refused == 1
        spool = proxy.spool
        assert not spool.durable and "No space left" in spool.not_durable_reason
        assert len(spool) == refused - 1 and 0 < spool.memory_only <= 4
        # The file is whole: a copy opened as the next hub would open it holds every record written.
        copy = tmp_path / "copy.spool"
        copy.write_bytes(spool.path.read_bytes())
        again = Spool(copy, memory_limit=1 << 20, size_limit=1 << 30, max_record=1 << 20)
        assert (again.recovered, again.torn_bytes, again.damaged_ranges) == (refused - 1 - spool.memory_only, 0, 0)
        assert all(pdu[15:] == body for _, pdu, _ in again.scan())
        # Held in memory or on disk, they go out in order once a worker is there.
        worker = await WorkerPeer(str(hub.config.worker_socket(1, 0))).listen()
        hub_side = await worker.accept()
        assert [int((await read_pdu(hub_side))[3][:3]) for _ in range(refused - 1)] == list(range(1, refused))


async def test_a_read_only_state_directory_does_not_stop_the_hub_and_it_writes_again_when_it_can(
    make_config, start_hub, tmp_path
):
    with tmpfs(tmp_path / "ro") as state:
        remount(state, "ro")
        config = make_config(ECHO1, state_dir=state)
        hub, address = await start_hub(config)
        assert not hub.router.proxies[1].spool.durable
        session = await OracleSession.connect(address, audsid=9)
        await session.send(1, 1, b"queued in memory", oneway=True)
        await session.send(1, 2, b"queued in memory too")
        proxy = hub.router.proxies[1]
        await wait_for(lambda: len(proxy.spool) == 2)
        assert proxy.counters.not_durable == 2
        stats = hub.stats()["proxies"][1]
        assert stats["durable"] is False and "Read-only" in stats["not_durable_reason"]
        # The disk is back: the hub writes what it holds, and the spool is durable again.
        remount(state, "rw")
        await wait_for(lambda: proxy.spool.durable)
        assert proxy.spool.memory_only == 0 and hub.stats()["proxies"][1]["durable"] is True
        worker = await WorkerPeer(str(config.worker_socket(1, 0))).listen()
        hub_side = await worker.accept()
        got = [await read_pdu(hub_side) for _ in range(2)]
        assert [body for _, _, _, body in got] == [b"queued in memory", b"queued in memory too"]
        await send_all(hub_side, reply_pdu(9, got[1][2], b"answered"))
        assert await session.read() == (20, 9, 2, b"answered")
