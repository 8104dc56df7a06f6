"""The worker runtime, driven from the hub's side of the wire by a byte-level peer (tests/peers.py:
struct and raw sockets, not dcod.protocol), on real Unix sockets.

Where a test needs "the worker has read everything sent so far", it uses
trio.testing.wait_all_tasks_blocked(): the worker runs in the test's own trio run, and on a
Unix socket sent bytes are readable at once, so when every task is blocked, the worker has
consumed them.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from dcod.net import sockets
from dcod.worker.runtime import Handler, HandlerError, Request, Worker, load_handler
from peers import (
    ACK_ONEWAY,
    HEADER,
    HUB_HANDSHAKE,
    ORACLE_MAGIC,
    QUIT_NOTICE,
    TAKES_ERROR_REPLIES,
    OracleSession,
    connected_hub,
    forwarded_pdu,
    reply_pdu,
)


@dataclass
class Served:
    worker: Worker
    path: str
    clean: bool | None = None  # what serve() returned, once it has

    def hub(self, magic: bytes = HUB_HANDSHAKE):
        return connected_hub(self.path, magic)


@asynccontextmanager
async def serving(tmp_path: Path, handler, **options):
    """A Worker serving ``handler`` (a Handler or a handle function) on a Unix socket; stopped on exit."""
    served = Served(
        Worker(handler if isinstance(handler, Handler) else Handler(handler), **{"stop_timeout": 5.0, **options}),
        str(tmp_path / "worker.sock"),
    )

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        served.clean = await served.worker.serve(sockets.bind(served.path), task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        yield served
        served.worker.stop()


async def echo(req: Request) -> bytes:
    return req.body


class Gate:
    """A handler that holds every request until opened, and records how many it held at once."""

    def __init__(self) -> None:
        self.opened = trio.Event()
        self.running = 0
        self.peak = 0

    async def handle(self, req: Request) -> bytes:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.opened.wait()
        finally:
            self.running -= 1
        return req.body


# ---------------------------------------------------------------- requests and replies


async def test_sync_request_gets_its_body_back_byte_exact(tmp_path):
    body = bytes(range(256)) * 3
    async with serving(tmp_path, echo) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(3_000_000_000, 2**31 - 1, body))  # an audsid beyond int32 travels unsigned
        assert await hub.read_pdu() == reply_pdu(3_000_000_000, 2**31 - 1, body)


async def test_empty_body_gets_an_empty_reply_not_a_quit_notice(tmp_path):
    async with serving(tmp_path, echo) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(77, 1, b""))
        assert await hub.read_pdu() == HEADER.pack(12, 77, 1)


@pytest.mark.parametrize(
    "result, body", [("h\u00e9llo", "h\u00e9llo".encode()), (None, b""), (bytearray(b"ba"), b"ba")]
)
async def test_handler_results_become_reply_bodies(tmp_path, result, body):
    async def handle(req):
        return result

    async with serving(tmp_path, handle) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(5, 9, b"anything"))
        assert await hub.read_pdu() == reply_pdu(5, 9, body)


@pytest.mark.parametrize("acked", [False, True])
async def test_oneway_request_runs_and_gets_no_reply_only_an_ack_if_asked(tmp_path, acked):
    seen = []

    async def handle(req):
        seen.append((req.audsid, req.rseq, req.body, req.sync))
        return b"not for a one-way request"

    async with serving(tmp_path, handle) as served:
        async with served.hub() as hub:
            await hub.send(
                (ACK_ONEWAY if acked else b"") + forwarded_pdu(8, 1, b"fire", oneway=True) + forwarded_pdu(8, 2, b"ask")
            )
            await hub.half_close()
            # The worker answers all it read before closing: a reply to the one-way would be here.
            assert sorted(await hub.pdus_until_closed()) == sorted(
                [reply_pdu(8, 2, b"not for a one-way request"), *([reply_pdu(8, 1)] if acked else [])]
            )
        # The ack request is not a request: the handler never sees it.
        assert sorted(seen) == [(8, 1, b"fire", False), (8, 2, b"ask", True)]
        stats = served.worker.stats()
        assert (stats["requests"], stats["oneway"], stats["replies"], stats["acks"]) == (2, 1, 1, acked)


async def test_oneway_requests_are_acked_once_handled(tmp_path):
    oneway = [(audsid, rseq) for audsid in (3, 3_000_000_000) for rseq in (1, 2, 3)]
    seen, handled, release = [], [], trio.Event()

    async def handle(req):
        seen.append((req.audsid, req.rseq))
        if not req.sync:
            await release.wait()
            handled.append((req.audsid, req.rseq))
        return req.body

    async with serving(tmp_path, handle) as served, served.hub() as hub:
        await hub.send(
            ACK_ONEWAY + b"".join(forwarded_pdu(audsid, rseq, b"fire", oneway=True) for audsid, rseq in oneway)
        )
        await wait_all_tasks_blocked()  # all read, all held in the handler
        # This reply comes out after anything sent so far: an ack on receipt would be first.
        await hub.send(forwarded_pdu(3, 4, b"ask"))
        assert await hub.read_pdu() == reply_pdu(3, 4, b"ask")
        release.set()
        assert sorted([await hub.read_pdu() for _ in oneway]) == sorted(
            reply_pdu(audsid, rseq) for audsid, rseq in oneway
        )
        assert sorted(handled) == sorted(oneway)
        assert sorted(seen) == sorted([*oneway, (3, 4)])
        assert served.worker.stats()["acks"] == len(oneway)


async def test_ack_request_counts_only_as_the_first_pdu(tmp_path):
    # Later, it is no more than a request (an empty one, with an rseq no session sends).
    async with serving(tmp_path, echo) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(5, 1, b"first") + ACK_ONEWAY + forwarded_pdu(5, 2, b"fire", oneway=True))
        await hub.half_close()
        assert sorted(await hub.pdus_until_closed()) == sorted([reply_pdu(5, 1, b"first"), reply_pdu(0, -1)])


async def test_pdus_split_at_every_byte_or_coalesced_are_all_served(tmp_path):
    requests = [
        forwarded_pdu(4, 1, b"first"),
        forwarded_pdu(4, 2),
        forwarded_pdu(4, 3, b"x" * 300),
        forwarded_pdu(4, 4, b"one-way", oneway=True),
        forwarded_pdu(4, 5, b"last"),
    ]
    expected = sorted(
        [reply_pdu(4, 1, b"first"), reply_pdu(4, 2), reply_pdu(4, 3, b"x" * 300), reply_pdu(4, 5, b"last")]
    )
    stream = HUB_HANDSHAKE + b"".join(requests)
    async with serving(tmp_path, echo) as served:
        async with served.hub(magic=b"") as byte_by_byte, served.hub(magic=b"") as coalesced:
            for i in range(len(stream)):
                await byte_by_byte.send(stream[i : i + 1])
                await wait_all_tasks_blocked()  # the worker has read this byte alone
            await coalesced.send(stream)
            for hub in (byte_by_byte, coalesced):
                await hub.half_close()
                assert sorted(await hub.pdus_until_closed()) == expected


async def test_pdu_of_exactly_max_pdu_is_served(tmp_path):
    body = b"m" * (1024 - 12)
    async with serving(tmp_path, echo, max_pdu=1024) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(1, 1, body))
        assert await hub.read_pdu() == reply_pdu(1, 1, body)


# ---------------------------------------------------------------- failures


async def _raise_value_error(req):
    raise ValueError("boom: " + req.body.decode())


async def _return_int(req):
    return 42


async def _return_too_much(req):
    return b"r" * 1024


@pytest.mark.parametrize(
    "handle, text",
    [
        (_raise_value_error, b"DCO-0006 ValueError: boom: please"),
        (_return_int, b"DCO-0006 TypeError: handler returned int, not bytes, str or None"),
        (_return_too_much, b"DCO-0006 ReplyTooLarge: reply of 1024 bytes does not fit in max_pdu 1024"),
    ],
)
async def test_failed_sync_request_gets_an_error_reply(tmp_path, handle, text):
    async with serving(tmp_path, handle, max_pdu=1024) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(6, 3, b"please"))
        assert await hub.read_pdu() == reply_pdu(6, 3, text, error=True)
        assert served.worker.stats()["errors"] == 1


@pytest.mark.parametrize("acked", [False, True])
async def test_failed_oneway_request_is_logged_counted_and_acked_if_asked(tmp_path, caplog, acked):
    async with serving(tmp_path, _raise_value_error) as served:
        async with served.hub() as hub:
            await hub.send((ACK_ONEWAY if acked else b"") + forwarded_pdu(7, 2, b"quietly", oneway=True))
            await hub.half_close()
            # Acked all the same: sent again, it would fail again.
            assert await hub.pdus_until_closed() == ([reply_pdu(7, 2)] if acked else [])
        assert served.worker.stats()["errors"] == 1
    assert "one-way request (audsid 7, rseq 2) failed: ValueError: boom: quietly" in caplog.text


async def test_failed_sync_request_is_logged_with_its_key_and_the_traceback(tmp_path, caplog):
    async with serving(tmp_path, _raise_value_error) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(8, 4, b"loudly"))
        assert await hub.read_pdu() == reply_pdu(8, 4, b"DCO-0006 ValueError: boom: loudly", error=True)
    # Not "failed" in any message: this test's own directory, in "serving on ...", has the word.
    [record] = [r for r in caplog.records if r.name == "dcod.worker.runtime" and "request (audsid" in r.getMessage()]
    assert record.getMessage() == "sync request (audsid 8, rseq 4) failed: ValueError: boom: loudly"
    assert record.exc_info[0] is ValueError  # the traceback goes to the log, not to the session


async def test_a_flood_of_failures_logs_the_first_with_its_traceback_and_counts_the_rest(tmp_path, caplog):
    async with serving(tmp_path, _raise_value_error) as served, served.hub() as hub:
        for rseq in range(1, 501):
            await hub.send(forwarded_pdu(9, rseq, b"again"))
        for _ in range(500):
            await hub.read_pdu()
        assert served.worker.stats()["errors"] == 500
    records = [r for r in caplog.records if r.name == "dcod.worker.runtime" and "request (audsid" in r.getMessage()]
    assert [r.getMessage() for r in records] == ["sync request (audsid 9, rseq 1) failed: ValueError: boom: again"]
    assert records[0].exc_info[0] is ValueError


async def test_handler_failure_in_the_journal_names_the_instance_and_request_on_each_line(run, tmp_path, monkeypatch):
    """Under systemd (JOURNAL_STREAM set) each line of the traceback is an entry of its own: each
    carries the priority and the instance's name."""
    (tmp_path / "failing.py").write_text(
        "async def handle(req):\n    return parse(req.body)\n\n\n"
        "def parse(body):\n    raise ValueError(f'cannot parse {body!r}')\n"
    )
    monkeypatch.setenv("JOURNAL_STREAM", "0:0")
    r = run(f'[[proxy]]\nid = 1\nhandler = "failing:handle"\nhandler_path = ["{tmp_path}"]\ninstances = 1\n')
    await r.notification("READY=1")
    session = await OracleSession.connect(r.config.hub.listen, audsid=31, sid=TAKES_ERROR_REPLIES)
    try:
        await session.send(1, 7, b"x")
        length, _, rseq, body = await session.read()
    finally:
        session.close()
    assert (length < 0, rseq, body) == (True, 7, b"DCO-0006 ValueError: cannot parse b'x'")
    lines = r.log.splitlines()
    # The worker sees the hub's number for the request, not the session's rseq (docs/ARCHITECTURE.md §2.2).
    failed = re.compile(r"<4>worker 1#0: sync request \(audsid 31, rseq \d+\) failed: ValueError: cannot parse b'x'")
    [start] = [i for i, line in enumerate(lines) if failed.fullmatch(line)]
    traceback = lines[start + 1 : start + 1 + lines[start + 1 :].index("<4>worker 1#0: ValueError: cannot parse b'x'")]
    assert traceback[0] == "<4>worker 1#0: Traceback (most recent call last):"
    assert all(line.startswith("<4>worker 1#0: ") for line in traceback)
    assert any(line.endswith(", in parse") for line in traceback), traceback


