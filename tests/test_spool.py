"""The durable queue: order, bounds, recovery of torn tails, and replay after a SIGKILLed hub."""

from __future__ import annotations

import logging
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import trio

import dcod
from conftest import let_others_reach, wait_for
from dcod.hub.spool import FILE_HEADER, MAGIC, RECORD_HEADER, Spool, SpoolBusy, SpoolDir, SpoolFull
from mounts import fill, remount, tmpfs
from peers import OracleSession, WorkerPeer, forwarded_pdu, read_pdu, reply_pdu, send_all


def open_spool(path, memory_limit=1 << 20, size_limit=1 << 30):
    return Spool(path, memory_limit=memory_limit, size_limit=size_limit, max_record=1 << 20)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dcod.hub.spool" and r.levelno >= logging.WARNING]


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


def test_a_torn_tail_is_cut(tmp_path, caplog):
    caplog.set_level(logging.INFO, "dcod.hub.spool")
    path = tmp_path / "s"
    spool = open_spool(path)
    for i in range(3):
        spool.append(b"record-%d" % i)
    spool.close()
    os.truncate(path, os.path.getsize(path) - 3)  # a crash in the middle of the last append
    again = open_spool(path)
    assert (again.recovered, again.torn_bytes) == (2, RECORD_HEADER.size + 8 - 3)
    assert again.damaged_ranges == 0 and not again.damaged_copies
    assert "torn tail" in caplog.text and not warnings(caplog)
    again.append(b"after")
    assert drain(again) == [b"record-0", b"record-1", b"after"]


def test_size_bound_refuses(tmp_path):
    spool = open_spool(tmp_path / "s", size_limit=100)
    spool.append(b"x" * 60)
    with pytest.raises(SpoolFull):
        spool.append(b"x" * 60)
    assert len(spool) == 1


@pytest.mark.parametrize("content", [b"short", b"something else entirely, longer than a header"])
def test_not_a_spool_is_kept_aside_and_started_afresh(tmp_path, content):
    (tmp_path / "s").write_bytes(content)
    spool = open_spool(tmp_path / "s")
    assert len(spool) == 0
    assert [p.read_bytes() for p in spool.damaged_copies] == [content]
    spool.append(b"ok")
    assert drain(spool) == [b"ok"]


# ---------------------------------------------------------------- a real hub, SIGKILLed


def start_hub_process(config_path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dcod", "hub", "--config", str(config_path)], stdin=subprocess.DEVNULL
    )


async def connect_when_listening(address: str, audsid: int) -> OracleSession:
    with trio.fail_after(10):
        while True:
            try:
                return await OracleSession.connect(address, audsid=audsid)
            except OSError:
                await trio.sleep(0.02)  # the new process is still starting: nothing to wait on


async def test_queued_requests_survive_sigkill_of_the_hub(make_config, tmp_path):
    config = make_config('[[proxy]]\nid = 1\nhandler = "echo"\n')
    address = config.hub.listen
    spool_dir = config.state_dir / "spool"
    sent = [(rseq, rseq % 3 == 0) for rseq in range(1, 61)]  # (rseq, oneway): 40 sync, 20 one-way

    def body(rseq: int) -> bytes:
        return b"%02d queued while the worker is down" % rseq

    hub = start_hub_process(config.source)
    try:
        session = await connect_when_listening(address, audsid=31)
        for rseq, oneway in sent:
            await session.send(1, rseq, body(rseq), oneway=oneway)
        expected_size = FILE_HEADER.size + len(sent) * (RECORD_HEADER.size + 12 + len(body(0)))
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
        assert [(b, length < 0) for length, _, _, b in arrived] == [(body(rseq), oneway) for rseq, oneway in sent]
        assert all(audsid == 31 for _, audsid, _, _ in arrived)
        # The replies to replayed sync requests go nowhere: a session presenting the audsid may be another one.
        await send_all(hub_side, reply_pdu(31, arrived[0][2], b"answer"))
        await session.send(1, 1, b"new")
        _, _, number, b = await read_pdu(hub_side)
        assert b == b"new"
        await send_all(hub_side, reply_pdu(31, number, b"new answer"))
        assert await session.read() == (22, 31, 1, b"new answer")  # the first thing it gets
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
    old_times = [t for t, _, _ in gone.scan()]
    os.close(gone._fd)  # the hub is killed: its lock goes with it
    other_proxy = open_spool(tmp_path / "proxy-2.222.spool")
    other_proxy.append(b"not for proxy 1")
    os.close(other_proxy._fd)
    ours = spool_dir(tmp_path).open(1)
    ours.append(b"new")
    taken, duplicates = spool_dir(tmp_path).adopt(ours, 1)
    assert [pdu for _, pdu, _ in taken] == [b"old0", b"old1", b"old2"] and duplicates == 0
    assert [t for t, _, _ in ours.scan()][1:] == old_times  # their original queue times are kept
    assert drain(ours) == [b"new", b"old0", b"old1", b"old2"]
    assert not (tmp_path / "proxy-1.222.spool").exists() and (tmp_path / "proxy-2.222.spool").exists()


