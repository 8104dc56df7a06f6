"""The durable queue: order, bounds, recovery of torn tails, and replay after a SIGKILLed hub."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

from conftest import wait_for
from dcod.hub.spool import FILE_HEADER, RECORD_HEADER, Spool, SpoolBusy, SpoolDir, SpoolFull
from peers import OracleSession, WorkerPeer, read_pdu, reply_pdu, send_all


def open_spool(path, memory_limit=1 << 20, size_limit=1 << 30):
    return Spool(path, memory_limit=memory_limit, size_limit=size_limit, max_record=1 << 20)


def drain(spool: Spool) -> list[bytes]:
    out = []
    while len(spool):
        out.append(bytes(spool.peek()[1]))
        spool.pop()
    spool.commit()
    return out


def test_fifo_across_memory_limit(tmp_path):
    spool = open_spool(tmp_path / "s", memory_limit=50)
    records = [b"%03d" % i * 5 for i in range(20)]  # 15 bytes each: 3 fit in memory
    for r in records:
        spool.append(r)
    assert spool.memory_bytes <= 50
    assert drain(spool) == records
    assert os.path.getsize(tmp_path / "s") == FILE_HEADER.size  # empty spool truncated


def test_reopen_continues_after_head(tmp_path):
    spool = open_spool(tmp_path / "s")
    for i in range(5):
        spool.append(b"rec%d" % i)
    for _ in range(2):
        spool.peek()
        spool.pop()
    spool.commit()
    os.close(spool._fd)  # as if killed: no close(), no fsync
    again = open_spool(tmp_path / "s")
    assert again.recovered == 3
    assert drain(again) == [b"rec2", b"rec3", b"rec4"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_torn_or_corrupt_tail_is_cut(tmp_path, damage):
    path = tmp_path / "s"
    spool = open_spool(path)
    for i in range(3):
        spool.append(b"record-%d" % i)
    spool.close()
    size = os.path.getsize(path)
    if damage == "truncate":
        os.truncate(path, size - 3)
    else:
        with open(path, "r+b") as f:
            f.seek(size - 1)
            last = f.read(1)[0]
            f.seek(size - 1)
            f.write(bytes([last ^ 0xFF]))
    again = open_spool(path)
    assert again.recovered == 2 and again.torn_bytes == RECORD_HEADER.size + 8 - (3 if damage == "truncate" else 0)
    again.append(b"after")
    assert drain(again) == [b"record-0", b"record-1", b"after"]


def test_size_bound_refuses(tmp_path):
    spool = open_spool(tmp_path / "s", size_limit=100)
    spool.append(b"x" * 60)
    with pytest.raises(SpoolFull):
        spool.append(b"x" * 60)
    assert len(spool) == 1


def test_not_a_spool_is_started_afresh(tmp_path):
    (tmp_path / "s").write_bytes(b"something else entirely")
    spool = open_spool(tmp_path / "s")
    assert len(spool) == 0
    spool.append(b"ok")
    assert drain(spool) == [b"ok"]


# ---------------------------------------------------------------- a real hub, SIGKILLed


def start_hub_process(config_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dcod", "hub", "--config", str(config_path)],
                            stdin=subprocess.DEVNULL)


async def connect_when_listening(address: str, audsid: int) -> OracleSession:
    with trio.fail_after(10):
        while True:
            try:
                return await OracleSession.connect(address, audsid=audsid)
            except OSError:
                await trio.sleep(0.02)  # the new process is still starting: nothing to wait on


async def test_queued_requests_survive_sigkill_of_the_hub(make_config, tmp_path):
    config = make_config("[[proxy]]\nid = 1\nhandler = \"echo\"\n")
    address = config.hub.listen
    spool_dir = config.state_dir / "spool"
    sent = [(rseq, rseq % 3 == 0) for rseq in range(1, 61)]  # (rseq, oneway): 40 sync, 20 one-way
    body = b"queued while the worker is down"

    hub = start_hub_process(config.source)
    try:
        session = await connect_when_listening(address, audsid=31)
        for rseq, oneway in sent:
            await session.send(1, rseq, body, oneway=oneway)
        expected_size = FILE_HEADER.size + len(sent) * (RECORD_HEADER.size + 12 + len(body))
        spool_path = spool_dir / f"proxy-1.{hub.pid}.spool"  # each hub process has its own
        await wait_for(lambda: spool_path.exists() and spool_path.stat().st_size == expected_size)
        hub.send_signal(signal.SIGKILL)
        hub.wait()
        session.close()

        hub = start_hub_process(config.source)
        session = await connect_when_listening(address, audsid=31)  # the session comes back
        worker = await WorkerPeer(str(config.worker_socket(1, 0))).listen()
        hub_side = await worker.accept()
        arrived = [await read_pdu(hub_side) for _ in sent]
        assert [(rseq, length < 0) for length, _, rseq, _ in arrived] == sent
        assert all(audsid == 31 and b == body for _, audsid, _, b in arrived)
        # Sync requests replayed by the new hub are routed back to the reconnected session.
        await send_all(hub_side, reply_pdu(31, 1, b"answer"))
        assert await session.read() == (18, 31, 1, b"answer")
    finally:
        hub.kill()
        hub.wait()


def test_records_caught_mid_batch_by_a_crash_are_counted_as_possible_duplicates(tmp_path):
    spool = open_spool(tmp_path / "s")
    for i in range(5):
        spool.append(b"rec%d" % i)
    spool.peek()
    spool.pop()  # forwarded and committed: gone for good
    spool.commit()
    for _ in range(2):  # a batch of two forwarded, then the hub dies before commit()
        spool.peek()
        spool.pop()
    os.close(spool._fd)
    again = open_spool(tmp_path / "s")
    # An upper bound: the mark covers what the batch could have reached (the end at its start).
    assert (again.recovered, again.possible_duplicates) == (4, 4)
    assert drain(again) == [b"rec1", b"rec2", b"rec3", b"rec4"]
    again.close()
    assert open_spool(tmp_path / "s").possible_duplicates == 0


def test_a_clean_commit_leaves_no_possible_duplicates(tmp_path):
    spool = open_spool(tmp_path / "s")
    for i in range(3):
        spool.append(b"rec%d" % i)
    spool.peek()
    spool.pop()
    spool.commit()
    os.close(spool._fd)
    again = open_spool(tmp_path / "s")
    assert (again.recovered, again.possible_duplicates) == (2, 0)


def spool_dir(tmp_path) -> SpoolDir:
    return SpoolDir(tmp_path, memory_limit=1 << 20, size_limit=1 << 30, max_record=1 << 20)


def test_a_living_hubs_spool_is_not_taken_over(tmp_path):
    mine = open_spool(tmp_path / "proxy-1.111.spool")
    mine.append(b"still mine")
    with pytest.raises(SpoolBusy):
        open_spool(tmp_path / "proxy-1.111.spool")  # the flock is held: its hub lives
    ours = spool_dir(tmp_path).open(1)
    assert spool_dir(tmp_path).adopt(ours, 1) == ([], 0)
    assert (tmp_path / "proxy-1.111.spool").exists()


def test_spools_of_gone_hubs_are_taken_over_in_order(tmp_path):
    gone = open_spool(tmp_path / "proxy-1.222.spool")
    for i in range(3):
        gone.append(b"old%d" % i)
    old_times = [t for t, _ in gone.scan()]
    os.close(gone._fd)  # the hub is killed: its lock goes with it
    other_proxy = open_spool(tmp_path / "proxy-2.222.spool")
    other_proxy.append(b"not for proxy 1")
    os.close(other_proxy._fd)
    ours = spool_dir(tmp_path).open(1)
    ours.append(b"new")
    taken, duplicates = spool_dir(tmp_path).adopt(ours, 1)
    assert [pdu for _, pdu in taken] == [b"old0", b"old1", b"old2"] and duplicates == 0
    assert [t for t, _ in ours.scan()][1:] == old_times  # their original queue times are kept
    assert drain(ours) == [b"new", b"old0", b"old1", b"old2"]
    assert not (tmp_path / "proxy-1.222.spool").exists() and (tmp_path / "proxy-2.222.spool").exists()