async def test_bad_magic_closes_only_that_connection(tmp_path):
    async with serving(tmp_path, echo) as served:
        async with served.hub() as good, served.hub(magic=struct.pack(">i", ORACLE_MAGIC)) as bad:
            await good.send(forwarded_pdu(1, 1, b"before"))
            assert await good.read_pdu() == reply_pdu(1, 1, b"before")
            assert await bad.pdus_until_closed() == []
            await good.send(forwarded_pdu(1, 2, b"after"))
            assert await good.read_pdu() == reply_pdu(1, 2, b"after")
        assert served.worker.stats()["protocol_errors"] == 1


@pytest.mark.parametrize("length", [0, 11, -11, 1025, -1025])
async def test_pdu_length_out_of_bounds_closes_only_that_connection(tmp_path, length):
    async with serving(tmp_path, echo, max_pdu=1024) as served:
        async with served.hub() as good, served.hub() as bad:
            await bad.send(HEADER.pack(length, 1, 1) + b"x" * 20)
            assert await bad.pdus_until_closed() == []
            await good.send(forwarded_pdu(1, 1, b"unaffected"))
            assert await good.read_pdu() == reply_pdu(1, 1, b"unaffected")
        assert served.worker.stats()["protocol_errors"] == 1


# ---------------------------------------------------------------- concurrency and hubs