def test_a_file_that_cannot_be_taken_over_is_reported_once(tmp_path, caplog):
    (tmp_path / "proxy-1.444.spool").mkdir()  # cannot be opened as a file, on every pass
    spools = spool_dir(tmp_path)
    ours = spools.open(1)
    for _ in range(3):
        assert spools.adopt(ours, 1) == ([], 0)
    assert len(warnings(caplog)) == 1 and "cannot take over proxy-1.444.spool" in warnings(caplog)[0]
    assert ours.durable


# ---------------------------------------------------------------- damage: it costs only what it touched

RECORD = RECORD_HEADER.size + 10  # bytes of one record of the files below


def write_spool(path, count: int) -> list[bytes]:
    """A spool file of ``count`` records of 10 bytes, closed as a hub that stops leaves it."""
    spool = open_spool(path)
    records = [b"record-%03d" % i for i in range(count)]
    for r in records:
        spool.append(r)
    spool.close()
    return records


def flip(path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def record_at(i: int) -> int:
    return FILE_HEADER.size + i * RECORD


def skipped_ranges(caplog) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for w in warnings(caplog) for a, b in re.findall(r"offsets (\d+) to (\d+)", w)]


@pytest.mark.parametrize(
    "where", [0, 5, 9, 15, 21, RECORD_HEADER.size + 3], ids=["marker", "crc", "size", "time", "attempts", "pdu"]
)
def test_one_flipped_bit_costs_one_record(tmp_path, caplog, where):
    path = tmp_path / "s"
    records = write_spool(path, 300)
    flip(path, record_at(10) + where, bit=4)
    damaged = path.read_bytes()
    spool = open_spool(path)
    assert (spool.recovered, spool.damaged_ranges, spool.damaged_bytes) == (299, 1, RECORD)
    assert skipped_ranges(caplog) == [(record_at(10), record_at(11))]
    assert [p.read_bytes() for p in spool.damaged_copies] == [damaged]
    assert drain(spool) == records[:10] + records[11:]


def test_two_damaged_ranges_cost_what_they_touched(tmp_path, caplog):
    path = tmp_path / "s"
    records = write_spool(path, 300)
    flip(path, record_at(10) + RECORD_HEADER.size)
    with open(path, "r+b") as f:  # a block of zeros over records 100 to 102 and into 103
        f.seek(record_at(100) + 7)
        f.write(bytes(3 * RECORD))
    spool = open_spool(path)
    assert skipped_ranges(caplog) == [(record_at(10), record_at(11)), (record_at(100), record_at(104))]
    assert spool.damaged_ranges == 2 and len(spool.damaged_copies) == 1
    assert drain(spool) == records[:10] + records[11:100] + records[104:]


def test_a_bad_record_at_the_very_start(tmp_path, caplog):
    path = tmp_path / "s"
    records = write_spool(path, 300)
    flip(path, record_at(0) + 2)
    spool = open_spool(path)
    assert skipped_ranges(caplog) == [(record_at(0), record_at(1))]
    assert drain(spool) == records[1:]


def test_a_damaged_last_record_is_cut_as_damage_not_as_a_torn_tail(tmp_path, caplog):
    path = tmp_path / "s"
    records = write_spool(path, 300)
    flip(path, record_at(299) + RECORD_HEADER.size + 9)
    spool = open_spool(path)
    assert (spool.torn_bytes, spool.damaged_ranges) == (0, 1) and spool.damaged_copies
    assert skipped_ranges(caplog) == [(record_at(299), record_at(300))]
    spool.append(b"after")
    assert drain(spool) == records[:299] + [b"after"]


def set_positions(path, head: int, mark: int = 0) -> None:
    with open(path, "r+b") as f:
        f.write(FILE_HEADER.pack(MAGIC, head, mark))


