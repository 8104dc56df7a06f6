"""Issue 15: Noradle's PL/SQL client (k_ext_call, stood in for by tests/kext_call.py) against a real
`dcod run`, and, where the issue contrasts the two, against the Node.js stand-in for Noradle's own
hub (tests/noradle/ext_hub.js).

Nothing dcod sends may break that client, and replies never cross sessions: the hub sends it no
error replies (it cannot parse them) and routes replies by connection, not by audsid.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from conftest import free_port, wait_for
from dcod.client import Session
from kext_call import ExtHub, KExtCall, OracleError, exthub, oracle_floor, oracle_mod
from runs import ECHO, dcod_worker_command
from test_rollout import dcod_async, handler_module, handler_path, slow_echo, status  # noqa: F401 (fixtures)

NODE = shutil.which("node")
EXT_HUB = Path(__file__).parent / "noradle" / "ext_hub.js"
REPLY_WAIT = 11.0  # the timeout each read_response gets, as an application would pass it
NO_REPLY_WAIT = 3.0  # for a reply that must not come: the session's own timeout decides
RETRY = 0.1  # exthub_config_t's retry interval, 3 s in the PL/SQL


def in_thread(fn, *args):
    """Run a synchronous k_ext_call scenario (PL/SQL blocks) off the test's trio loop."""
    return trio.to_thread.run_sync(fn, *args)


def taken_for_a_reply(session: KExtCall, rseq: int) -> bytes | None:
    """For a request that can have no reply: what the session took for one within NO_REPLY_WAIT
    (the session's own timeout decides), else None."""
    return session.reply(rseq) if session.read_response(rseq, NO_REPLY_WAIT) else None


def good_calls(session: KExtCall, count: int) -> None:
    for n in range(count):
        body = f"good {n} of audsid {session.audsid}".encode()
        assert session.call(1, body, REPLY_WAIT) == body, f"call {n} after the failure"


def unknown_proxy_then_good_calls(address: str) -> None:
    session = KExtCall([exthub(address)], audsid=5150)
    bad = session.send_request(99, b"for a proxy nobody has")
    taken = taken_for_a_reply(session, bad)
    good_calls(session, 50)
    assert taken is None  # not an error reply taken for an empty one
    session.close()


class Sessions:
    """k_ext_call sessions, one thread each, calling the echo proxy back to back; every reply checked.

    A session that gets an Oracle error stops (its stream may be broken); the error is kept.
    """

    def __init__(self, exthubs: list[ExtHub], alert_file: Path, count: int) -> None:
        self.exthubs = exthubs
        self.alert_file = alert_file
        self.count = count
        self.ok = 0
        self.wrong: list[str] = []  # a reply that is not the request's echo
        self.unanswered: list[str] = []  # read_response returned false
        self.failed: list[str] = []  # an Oracle error
        self.sessions: list[KExtCall] = []
        self._stopping = trio.Event()
        self._stop = threading.Event()  # what the threads look at
        self._changed = threading.Condition()
        self._done = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Until stop() or cancelled; started once every session is connected."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_threads)
            for audsid in range(900, 900 + self.count):
                self.sessions.append(
                    await in_thread(
                        functools.partial(
                            KExtCall, self.exthubs, audsid=audsid, alert_file=self.alert_file, retry_interval=RETRY
                        )
                    )
                )
            for session in self.sessions:
                nursery.start_soon(in_thread, self._calls, session)
            task_status.started()
        self._done.set()

    async def _stop_threads(self) -> None:
        try:
            await self._stopping.wait()
        finally:  # also when a failed test cancels us: the threads cannot be cancelled
            self._stop.set()

    def _calls(self, session: KExtCall) -> None:
        number = 0
        try:
            while not self._stop.is_set():
                number += 1
                body = b"%d:%d" % (session.audsid, number)
                try:
                    reply = session.call(1, body, REPLY_WAIT)
                except OracleError as e:
                    self._note(self.failed, f"audsid {session.audsid} call {number}: {e}")
                    return
                if reply is None:
                    self._note(self.unanswered, f"audsid {session.audsid} call {number}")
                elif reply != body:
                    self._note(self.wrong, f"audsid {session.audsid} call {number}: {reply[:40]!r}")
                else:
                    self._note(None, "")
        finally:
            session.close()

    def _note(self, outcome: list[str] | None, text: str) -> None:
        with self._changed:
            if outcome is None:
                self.ok += 1
            else:
                outcome.append(text)
            self._changed.notify_all()

    async def progress(self, calls: int, timeout: float = 60.0) -> None:
        """Wait until ``calls`` more calls were answered right (fails at once if a session failed)."""

        def wait() -> None:
            with self._changed:
                target = self.ok + calls
                assert self._changed.wait_for(lambda: self.ok >= target or self.failed, timeout), "no progress"

        await in_thread(wait)
        assert not self.failed, self.failed

    async def stop(self) -> None:
        """Let each session finish its call, and wait for them."""
        self._stopping.set()
        await self._done.wait()

    def check(self) -> None:
        assert (self.failed, self.wrong, self.unanswered) == ([], [], [])


