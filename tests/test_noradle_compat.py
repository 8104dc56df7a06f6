"""dcod against Node.js peers that emulate Noradle's own ext_hub.js and dco_proxy.js on the wire.

The peers (tests/noradle/*.js) were written from the protocol description, quirks included:
the worker drops bytes 4..12 of a first chunk that holds more than the 4-byte magic and
writes its quit notice with length 6; the hub takes any 12-byte PDU for a quit notice.
Both print one JSON event per line on stdout, which is how the tests follow them.
Every request an Oracle session sends is accounted for: a sync one by its reply (or an
error reply), a one-way one by the worker's record of it.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from conftest import free_port, wait_for
from peers import OracleSession
from runs import dcod_worker_command

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) not found on PATH: the Noradle peers need it")

NORADLE = Path(__file__).parent / "noradle"
AUDSID = 0xF0000001  # above 2**31: travels unsigned
SIZES = (0, 1, 100, 70000)
DEADLINE = 10.0  # no wait in these tests may take longer
# A peer event that means dcod broke the original's expectations: the test fails at once.
FATAL = {"quirk", "garbage", "bad_magic", "orphan", "dropped"}


def body_of(rseq: int, size: int) -> bytes:
    body = random.Random(rseq).randbytes(size)
    return b"x" + body[1:] if body.startswith(b"hold") else body


class Child:
    """A child process printing one JSON event per stdout line; ``pump()`` collects them."""

    def __init__(self, name: str, process: trio.Process, stderr: Path) -> None:
        self.name = name
        self.process = process
        self.stderr = stderr
        self.events: list[dict] = []
        self.eof = False
        self._taken: set[int] = set()
        self._changed = trio.Event()

    async def pump(self) -> None:
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                self.events.append(event)
                if event["event"] in FATAL:
                    raise AssertionError(f"{self.name}: {event}\n{self.stderr.read_text()}")
            self._changed.set()
            self._changed = trio.Event()
        self.eof = True
        self._changed.set()

    async def expect(self, kind: str, **fields) -> dict:
        """The first event of this kind with these fields not returned before; waits for it."""
        with trio.fail_after(DEADLINE):
            while True:
                for i, event in enumerate(self.events):
                    if i not in self._taken and event["event"] == kind and fields.items() <= event.items():
                        self._taken.add(i)
                        return event
                if self.eof:
                    raise AssertionError(
                        f"{self.name} ended without {kind} {fields}: {self.events}\n{self.stderr.read_text()}"
                    )
                await self._changed.wait()

    def all(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    async def send_line(self, line: str) -> None:
        await self.process.stdin.send_all(line.encode() + b"\n")


@asynccontextmanager
async def spawn(name: str, argv: list[str], tmp_path: Path):
    stderr = tmp_path / f"{name}.stderr"
    with open(stderr, "wb") as err:
        process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    child = Child(name, process, stderr)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child.pump)
            yield child
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        print(f"--- {name} stderr:\n{stderr.read_text()}")


class Ledger:
    """What one Oracle session sent, and what became of it."""

    def __init__(self, session: OracleSession, proxy: int) -> None:
        self.session = session
        self.proxy = proxy
        self.rseq = 0
        self.sync: dict[int, bytes] = {}  # rseq -> body, awaiting a reply
        self.oneway: dict[int, bytes] = {}
        self.answered: dict[int, tuple] = {}

    async def send(self, body: bytes, oneway: bool = False) -> int:
        self.rseq += 1
        (self.oneway if oneway else self.sync)[self.rseq] = body
        await self.session.send(self.proxy, self.rseq, body, oneway)
        return self.rseq

    async def send_sizes(self) -> None:
        for size in SIZES:
            await self.send(body_of(self.rseq + 1, size))
            await self.send(body_of(self.rseq + 1, size), oneway=True)

    async def read(self, count: int, reply=lambda body: body) -> None:
        """Read ``count`` replies; each must be the expected reply to a sync request not yet answered."""
        with trio.fail_after(DEADLINE):
            for _ in range(count):
                length, audsid, rseq, body = await self.session.read()
                assert rseq in self.sync and rseq not in self.answered, f"unexpected reply to rseq {rseq}"
                self.answered[rseq] = (length, audsid, body)
                if length > 0:  # error replies are checked by the test
                    expected = reply(self.sync[rseq])
                    assert (length, audsid, body) == (12 + len(expected), AUDSID, expected), f"reply to rseq {rseq}"

    def check_worker_saw(self, events: list[dict], rseqs, *, renumbered: bool = True) -> None:
        """Each of these requests reached the worker exactly once, whole. Behind a dcod hub
        (``renumbered``) the worker sees the hub's numbers, each request its own, not the session's."""
        seen = [(e["rseq"], e["len"], e["audsid"], e["body"]) for e in events]
        expected = []
        for rseq in rseqs:
            body = self.sync.get(rseq, self.oneway.get(rseq))
            length = 12 + len(body)
            expected.append((rseq, length if rseq in self.sync else -length, AUDSID, len(body)))
        if renumbered:
            assert len({rseq for rseq, *_ in seen}) == len(seen)
            seen, expected = [s[1:] for s in seen], [e[1:] for e in expected]
        assert sorted(seen) == sorted(expected)


# ---------------------------------------------------------------- Noradle worker behind dcod's hub


async def noradle_behind_hub(make_config, start_hub, tmp_path):
    """An in-process dcod hub whose proxy 1 is the Node worker's port, and a session on it."""
    port = free_port()
    config = make_config(f'[[proxy]]\nid = 1\naddress = "127.0.0.1:{port}"\n')
    hub, address = await start_hub(config)
    session = await OracleSession.connect(address, audsid=AUDSID)
    return hub, Ledger(session, 1), [NODE, str(NORADLE / "worker.js"), str(port)]