@pytest.mark.parametrize(
    "head, mark",
    [
        (record_at(300) + 1000, 0),
        (record_at(5) + 7, 0),
        (record_at(5), record_at(2)),
        (record_at(5), record_at(300) + 1),
    ],
    ids=["head past the end", "head inside a record", "mark below the head", "mark past the end"],
)
def test_a_header_that_contradicts_the_file_is_logged_and_everything_is_queued_again(tmp_path, caplog, head, mark):
    path = tmp_path / "s"
    records = write_spool(path, 300)
    set_positions(path, head, mark)
    spool = open_spool(path)
    assert (spool.recovered, spool.possible_duplicates) == (300, 300)  # some were forwarded: which, nobody knows
    assert any(re.search(r"(head|mark) \d+ is (outside|inside)", w) for w in warnings(caplog))
    assert spool.damaged_copies
    spool.close()
    caplog.clear()
    again = open_spool(path)  # the header was put right: no second warning
    assert (again.recovered, again.possible_duplicates) == (300, 300) and not warnings(caplog)
    assert drain(again) == records


def test_a_head_at_a_damaged_record_is_not_taken_for_a_misaligned_one(tmp_path, caplog):
    path = tmp_path / "s"
    write_spool(path, 300)
    set_positions(path, record_at(5))  # five forwarded
    flip(path, record_at(5) + 1)
    spool = open_spool(path)
    assert (spool.recovered, spool.possible_duplicates) == (294, 0)
    assert skipped_ranges(caplog) == [(record_at(5), record_at(6))]
    spool.close()
    caplog.clear()
    assert open_spool(path).recovered == 294 and not warnings(caplog)  # the head moved past the damage


def test_damage_found_while_reading_back_is_skipped(tmp_path, caplog):
    path = tmp_path / "s"
    spool = open_spool(path, memory_limit=100)  # 10 records in memory, the rest read back from the file
    records = [b"record-%03d" % i for i in range(50)]
    for r in records:
        spool.append(r)
    flip(path, record_at(30) + RECORD_HEADER.size)  # after open: the disk went bad
    assert drain(spool) == records[:30] + records[31:]
    assert skipped_ranges(caplog) == [(record_at(30), record_at(31))]
    assert len(spool) == 0 and spool.peek() is None


def old_format_file(path, bodies: list[bytes], forwarded: int) -> None:
    """A spool file as the previous release (b"DCOSPL02") writes it, ``forwarded`` records already forwarded."""
    records = []
    for body in bodies:
        stamp = struct.pack(">d", 1700000000.0)
        records.append(struct.pack(">IId", len(body), zlib.crc32(body, zlib.crc32(stamp)), 1700000000.0) + body)
    head = 24 + sum(map(len, records[:forwarded]))
    path.write_bytes(b"DCOSPL02" + struct.pack(">QQ", head, 0) + b"".join(records))


def test_a_spool_of_the_previous_release_is_recovered_and_replayed(tmp_path):
    path = tmp_path / "s"
    bodies = [b"old-%d" % i for i in range(5)]
    old_format_file(path, bodies, forwarded=1)
    spool = open_spool(path)
    assert spool.recovered == 4 and [t for t, _, _ in spool.scan()] == [1700000000.0] * 4
    spool.append(b"new")  # in the file's own layout while it holds records
    spool.close()
    again = open_spool(path)
    assert drain(again) == bodies[1:] + [b"new"]
    assert path.read_bytes()[:8] == MAGIC  # emptied: from now on, the current layout


def test_spools_of_the_previous_release_are_taken_over(tmp_path):
    old_format_file(tmp_path / "proxy-1.333.spool", [b"old-%d" % i for i in range(3)], forwarded=0)
    ours = spool_dir(tmp_path).open(1)
    taken, _ = spool_dir(tmp_path).adopt(ours, 1)
    assert [pdu for _, pdu, _ in taken] == [b"old-0", b"old-1", b"old-2"]
    assert ours.path.read_bytes()[:8] == MAGIC and drain(ours) == [b"old-0", b"old-1", b"old-2"]


def test_attempts_travel_with_a_record_across_reopening_and_taking_over(tmp_path):
    """The deliveries a request's instance did not survive are in its record: a new hub knows them."""
    directory = spool_dir(tmp_path)
    gone = Spool(tmp_path / "proxy-1.333.spool", memory_limit=1 << 20, size_limit=1 << 30, max_record=1 << 20)
    gone.append(b"fresh")
    gone.append(b"suspect", attempts=2)
    os.close(gone._fd)  # as if killed
    again = open_spool(tmp_path / "proxy-1.333.spool")
    assert [(pdu, attempts) for _, pdu, attempts in again.scan()] == [(b"fresh", 0), (b"suspect", 2)]
    os.close(again._fd)
    ours = directory.open(1)
    taken, _ = directory.adopt(ours, 1)
    assert [attempts for _, _, attempts in taken] == [0, 2]
    assert ours.peek()[2] == 0
    ours.pop()
    assert ours.peek()[1:] == (b"suspect", 2)