async def test_concurrency_limit_is_shared_by_all_hubs(tmp_path):
    gate = Gate()
    async with serving(tmp_path, gate.handle, concurrency=3) as served:
        async with served.hub() as old, served.hub() as new:
            await old.send(b"".join(forwarded_pdu(1, rseq, b"old") for rseq in range(1, 6)))
            await new.send(b"".join(forwarded_pdu(2, rseq, b"new") for rseq in range(1, 6)))
            await wait_all_tasks_blocked()
            assert gate.running == 3
            assert served.worker.stats()["inflight"] == 3
            gate.opened.set()
            for hub, audsid, body in ((old, 1, b"old"), (new, 2, b"new")):
                assert sorted([await hub.read_pdu() for _ in range(5)]) == sorted(
                    reply_pdu(audsid, rseq, body) for rseq in range(1, 6)
                )
    assert gate.peak == 3


async def test_handlers_that_never_wait_share_one_task(tmp_path):
    tasks = []

    async def handle(req):
        tasks.append(trio.lowlevel.current_task())
        return req.body

    async with serving(tmp_path, handle) as served, served.hub() as hub:
        await hub.send(b"".join(forwarded_pdu(1, rseq, b"x") for rseq in range(1, 11)))
        assert [await hub.read_pdu() for _ in range(10)] == [reply_pdu(1, rseq, b"x") for rseq in range(1, 11)]
    assert len(tasks) == 10 and len(set(tasks)) == 1  # no task spawned per request