def noradle(body: bytes) -> bytes:
    return b"noradle:" + body


async def test_noradle_worker_behind_dcod_hub(make_config, start_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dcod.hub")
    hub, ledger, argv = await noradle_behind_hub(make_config, start_hub, tmp_path)
    proxy = hub.router.proxies[1]
    async with spawn("worker.js", argv, tmp_path) as worker:
        await worker.expect("listening")
        assert (await worker.expect("handshake"))["first_chunk"] == 4
        await ledger.send_sizes()
        await ledger.read(4, noradle)
        await ledger.send_sizes()
        await ledger.read(4, noradle)

        # SIGTERM with one request in flight at the worker.
        held = await ledger.send(b"hold on")
        await worker.expect("held")
        worker.process.send_signal(signal.SIGTERM)
        await worker.expect("quit", hubs=1)
        await wait_for(lambda: any("worker 1#0 is quitting" in r.getMessage() for r in caplog.records))
        # Sent after the quit notice: queued, not dispatched to the quitting worker.
        late = [await ledger.send(b"after quit"), await ledger.send(b"after quit, one-way", oneway=True)]
        await wait_for(lambda: len(proxy.spool) == 2)
        # Noradle's worker (no allowHalfOpen) would close at once on a half-close and lose the
        # reply; the hub leaves a length-6 quitter's connection alone, so the reply arrives.
        await worker.send_line("release")
        await ledger.read(1, noradle)
        length, audsid, body = ledger.answered[held]
        assert length > 0 and audsid == AUDSID and body == b"noradle:hold on"
        assert await worker.process.wait() == 0
    assert len(worker.all("connection")) == 1 and not worker.all("socket_error")
    ledger.check_worker_saw(worker.all("request"), range(1, held + 1))

    # Every request accounted for: 17 reached the worker once and were answered (sync) or
    # handled (one-way); the 2 sent after the quit notice are queued for the next worker.
    assert ledger.rseq == 19 and len(worker.all("request")) == 17
    assert sorted(ledger.answered) == sorted(set(ledger.sync) - {late[0]})
    counters = proxy.counters
    assert (counters.requests, counters.oneway, counters.replies, counters.worker_lost) == (19, 9, 9, 0)
    assert counters.orphan_replies == 0 and hub.router.inflight == 1 and len(proxy.spool) == 2
    ledger.session.close()


async def test_requests_queued_before_noradle_worker_starts_arrive_intact(make_config, start_hub, tmp_path):
    hub, ledger, argv = await noradle_behind_hub(make_config, start_hub, tmp_path)
    proxy = hub.router.proxies[1]
    await ledger.send_sizes()
    await wait_for(lambda: len(proxy.spool) == 8)
    async with spawn("worker.js", argv, tmp_path) as worker:
        await worker.expect("listening")
        assert (await worker.expect("handshake"))["first_chunk"] == 4
        await ledger.read(4, noradle)
        for _ in range(ledger.rseq):
            await worker.expect("request")
    ledger.check_worker_saw(worker.all("request"), range(1, 9))
    assert sorted(ledger.answered) == sorted(ledger.sync) and len(worker.all("request")) == ledger.rseq == 8
    assert len(proxy.spool) == 0 and hub.router.inflight == 0
    ledger.session.close()


# ---------------------------------------------------------------- dcod's worker behind Noradle's hub

HELD_ECHO = '''\
"""dcod's echo handler, recording each request on stdout; a body starting with "hold" waits for a stdin line."""
import json
import sys

import trio

from dcod.worker.handlers import echo

_released = None


def emit(**event):
    print(json.dumps(event), flush=True)


def init():
    emit(event="ready")  # the listening socket is bound by now


async def handle(req):
    global _released
    size = 12 + len(req.body)
    emit(event="request", len=size if req.sync else -size, audsid=req.audsid, rseq=req.rseq, body=len(req.body))
    if req.body.startswith(b"hold"):
        emit(event="held", rseq=req.rseq)
        if _released is None:
            _released = trio.Event()
            await trio.to_thread.run_sync(sys.stdin.readline)
            _released.set()
        await _released.wait()
    return await echo.handle(req)
'''


async def test_dcod_worker_behind_noradle_hub(make_config, tmp_path):
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "held_echo.py").write_text(HELD_ECHO)
    make_config(f'[[proxy]]\nid = 1\nhandler = "held_echo:handle"\nhandler_path = ["{handlers}"]\n')
    wport = free_port()
    worker_argv = dcod_worker_command(tmp_path / "dcod.toml", f"127.0.0.1:{wport}")

    async with spawn("ext_hub.js", [NODE, str(NORADLE / "ext_hub.js"), "0", f"1=127.0.0.1:{wport}"], tmp_path) as hub:
        async with spawn("dcod-worker", worker_argv, tmp_path) as worker:
            await worker.expect("ready")
            port = (await hub.expect("listening"))["port"]
            await hub.expect("worker_connected", proxy=1)
            session = await OracleSession.connect(f"127.0.0.1:{port}", audsid=AUDSID)
            ledger = Ledger(session, 1)
            await hub.expect("session", audsid=AUDSID)
            # No empty-bodied sync reply here: Noradle's hub would take "12, audsid, rseq" for a quit notice.
            # That is also why one-way requests get no ack: only a dcod hub asks for them (ACK_ONEWAY).
            for size in SIZES:
                if size:
                    await ledger.send(body_of(ledger.rseq + 1, size))
                await ledger.send(body_of(ledger.rseq + 1, size), oneway=True)
            await ledger.read(3)
            for rseq in ledger.oneway:
                await worker.expect("request", rseq=rseq)

            # SIGTERM with one request in flight: quit notice 12, 0, 0; the hub half-closes; the reply still comes.
            held = await ledger.send(b"hold on")
            await worker.expect("held", rseq=held)
            worker.process.send_signal(signal.SIGTERM)
            quit = await hub.expect("quit", proxy=1)
            assert (quit["len"], quit["audsid"], quit["rseq"]) == (12, 0, 0)
            late = await ledger.send(b"after quit")
            await hub.expect("queued", rseq=late)  # Noradle's hub no longer sends it to the quitting worker
            await worker.send_line("release")
            await ledger.read(1)
            assert await worker.process.wait() == 0
            await hub.expect("worker_closed", proxy=1)
        assert len(worker.all("request")) == 8
        ledger.check_worker_saw(worker.all("request"), range(1, 9), renumbered=False)

        # A new dcod worker on the same port: Noradle's hub reconnects and sends what it queued.
        async with spawn("dcod-worker#2", worker_argv, tmp_path) as worker2:
            await hub.expect("worker_connected", proxy=1, queued=1)
            await ledger.read(1)
            worker2.process.send_signal(signal.SIGTERM)
            assert await worker2.process.wait() == 0
        ledger.check_worker_saw(worker2.all("request"), [late], renumbered=False)

    assert sorted(ledger.answered) == sorted(ledger.sync)
    assert all(length > 0 for length, _, _ in ledger.answered.values())
    assert len(ledger.sync) + len(ledger.oneway) == ledger.rseq == 9
    session.close()