def test_a_spool_of_the_release_before_has_records_with_no_attempts(tmp_path):
    path = tmp_path / "s"
    body = b"v3"
    covered = struct.pack(">Id", len(body), 1700000000.0)
    record = b"\xd3\xc0\x5a\x17" + struct.pack(">I", zlib.crc32(body, zlib.crc32(covered))) + covered + body
    path.write_bytes(b"DCOSPL03" + struct.pack(">QQ", 24, 0) + record)
    assert [(pdu, attempts) for _, pdu, attempts in open_spool(path).scan()] == [(b"v3", 0)]


def routed(rseq: int, body: bytes) -> bytes:
    """A one-way request as the hub spools it (the proxy id replaced by the session's audsid)."""
    return forwarded_pdu(77, rseq, body, oneway=True)


async def test_a_hub_delivers_all_but_the_damaged_record_of_a_spool_it_takes_over(make_config, start_hub, caplog):
    config = make_config('[[proxy]]\nid = 1\nhandler = "echo"\n')
    path = config.state_dir / "spool" / "proxy-1.999999.spool"  # left by a hub that is gone
    left = open_spool(path)
    for rseq in range(1, 301):
        left.append(routed(rseq, b"body %03d" % rseq))
    left.close()
    flip(path, FILE_HEADER.size + 9 * (RECORD_HEADER.size + 20) + RECORD_HEADER.size + 15)  # record 10
    worker = await WorkerPeer(str(config.worker_socket(1, 0))).listen()
    hub, _ = await start_hub(config)
    hub_side = await worker.accept()
    arrived = [(await read_pdu(hub_side))[2] for _ in range(299)]
    assert arrived == [r for r in range(1, 301) if r != 10]
    spool = hub.router.proxies[1].spool
    assert (spool.damaged_ranges, hub.router.proxies[1].counters.replayed) == (1, 299)
    assert [p.name for p in spool.damaged_copies] == [p.name for p in path.parent.glob("*.damaged-*")]
    assert not path.exists()


# ---------------------------------------------------------------- a state directory full or read-only


def recovered_copy(spool: Spool, tmp_path) -> list[bytes]:
    """What the next hub would find in the spool's file now (a copy, as the file is locked)."""
    copy = tmp_path / "copy.spool"
    copy.write_bytes(spool.path.read_bytes())
    again = open_spool(copy)
    assert (again.torn_bytes, again.damaged_ranges) == (0, 0)
    records = [pdu for _, pdu, _ in again.scan()]
    again.close()
    copy.unlink()
    return records