async def test_each_request_runs_in_a_context_of_its_own(tmp_path):
    seen = contextvars.ContextVar("seen", default=b"unset")

    async def handle(req):
        before = seen.get()
        seen.set(req.body)  # must not leak into the next request on the same runner
        await trio.lowlevel.checkpoint()
        return before + b" " + seen.get()

    async with serving(tmp_path, handle) as served, served.hub() as hub:
        await hub.send(b"".join(forwarded_pdu(1, rseq, b"r%d" % rseq) for rseq in range(1, 4)))
        assert sorted([await hub.read_pdu() for _ in range(3)]) == sorted(
            reply_pdu(1, rseq, b"unset r%d" % rseq) for rseq in range(1, 4)
        )


async def test_saturated_worker_stops_reading(tmp_path):
    gate = Gate()
    count = 5000
    async with serving(tmp_path, gate.handle, concurrency=1) as served, served.hub() as hub:
        hub.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # so that it fills up soon
        sent_all = trio.Event()

        async def send_requests():
            await hub.send(b"".join(forwarded_pdu(1, rseq) for rseq in range(1, count + 1)))
            sent_all.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_requests)
            await wait_all_tasks_blocked()
            # Everything is blocked and the sender is not done: the worker has stopped reading.
            assert not sent_all.is_set()
            assert served.worker.stats()["requests"] == 1
            gate.opened.set()
            assert [await hub.read_pdu() for _ in range(count)] == [reply_pdu(1, rseq) for rseq in range(1, count + 1)]
    assert gate.peak == 1