async def withheld(r) -> dict:
    """The hub's stats in `dcod status --json` once they show a withheld error reply (the
    supervisor has them from the hub's heartbeat)."""
    with trio.fail_after(10):
        while True:
            hub = (await in_thread(status, r.config)).get("hub", {})
            if hub.get("totals", {}).get("withheld") or any(p["withheld"] for p in hub.get("proxies", {}).values()):
                return hub
            await trio.sleep(0.1)


async def started(run, proxies: str = ECHO, **hub):
    r = run(proxies, **hub)
    await r.notification("READY=1")
    return r


# ---------------------------------------------------------------- the client's basic patterns


def test_the_stand_in_reads_as_the_plsql_does(tmp_path):
    # An error reply's v_len is negative: FLOOR gives no 8132-byte piece, MOD (the dividend's sign) no rest.
    assert (oracle_floor(-20, 8132), oracle_mod(-20, 8132)) == (-1, -20)
    assert (oracle_floor(2 * 8132 + 1, 8132), oracle_mod(2 * 8132 + 1, 8132)) == (2, 1)
    # A quit alert whose message (a hub.advertise) is over 30 bytes fails the flush: hence the config check.
    alert_file = tmp_path / "Noradle-DCO-EXTHUB-QUIT"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        session = KExtCall([ExtHub("127.0.0.1", listener.getsockname()[1], 1)], audsid=1, alert_file=alert_file)
        alert_file.write_text(f"1 {'h' * 26}:1523\n")
        session.send_request(1, b"", buffered=True)
        with pytest.raises(OracleError, match="ORA-06502"):
            session.flush()
        session.close()


async def test_300_buffered_requests_one_flush(run):
    r = await started(run)

    def scenario() -> None:
        session = KExtCall([exthub(r.config.hub.advertise)], audsid=300)
        # The first bodies straddle the 8132-byte pieces the PL/SQL reads bodies in.
        sizes = [0, 1, 8131, 8132, 8133, 2 * 8132, 2 * 8132 + 1] + [20] * 293
        bodies = {
            session.send_request(1, bytes([65 + n % 26]) * size, buffered=True): bytes([65 + n % 26]) * size
            for n, size in enumerate(sizes)
        }
        assert (session.onbuf, session.onway) == (300, 0)
        session.flush()
        assert (session.onbuf, session.onway) == (0, 300)
        for rseq, body in bodies.items():
            assert session.read_response(rseq, REPLY_WAIT), f"no reply to request {rseq}"
            assert session.reply(rseq) == body, f"reply to request {rseq}"
        assert session.onway == 0
        session.close()

    await in_thread(scenario)


# ---------------------------------------------------------------- failures, then good calls


async def test_unknown_proxy_then_good_calls(run):
    r = await started(run)
    await in_thread(unknown_proxy_then_good_calls, r.config.hub.advertise)
    hub = await withheld(r)  # not sent, but counted: an unknown proxy's in the hub's totals
    assert (hub["totals"]["withheld"], hub["proxies"]["1"]["withheld"]) == (1, 0)


@contextlib.contextmanager
def noradle_hub(tmp_path: Path):
    """The Node.js stand-in for Noradle's hub, its proxy 1 a dcod echo worker (configured in
    tmp_path/dcod.toml); yields the hub's host:port once it is connected to the worker."""
    port = free_port()
    logs = tmp_path / "noradle.log"
    with contextlib.ExitStack() as stack:

        def start(argv: list[str], stdout: int) -> subprocess.Popen:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stack.enter_context(open(logs, "ab")), text=True
            )
            stack.callback(child.wait)
            stack.callback(child.kill)
            return child

        start(dcod_worker_command(tmp_path / "dcod.toml", f"127.0.0.1:{port}"), subprocess.DEVNULL)
        hub = start([NODE, str(EXT_HUB), "0", f"1=127.0.0.1:{port}"], subprocess.PIPE)
        events = {}
        for line in hub.stdout:  # its events, one JSON object a line
            event = json.loads(line)
            events[event["event"]] = event
            if "listening" in events and "worker_connected" in events:
                break
        else:
            raise AssertionError(f"Noradle's hub ended: {events}\n{logs.read_text()}")
        yield f"127.0.0.1:{events['listening']['port']}"


needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) not on PATH: Noradle's hub stand-in needs it")


@needs_node
def test_unknown_proxy_then_good_calls_on_noradles_hub(make_config, tmp_path):
    """The reference: Noradle's hub drops the request, the session's timeout decides, the 50 come back."""
    make_config('[[proxy]]\nid = 1\nhandler = "echo"\n')
    with noradle_hub(tmp_path) as address:
        unknown_proxy_then_good_calls(address)


@needs_node
async def test_dcods_client_announcing_its_capabilities_works_on_noradles_hub(make_config, tmp_path):
    make_config('[[proxy]]\nid = 1\nhandler = "echo"\n')
    with contextlib.ExitStack() as stack:
        address = await in_thread(stack.enter_context, noradle_hub(tmp_path))
        async with Session(address, audsid=6006, serial=os.getpid()) as session:
            for n in range(20):
                assert await session.call_sync(1, b"call %d" % n, timeout=REPLY_WAIT) == b"call %d" % n