def test_a_full_disk_at_open_holds_requests_in_memory_until_there_is_room(tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        (fs / "spool").mkdir()
        filler = fill(fs)
        spool = open_spool(fs / "spool" / "s", memory_limit=100)
        assert not spool.durable and "No space left" in spool.not_durable_reason
        for i in range(4):
            spool.append(b"held-%d" % i)
        assert (len(spool), spool.memory_only) == (4, 4)
        with pytest.raises(SpoolFull):
            spool.append(b"x" * 90)  # past what memory may hold
        assert not spool.retry_durable()
        spool.peek()
        spool.pop()
        spool.commit()
        filler.unlink()
        assert spool.retry_durable() and spool.durable and spool.memory_only == 0
        spool.append(b"durable")
        assert recovered_copy(spool, tmp_path) == [b"held-1", b"held-2", b"held-3", b"durable"]
        assert drain(spool) == [b"held-1", b"held-2", b"held-3", b"durable"]
        spool.close()


def test_a_disk_that_fills_up_keeps_the_order_across_file_and_memory(tmp_path, caplog):
    with tmpfs(tmp_path / "fs") as fs:
        spool = open_spool(fs / "s", memory_limit=20_000)
        body = b"q" * 4000
        sent = []
        while spool.durable:
            sent.append(b"%04d" % len(sent) + body)
            spool.append(sent[-1])
        on_disk = len(sent) - 1
        assert on_disk > 5 and spool.memory_only == 1
        with pytest.raises(SpoolFull):
            while True:
                spool.append(b"%04d" % len(sent) + body)
                sent.append(b"%04d" % len(sent) + body)
        assert spool.memory_bytes <= 20_000 and spool.memory_only == len(sent) - on_disk
        assert len([w for w in warnings(caplog) if "not durable" in w]) == 1
        assert recovered_copy(spool, tmp_path) == sent[:on_disk]  # what is on disk is whole
        out = [bytes(spool.peek()[1])]
        spool.pop()
        spool.commit()
        remount(fs, "size=1m")  # room again
        assert spool.retry_durable()
        assert recovered_copy(spool, tmp_path) == sent[1:]
        spool.append(b"last")
        assert out + drain(spool) == sent + [b"last"]
        spool.close()


def test_a_read_only_state_directory_then_writable_again(tmp_path):
    with tmpfs(tmp_path / "fs") as fs:
        (fs / "spool").mkdir()
        remount(fs, "ro")
        spool = open_spool(fs / "spool" / "s")
        assert not spool.durable and "Read-only file system" in spool.not_durable_reason
        spool.append(b"a")
        spool.append(b"b")
        assert not spool.retry_durable()
        remount(fs, "rw")
        assert spool.retry_durable()
        spool.append(b"c")
        assert recovered_copy(spool, tmp_path) == [b"a", b"b", b"c"]
        assert drain(spool) == [b"a", b"b", b"c"]
        spool.close()


def test_a_state_directory_the_hub_may_not_write(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, to run the check as another user, with a python it may run")
    base = tmp_path / "base"
    base.mkdir()
    state = base / "state"
    state.mkdir(mode=0o500)
    for reachable in (base, tmp_path, tmp_path.parent):  # for nobody to reach, not to write
        reachable.chmod(0o755)
    let_others_reach(Path(dcod.__file__))  # a checkout in a private place (mktemp -d) too
    script = (
        "import sys; from pathlib import Path; from dcod.hub.spool import Spool\n"
        "s = Spool(Path(sys.argv[1]) / 'spool' / 's', memory_limit=100, size_limit=1000, max_record=100)\n"
        "s.append(b'x')\n"
        "print(s.durable, len(s), s.memory_only, s.not_durable_reason)"
    )
    done = subprocess.run(
        ["/usr/bin/python3", "-c", script, str(state)],
        user=65534,  # nobody, and none of root's groups
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(dcod.__file__).parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False 1 1 cannot open it") and "Permission denied" in done.stdout


def test_nothing_is_taken_over_while_not_durable(tmp_path):
    gone = open_spool(tmp_path / "proxy-1.222.spool")
    gone.append(b"old")
    os.close(gone._fd)
    with tmpfs(tmp_path / "fs") as fs:
        remount(fs, "ro")
        ours = SpoolDir(fs, memory_limit=1 << 20, size_limit=1 << 30, max_record=1 << 20).open(1)
        assert spool_dir(tmp_path).adopt(ours, 1) == ([], 0)
    assert (tmp_path / "proxy-1.222.spool").exists()


# ---------------------------------------------------------------- the spool of a proxy a reload removed


def test_the_spools_of_a_removed_proxy_are_set_aside_and_never_adopted(tmp_path):
    for pid, count in ((222, 3), (223, 0)):
        gone = open_spool(tmp_path / f"proxy-5.{pid}.spool")
        for i in range(count):
            gone.append(b"left-%d" % i)
        os.close(gone._fd)
    running = open_spool(tmp_path / "proxy-5.224.spool")  # a hub that still serves it
    running.append(b"still served")
    aside = spool_dir(tmp_path).set_aside(5)
    assert [(p.name.split(".removed-")[0], n) for p, n in aside] == [("proxy-5.222.spool", 3)]
    assert not (tmp_path / "proxy-5.222.spool").exists() and not (tmp_path / "proxy-5.223.spool").exists()
    assert (tmp_path / "proxy-5.224.spool").exists()
    later = spool_dir(tmp_path).open(5)  # a proxy added later with the same id
    running.close()
    taken, _ = spool_dir(tmp_path).adopt(later, 5)
    assert [pdu for _, pdu, _ in taken] == [b"still served"]
    assert [pdu for _, pdu, _ in open_spool(aside[0][0]).scan()] == [b"left-0", b"left-1", b"left-2"]


def test_a_hubs_own_spool_set_aside(tmp_path):
    spool = open_spool(tmp_path / "proxy-6.1.spool")
    spool.append(b"left")
    aside = spool.set_aside()
    assert aside.name.startswith("proxy-6.1.spool.removed-") and not (tmp_path / "proxy-6.1.spool").exists()
    empty = open_spool(tmp_path / "proxy-7.1.spool")
    assert empty.set_aside() is None and not list(tmp_path.glob("proxy-7*"))