async def test_two_hubs_get_their_own_replies(tmp_path):
    async with serving(tmp_path, echo) as served:
        async with served.hub() as old, served.hub() as new:
            # During a rollout both hubs may carry the same session: same audsid, same rseq.
            await old.send(forwarded_pdu(9, 1, b"via old"))
            await new.send(forwarded_pdu(9, 1, b"via new"))
            assert await new.read_pdu() == reply_pdu(9, 1, b"via new")
            assert await old.read_pdu() == reply_pdu(9, 1, b"via old")
            assert served.worker.stats()["hubs"] == 2


# ---------------------------------------------------------------- lifecycle


async def test_init_before_serving_and_done_after_the_last_request(tmp_path):
    events = []

    def init():
        events.append("init")

    async def handle(req):
        events.append("handle")
        return req.body

    async def done():
        await trio.lowlevel.checkpoint()
        events.append("done")

    async with serving(tmp_path, Handler(handle, init, done)) as served:
        assert events == ["init"]
        async with served.hub() as hub:
            await hub.send(forwarded_pdu(1, 1, b"x"))
            assert await hub.read_pdu() == reply_pdu(1, 1, b"x")
    assert events == ["init", "handle", "done"]


async def test_failing_init_stops_the_worker_before_it_serves(tmp_path):
    def init():
        raise RuntimeError("no database")

    with sockets.bind(str(tmp_path / "worker.sock")) as listener:
        with pytest.raises(HandlerError, match=r"^init\(\) failed: RuntimeError: no database$"):
            await Worker(Handler(echo, init=init)).serve(listener)


async def test_second_stop_stops_reading_but_finishes_requests_in_flight(tmp_path):
    gate = Gate()
    async with serving(tmp_path, gate.handle) as served:
        async with served.hub() as hub:
            await hub.send(forwarded_pdu(5, 1, b"in flight"))
            await wait_all_tasks_blocked()
            served.worker.stop()
            assert await hub.read_pdu() == QUIT_NOTICE
            served.worker.stop()
            await hub.send(forwarded_pdu(5, 2, b"never read"))
            gate.opened.set()
            # No half-close from this hub, yet the worker answers and closes.
            assert await hub.pdus_until_closed() == [reply_pdu(5, 1, b"in flight")]
    assert served.clean is True


async def test_stop_timeout_gives_up_on_requests_in_flight(tmp_path):
    async def handle(req):
        await trio.sleep_forever()

    async with serving(tmp_path, handle, stop_timeout=0.2) as served:
        async with served.hub() as hub:
            await hub.send(forwarded_pdu(5, 1, b"never answered"))
            await wait_all_tasks_blocked()
            served.worker.stop()
            assert await hub.read_pdu() == QUIT_NOTICE
            assert await hub.pdus_until_closed() == []
    assert served.clean is False
    assert served.worker.stats()["abandoned"] == 1