async def test_reply_timeout_then_good_calls(run, slow_echo):  # noqa: F811 (a fixture)
    r = await started(run, slow_echo, reply_timeout=1.0)

    def scenario() -> None:
        session = KExtCall([exthub(r.config.hub.advertise)], audsid=2002)
        slow = session.send_request(1, b"slow: answered in a minute")
        taken = taken_for_a_reply(session, slow)
        good_calls(session, 50)
        assert taken is None
        session.close()

    await in_thread(scenario)
    assert (await withheld(r))["proxies"]["1"]["withheld"] == 1
    assert "WITHHELD" in (await dcod_async(r.config, "status")).stdout


async def test_worker_killed_with_requests_in_flight_then_good_calls(run, slow_echo, tmp_path):  # noqa: F811 (a fixture)
    r = await started(run, slow_echo.replace("instances = 2", "instances = 1"))
    session = await in_thread(lambda: KExtCall([exthub(r.config.hub.advertise)], audsid=3003))
    slow = [session.send_request(1, b"slow %d" % n, buffered=True) for n in range(5)]
    await in_thread(session.flush)
    held = tmp_path / "held"
    await wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 5, timeout=10)
    [worker] = r.children_with("--instance 0")
    worker.kill()

    def scenario() -> None:
        taken = [taken_for_a_reply(session, rseq) for rseq in slow]
        good_calls(session, 50)  # queued until the instance is back
        assert taken == [None] * len(slow)
        session.close()

    await in_thread(scenario)


# ---------------------------------------------------------------- the quit alert


async def test_rolling_reload_under_16_sessions_through_the_quit_alert(run, nursery):
    r = await started(run)
    load = Sessions([exthub(r.config.hub.advertise)], r.config.alert_file, 16)
    await nursery.start(load.run)
    await load.progress(200)
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    await load.progress(400)
    await load.stop()
    load.check()
    # Each session heard the alert (its hub's host:port), read what it was owed and reconnected.
    assert all("quit alert" in s.reconnects for s in load.sessions), [s.reconnects for s in load.sessions]


async def test_one_of_two_hubs_stopped_under_load_its_sessions_move_to_the_other(run, nursery, tmp_path):
    # The stopping supervisor must let go of its listening socket: else the sessions that follow the
    # alert reconnect to the first row again (the kernel accepts them into a backlog nobody serves)
    # and are reset when it exits (ORA-29260), never reaching the second.
    # Two services, one DBMS_ALERT: both raise the same alert, each with its own host:port.
    alerts = f'[alert]\ndir = "{tmp_path / "alerts"}"\n'
    first = run(alerts + ECHO, directory=tmp_path / "first")
    second = run(alerts + ECHO, directory=tmp_path / "second")
    for r in (first, second):
        await r.notification("READY=1")
    rows = [exthub(first.config.hub.advertise, seq=1), exthub(second.config.hub.advertise, seq=2)]
    load = Sessions(rows, first.config.alert_file, 16)
    await nursery.start(load.run)
    assert {s.hub for s in load.sessions} == {first.config.hub.advertise}  # seq order
    await load.progress(200)
    assert await in_thread(first.stop) == 0
    await load.progress(400)
    await load.stop()
    load.check()
    assert {s.hub for s in load.sessions} == {second.config.hub.advertise}


# ---------------------------------------------------------------- replies never cross sessions


async def test_an_audsid_already_in_use_does_not_take_the_first_sessions_replies(run):
    r = await started(run)

    def scenario() -> None:
        # Two SYS sessions (audsid 0 both), or two databases, or a reconnect while the old connection lingers.
        first, second = (KExtCall([exthub(r.config.hub.advertise)], audsid=4444, sid=sid) for sid in (1, 2))
        for n in range(20):
            asks = {s: s.send_request(1, b"session %d call %d" % (s.sid, n)) for s in (first, second)}
            for s, rseq in asks.items():
                assert s.read_response(rseq, NO_REPLY_WAIT), f"session {s.sid}: no reply to call {n}"
                assert s.reply(rseq) == b"session %d call %d" % (s.sid, n)
        first.close()
        second.close()

    await in_thread(scenario)


async def test_audsid_0_sending_rseq_0_empty_does_not_cut_the_worker_connection(run):
    r = await started(run)

    def scenario() -> bytes | None:
        session = KExtCall([exthub(r.config.hub.advertise)], audsid=0)
        session.rseq = -1  # k_ext_call counts from 1: this stands for any session that sends rseq 0
        rseq = session.send_request(1, b"")  # the worker's echo is "12, 0, 0": a quit notice's bytes
        echo = session.reply(rseq) if session.read_response(rseq, REPLY_WAIT) else None
        good_calls(session, 5)
        session.close()
        return echo

    assert await in_thread(scenario) == b""  # the echo itself reached the session
    assert "is quitting" not in r.log