async def test_oneway_request_cut_short_at_stop_timeout_is_not_acked(tmp_path):
    async def handle(req):
        if req.body == b"forever":
            await trio.sleep_forever()

    async with serving(tmp_path, handle, stop_timeout=0.2) as served:
        async with served.hub() as hub:
            await hub.send(
                ACK_ONEWAY + forwarded_pdu(5, 1, b"quick", oneway=True) + forwarded_pdu(5, 2, b"forever", oneway=True)
            )
            assert await hub.read_pdu() == reply_pdu(5, 1)
            await wait_all_tasks_blocked()
            served.worker.stop()
            assert await hub.read_pdu() == QUIT_NOTICE
            # No ack for rseq 2: the hub is to send it again, to another instance.
            assert await hub.pdus_until_closed() == []
    assert served.clean is False
    stats = served.worker.stats()
    assert (stats["abandoned"], stats["acks"]) == (1, 1)


# The handler of the subprocess worker below, loaded as f"{__name__}:gated_echo" with this
# module's init() and done() as its hooks. A body of "gate" waits for a byte on stdin.


def init():
    print("init() called", file=sys.stderr, flush=True)


async def done():
    print("done() called", file=sys.stderr, flush=True)


async def gated_echo(req: Request) -> bytes:
    if req.body == b"gate":
        print("gate entered", file=sys.stderr, flush=True)
        async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
            await stdin.receive_some(1)
    return req.body


class Lines:
    """Lines read from a process's stderr, for waiting on log messages."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""

    async def wait_for(self, needle: str) -> None:
        while needle not in self.text:
            data = await self.stream.receive_some()
            assert data, f"stderr ended before {needle!r}:\n{self.text}"
            self.text += data.decode()

    async def rest(self) -> str:
        while data := await self.stream.receive_some():
            self.text += data.decode()
        return self.text


async def test_sigterm_drains_hubs_and_exits_0(tmp_path):
    runtime_dir = tmp_path / "run"  # not there yet: the worker creates it
    config_file = tmp_path / "dcod.toml"
    config_file.write_text(
        f'[supervisor]\nruntime_dir = "{runtime_dir}"\n\n[[proxy]]\nid = 1\nhandler = "{__name__}:gated_echo"\n'
    )
    script = (
        "import sys; from dcod import config, log; from dcod.worker import runtime as worker; log.setup('worker 1#0'); "
        "sys.exit(worker.main(config.load(sys.argv[1]), 1))"
    )
    tests_dir = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), str(tests_dir.parent), env.get("PYTHONPATH", "")])
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", script, str(config_file)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    stderr = Lines(process.stderr)
    try:
        with trio.fail_after(10):
            await stderr.wait_for("worker 1#0: INFO: serving on ")
            assert "init() called" in stderr.text
            async with connected_hub(str(runtime_dir / "worker-1-0.sock")) as hub:
                await hub.send(forwarded_pdu(11, 1, b"gate"))
                await stderr.wait_for("gate entered")
                process.send_signal(signal.SIGTERM)
                assert await hub.read_pdu() == QUIT_NOTICE
                await hub.send(forwarded_pdu(11, 2, b"crossed the quit notice"))
                await hub.half_close()
                await process.stdin.send_all(b"go")
                assert sorted(await hub.pdus_until_closed()) == [
                    reply_pdu(11, 1, b"gate"),
                    reply_pdu(11, 2, b"crossed the quit notice"),
                ]
            assert await process.wait() == 0
            assert "done() called" in await stderr.rest()
    finally:
        process.kill()
        await process.wait()
        await process.stdin.aclose()
        await process.stderr.aclose()


# ---------------------------------------------------------------- the README's advice to handler authors


README = Path(__file__).parent.parent / "README.md"


def readme_section(title: str) -> str:
    readme = README.read_text()
    start = readme.index(f"## {title}\n")
    return readme[start : readme.index("\n## ", start + 1)]


def readme_handler(name: str) -> str:
    """The code block of the README's handler section that starts with ``# mycompany/<name>.py``."""
    section = readme_section("Writing a worker handler")
    start = section.index(f"```python\n# mycompany/{name}.py") + len("```python\n")
    return section[start : section.index("```", start)]


async def test_readme_handler_calls_blocking_and_asyncio_code_as_it_says(tmp_path, monkeypatch):
    (tmp_path / "mycompany").mkdir()
    (tmp_path / "mycompany" / "report.py").write_text(readme_handler("report"))
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = b"DCOD " + hashlib.sha256(b"dcod").hexdigest()[:16].encode()
    async with serving(tmp_path, load_handler("mycompany.report:handle")) as served, served.hub() as hub:
        for rseq in range(1, 4):  # at once, each asyncio call on a loop of its own (replies in any order)
            await hub.send(forwarded_pdu(9, rseq, b"dcod"))
        assert sorted([await hub.read_pdu() for _ in range(3)]) == [
            reply_pdu(9, rseq, expected) for rseq in range(1, 4)
        ]


async def _await_asyncio(req):
    await asyncio.sleep(0.01)


async def test_asyncio_awaited_in_a_handler_fails_as_the_readme_says(tmp_path):
    async with serving(tmp_path, _await_asyncio) as served, served.hub() as hub:
        await hub.send(forwarded_pdu(9, 1, b""))
        assert await hub.read_pdu() == reply_pdu(9, 1, b"DCO-0006 RuntimeError: no running event loop", error=True)
    assert "`RuntimeError: no running event loop`" in readme_section("Writing a worker handler")


# ---------------------------------------------------------------- loading handlers


def test_load_builtin_handler():
    from dcod.worker.handlers import echo

    assert load_handler("echo") == Handler(echo.handle)


def test_load_handler_function_with_its_module_hooks():
    assert load_handler(f"{__name__}:gated_echo") == Handler(gated_echo, init, done)


@pytest.mark.parametrize(
    "spec, error",
    [
        (
            "no_such_builtin",
            r"handler 'no_such_builtin': no built-in handler of that name \(echo, http\); one of your own is "
            r'"package\.module:function"',
        ),
        ("mycompany.sms", r"handler 'mycompany\.sms': no built-in handler of that name \(echo, http\)"),
        (f"{__name__}:missing", rf"handler '{__name__}:missing': {__name__} has no async function 'missing'"),
        (f"{__name__}:init", rf"handler '{__name__}:init': {__name__} has no async function 'init'"),
    ],
)
def test_load_handler_refuses_what_it_cannot_run(spec, error):
    with pytest.raises(HandlerError, match=error):
        load_handler(spec)


@pytest.fixture
def handler_dir(tmp_path, monkeypatch):
    """A directory with a handler module ``handler_path_echo``; sys.path restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "handler_path_echo", raising=False)
    directory = tmp_path / "handlers"
    directory.mkdir()
    (directory / "handler_path_echo.py").write_text("async def handle(req):\n    return req.body\n")
    return directory


def test_load_handler_imports_from_handler_path(handler_dir):
    handler = load_handler("handler_path_echo:handle", [str(handler_dir)])
    assert handler.handle.__module__ == "handler_path_echo"
    assert sys.path[0] == str(handler_dir)


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda d: os.chmod(d, 0o777), r"\(owner \S+, mode 0777\) is writable by its group or others"),
        pytest.param(
            lambda d: os.chown(d, 65534, 65534),
            r"\(owner nobody, mode 0755\) does not belong to root",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="root gives a directory to nobody"),
        ),
    ],
)
def test_load_handler_refuses_a_handler_path_others_may_write_to(handler_dir, change, error):
    """Its modules run as the worker: a directory that is not root's or ours, or that others may
    write to, is refused, and nothing is imported from it."""
    os.chmod(handler_dir, 0o755)
    change(handler_dir)
    with pytest.raises(
        HandlerError, match=rf"handler 'handler_path_echo:handle': handler_path directory {handler_dir} " + error
    ):
        load_handler("handler_path_echo:handle", [str(handler_dir)])
    assert str(handler_dir) not in sys.path and "handler_path_echo" not in sys.modules
