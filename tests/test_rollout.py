"""Issue 3, proven with real processes under load: reload, hub death, hung hub, worker death,
a worker that ignores SIGTERM; and the control socket's commands around them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import trio

from conftest import free_port, let_others_reach, wait_for
from load import Load
from runs import ECHO

FAST_PMON = "heartbeat_interval = 0.1\nheartbeat_timeout = 1.0\n"


def dcod(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcod", *args, "--config", config.source], capture_output=True, text=True, timeout=120
    )


async def dcod_async(config, *args: str) -> subprocess.CompletedProcess:
    return await trio.to_thread.run_sync(dcod, config, *args)


def alert_counter(config) -> int:
    try:
        return int(config.alert_file.read_text().split()[0])
    except FileNotFoundError:
        return 0


def status(config) -> dict:
    """`dcod status --json`, whether all is up (exit status 0) or not (3)."""
    result = dcod(config, "status", "--json")
    assert result.returncode in (0, 3) and result.stdout, result.stderr
    return json.loads(result.stdout)


def row(snapshot: dict, name: str) -> dict:
    return next(p for p in snapshot["processes"] if p["name"] == name and p["state"] != "draining")


@pytest.fixture
def handler_path(tmp_path) -> str:
    """The line of a [[proxy]] table whose workers import handler modules from tmp_path/handlers
    (they run isolated: PYTHONPATH does not reach them)."""
    (tmp_path / "handlers").mkdir()
    return f'handler_path = ["{tmp_path / "handlers"}"]\n'


@pytest.fixture
def handler_module(tmp_path, handler_path):
    """handler_module(name, source): a module of handlers in the directory of ``handler_path``."""

    def write(name: str, source: str) -> None:
        (tmp_path / "handlers" / f"{name}.py").write_text(textwrap.dedent(source))

    return write


@pytest.fixture
def slow_echo(tmp_path, handler_module, handler_path) -> str:
    """The [[proxy]] table of an echo proxy (id 1, 2 instances) that holds a body starting with
    "slow" for a minute, once it has added a line to tmp_path/held."""
    handler_module(
        "slowecho",
        f"""\
        import trio

        async def handle(req):
            if req.body.startswith(b"slow"):
                with open({str(tmp_path / "held")!r}, "a") as held:
                    held.write("held\\n")
                await trio.sleep(60)
            return req.body
        """,
    )
    return '[[proxy]]\nid = 1\nhandler = "slowecho:handle"\ninstances = 2\n' + handler_path


@pytest.fixture
def slow_init(tmp_path, handler_module) -> Path:
    """Handler "slowinit:handle", an echo whose init() waits until the file returned exists."""
    go = tmp_path / "go"
    handler_module(
        "slowinit",
        f"""\
        import os
        import trio

        async def init():
            while not os.path.exists({str(go)!r}):
                await trio.sleep(0.05)

        async def handle(req):
            return req.body
        """,
    )
    return go


async def started_load(nursery, r, sessions: int = 16) -> Load:
    load = Load(r.config.hub.advertise, r.config.alert_file, sessions=sessions)
    await nursery.start(load.run)
    await load.progress(100)
    return load


async def test_reload_under_load_loses_nothing(run, nursery):
    r = run(ECHO)
    await r.notification("READY=1")
    load = await started_load(nursery, r)
    alerts = alert_counter(r.config)

    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any("hub: generation 2" in line and "ready" in line for line in lines), lines
    assert any("quit alert" in line for line in lines)
    assert any("worker 1#0: generation 1" in line and "generation 2 serving" in line for line in lines)
    assert any("worker 1#1: generation 1" in line and "generation 2 serving" in line for line in lines)
    assert lines[-1].startswith("reload: done in")

    await load.progress(200)  # the sessions carry on with the new generation
    load.stop()
    assert (load.lost, load.unavailable, load.mismatched, dict(load.errors)) == (0, 0, 0, {}), load.error_texts
    assert alert_counter(r.config) > alerts
    snapshot = status(r.config)
    assert [row(snapshot, n)["generation"] for n in ("hub", "worker 1#0", "worker 1#1")] == [2, 2, 2]
    assert snapshot["supervisor"]["rollout"]["state"] == "done"


async def test_reload_notifies_systemd(run):
    r = run(ECHO)
    await r.notification("READY=1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dcod_async, r.config, "reload")
        reloading = await r.notification("RELOADING=1")
        assert any(f.startswith("MONOTONIC_USEC=") for f in reloading.split("\n"))
        await r.notification("READY=1")


async def test_invalid_config_is_refused_and_the_service_keeps_going(run):
    r = run(ECHO)
    await r.notification("READY=1")
    path = r.config.source
    good = open(path).read()
    with open(path, "a") as f:
        f.write('[[proxy]]\nid = 2\nhandler = "echo"\ninstances = 0\n')
    result = await dcod_async(r.config, "reload")  # the command itself refuses it...
    assert result.returncode == 1
    assert f"{path}: proxy[1].instances: must be >= 1, not 0" in result.stderr
    # ...and so does the supervisor, asked directly (as a script or an older dcod might).
    from dcod.supervisor import control

    answers = await trio.to_thread.run_sync(
        lambda: list(control.request(r.config.control_socket, {"command": "reload"}))
    )
    assert answers[-1]["ok"] is False
    assert f"{path}: proxy[1].instances: must be >= 1, not 0" in answers[-1]["error"]
    open(path, "w").write(good)
    snapshot = status(r.config)
    assert row(snapshot, "hub")["generation"] == 1
    assert "invalid configuration" in snapshot["supervisor"]["rollout"]["error"]
    from peers import OracleSession

    session = await OracleSession.connect(r.config.hub.listen, audsid=5)
    await session.send(1, 1, b"still serving")
    assert (await session.read())[3] == b"still serving"


async def test_a_reload_that_its_processes_would_fail_on_is_refused_and_changes_nothing(run):
    """A handler that does not import (issue 18: it replaced working instances with ones that
    crash-looped), a command that is not there: refused before anything changes, every problem
    said (file, key, reason), by `dcod reload` and by SIGHUP (in the log); the processes that
    serve go on serving."""
    r = run(ECHO, supervisor="ready_timeout = 5.0")
    await r.notification("READY=1")
    path = r.config.source
    good = open(path).read()
    serving = {c.pid for c in r.children()}
    assert len(serving) == 3

    open(path, "w").write(good.replace('handler = "echo"', 'handler = "ehco"'))
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"invalid configuration, nothing changed: {path}: proxy[0].handler: handler 'ehco': no built-in "
        "handler of that name (echo, http)" in result.stderr
    ), result.stderr
    assert {c.pid for c in r.children()} == serving

    open(path, "a").write(
        '[[proxy]]\nid = 2\ncommand = ["/nonexistent/worker"]\n[[proxy]]\nid = 3\nhandler = "json:nosuchfunc"\n'
    )
    r.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: "proxy[2].handler" in r.log, timeout=20)
    assert (
        "reload failed: invalid configuration, nothing changed:\n"
        f"  {path}: proxy[0].handler: handler 'ehco': no built-in handler of that name (echo, http); "
        'one of your own is "package.module:function"\n'
        f"  {path}: proxy[1].command: '/nonexistent/worker' is not an executable file\n"
        f"  {path}: proxy[2].handler: handler 'json:nosuchfunc': json has no async function 'nosuchfunc'\n"
    ) in r.log, r.log
    assert {c.pid for c in r.children()} == serving
    assert [(p["generation"], p["state"]) for p in status(r.config)["processes"]] == [(1, "ready")] * 3
    from peers import OracleSession

    session = await OracleSession.connect(r.config.hub.listen, audsid=5)
    await session.send(1, 1, b"still serving")
    assert (await session.read())[3] == b"still serving"


async def test_reload_applies_added_and_removed_proxies(run):
    r = run(ECHO + '[[proxy]]\nid = 3\nhandler = "echo"\n')
    await r.notification("READY=1")
    path = r.config.source
    text = open(path).read().replace('[[proxy]]\nid = 3\nhandler = "echo"\n', "")
    open(path, "w").write(text + '[[proxy]]\nid = 4\nhandler = "echo"\ninstances = 2\n')
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    names = {p["name"] for p in status(r.config)["processes"]}
    assert names == {"hub", "worker 1#0", "worker 1#1", "worker 4#0", "worker 4#1"}
    from dcod.client import DcoError, Session

    async with Session(r.config.hub.advertise, audsid=9) as session:
        assert await session.call_sync(4, b"new", timeout=5) == b"new"
        try:
            await session.call_sync(3, b"gone", timeout=5)
        except DcoError as e:
            assert e.code == 1
        else:
            raise AssertionError("proxy 3 was removed")


async def test_a_removed_proxys_queue_is_set_aside_said_where_and_not_taken_by_a_later_one(run):
    nowhere = free_port()  # proxy 2's worker is down: its requests wait in the queue
    remote = f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{nowhere}"\n'
    r = run(ECHO + remote, supervisor="ready_timeout = 2.0")
    await r.notification("READY=1")  # once ready_timeout has passed: proxy 2 never connects
    from dcod.client import Session

    async with Session(r.config.hub.advertise, audsid=9) as session:
        for _ in range(3):
            await session.send_request(2, oneway=True)
    while status(r.config)["hub"]["proxies"]["2"]["queued_now"] < 3:
        await trio.sleep(0.05)
    path = Path(r.config.source)
    path.write_text(path.read_text().replace(remote, ""))
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    kept = [line for line in result.stdout.splitlines() if "proxy 2: removed with 3 requests queued; kept in " in line]
    assert len(kept) == 1, result.stdout
    aside = Path(kept[0].rsplit(" kept in ", 1)[1])
    assert aside.exists() and "removed" in aside.name
    # The same id added again starts with an empty queue: the old requests stay aside.
    path.write_text(path.read_text() + '[[proxy]]\nid = 2\nhandler = "echo"\n')
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    proxy = status(r.config)["hub"]["proxies"]["2"]
    assert (proxy["queued_now"], proxy["replayed"]) == (0, 0)
    assert aside.exists()


async def test_second_reload_at_once_is_refused(run):
    r = run(ECHO)
    await r.notification("READY=1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dcod_async, r.config, "reload")
        await r.notification("RELOADING=1")
        second = await dcod_async(r.config, "reload")
    assert second.returncode == 1 and "a rollout is already running" in second.stderr


async def test_killed_hub_raises_the_alert_and_is_replaced(run, nursery):
    r = run(ECHO)
    await r.notification("READY=1")
    load = await started_load(nursery, r, sessions=8)
    alerts = alert_counter(r.config)
    [hub] = r.children_with(" hub")
    hub.kill()
    await load.progress(200)  # a new hub serves; sessions reconnected
    load.stop()
    assert alert_counter(r.config) > alerts
    assert load.mismatched == 0 and load.lost <= 8  # at most each session's one request in flight
    assert "hub (pid %d) killed by SIGKILL: raising the quit alert" % hub.pid in r.log


async def watched_under_load(run, nursery):
    """A `dcod run` whose pmon looks often, 4 sessions of load: (run, load, alerts so far, hub)."""
    r = run(ECHO, supervisor=FAST_PMON)
    await r.notification("READY=1")
    load = await started_load(nursery, r, sessions=4)
    [hub] = r.children_with(" hub")
    return r, load, alert_counter(r.config), hub


async def test_hung_hub_is_alerted_killed_and_replaced(run, nursery):
    r, load, alerts, hub = await watched_under_load(run, nursery)
    hub.suspend()
    await load.progress(100)
    load.stop()
    assert alert_counter(r.config) > alerts
    assert not hub.is_running() or hub.status() == psutil.STATUS_ZOMBIE
    assert f"hub (pid {hub.pid}) sent no heartbeat" in r.log
    assert load.mismatched == 0


async def test_reloads_do_not_spend_the_restart_budget(run):
    r = run(ECHO, supervisor="restart_max = 2")
    await r.notification("READY=1")
    for _ in range(2):  # two new hub generations: as many starts as the budget allows failures
        result = await dcod_async(r.config, "reload")
        assert result.returncode == 0, result.stderr
    [hub] = r.children_with(" hub")
    hub.kill()
    await wait_for(lambda: f"hub (pid {hub.pid}) killed by SIGKILL; restarting" in r.log, timeout=10)
    await wait_for(lambda: row(status(r.config), "hub")["state"] == "ready", timeout=20)
    assert "leaving it down" not in r.log


async def test_a_supervisor_frozen_for_a_while_does_not_take_its_hub_for_hung(run, nursery):
    r, load, alerts, hub = await watched_under_load(run, nursery)
    supervisor = psutil.Process(r.proc.pid)
    supervisor.suspend()
    await trio.sleep(3.0)  # the fault: frozen for 3 heartbeat_timeouts while the hub goes on
    supervisor.resume()
    status(r.config)  # answered: the supervisor runs again
    await trio.sleep(2.0)  # two heartbeat_timeouts of pmon looks, now with the heartbeats read
    await load.progress(100)
    load.stop()
    assert hub.is_running() and hub.status() != psutil.STATUS_ZOMBIE
    assert alert_counter(r.config) == alerts
    assert "sent no heartbeat" not in r.log
    assert (load.lost, sum(load.errors.values()), load.mismatched) == (0, 0, 0)


async def test_killed_worker_gets_error_replies_others_work_and_it_comes_back(run, slow_echo):
    r = run(slow_echo)
    await r.notification("READY=1")
    from dcod.client import DcoError, DcoTimeout, Session

    async with contextlib.AsyncExitStack() as stack:
        # One request from each of 4 sessions: two on each instance (least outstanding first;
        # one session's requests read together would all go to one instance).
        sessions = [await stack.enter_async_context(Session(r.config.hub.advertise, audsid=77 + n)) for n in range(4)]
        slow = []
        for session in sessions:
            session.write(b"slow")
            slow.append((session, await session.send_request(1)))
        with trio.fail_after(10):
            while row(status(r.config), "hub")["inflight"] < 4:  # known from the hub's heartbeats
                await trio.sleep(0.05)
        [victim] = r.children_with("--instance 0")
        victim.kill()
        codes, still_running = [], 0
        for session, rseq in slow:
            try:
                await session.read_response(rseq, timeout=2)
            except DcoError as e:
                codes.append(e.code)
            except DcoTimeout:
                still_running += 1
        assert codes == [3, 3]  # DCO-0003 at once for those in flight at the killed instance
        assert still_running == 2  # the other instance's requests are unaffected
        for n in range(6):
            assert await sessions[0].call_sync(1, b"fast %d" % n, timeout=10) == b"fast %d" % n
    with trio.fail_after(10):
        while row(status(r.config), "worker 1#0")["state"] != "ready":
            await trio.sleep(0.05)
    assert row(status(r.config), "worker 1#0")["restarts"] == 1


async def test_hub_sigtermed_from_outside_raises_the_alert_once_and_is_replaced(run, nursery):
    r = run(ECHO)
    await r.notification("READY=1")
    load = await started_load(nursery, r, sessions=8)
    [hub] = r.children_with(" hub")
    hub.terminate()
    # Its sessions hear the alert and leave it, so it drains and exits at once, not after drain_timeout.
    await wait_for(lambda: f"hub (pid {hub.pid}) exited with status 0; restarting" in r.log, timeout=20)
    await load.progress(200)  # through the new hub: the old one is gone
    load.stop()
    assert (load.lost, load.unavailable, load.mismatched, dict(load.errors)) == (0, 0, 0, {}), load.error_texts
    assert f"hub (pid {hub.pid}) is draining, not asked to: raising the quit alert" in r.log
    assert status(r.config)["supervisor"]["alerts"]["file"]["sent"] == 1  # not again at its exit


@contextlib.asynccontextmanager
async def hub_sigtermed_with_a_request_held(r, tmp_path, audsid: int):
    """The hub SIGTERMed from outside while the worker holds a session's request, so that it
    drains until drain_timeout; yields it (psutil) once the supervisor has raised the alert."""
    from dcod.client import Session

    async with Session(r.config.hub.advertise, audsid=audsid) as held:
        held.write(b"slow")
        await held.send_request(1)
        await wait_for(lambda: (tmp_path / "held").exists())
        [hub] = r.children_with(" hub")
        hub.terminate()
        await wait_for(lambda: r.config.alert_file.exists())
        yield hub


async def test_status_shows_a_hub_draining_unasked_as_draining(run, slow_echo, tmp_path):
    r = run(slow_echo, supervisor="drain_timeout = 3.0\nstop_timeout = 1.0")
    await r.notification("READY=1")
    async with hub_sigtermed_with_a_request_held(r, tmp_path, audsid=80) as hub:
        snapshot = status(r.config)
    assert [(p["pid"], p["state"]) for p in snapshot["processes"] if p["name"] == "hub"] == [(hub.pid, "draining")]
    assert "hub generation 1 draining" in snapshot["supervisor"]["status"]


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
async def test_hub_dying_mid_drain_after_sigterm_raises_one_alert(run, slow_echo, tmp_path, fault):
    """Killed from outside, or hung and so killed by the supervisor past drain_timeout + stop_timeout."""
    r = run(slow_echo, supervisor="drain_timeout = 3.0\nstop_timeout = 1.0")
    await r.notification("READY=1")
    async with hub_sigtermed_with_a_request_held(r, tmp_path, audsid=78) as hub:
        if fault == "SIGKILL":
            hub.kill()
        else:
            hub.suspend()
        await wait_for(lambda: f"hub (pid {hub.pid}) killed by SIGKILL; restarting" in r.log, timeout=20)
    from dcod.client import Session

    async with Session(r.config.hub.advertise, audsid=79) as session:
        assert await session.call_sync(1, b"after", timeout=10) == b"after"
    assert status(r.config)["supervisor"]["alerts"]["file"]["sent"] == 1


async def test_worker_ignoring_sigterm_is_killed_and_the_rollout_goes_on(run, tmp_path):
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(
        textwrap.dedent("""\
        # A worker that ignores SIGTERM: echo over the socket passed at fd 3.
        import signal, socket, struct, threading
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        listener = socket.socket(fileno=3)

        def serve(conn):
            conn.recv(4)
            buf = b""
            while data := conn.recv(65536):
                buf += data
                while len(buf) >= 12 and len(buf) >= abs(struct.unpack(">i", buf[:4])[0]):
                    n = abs(struct.unpack(">i", buf[:4])[0])
                    pdu, buf = buf[:n], buf[n:]
                    if struct.unpack(">i", pdu[:4])[0] > 0:
                        conn.sendall(pdu)

        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
        """)
    )
    r = run(
        ECHO + f'[[proxy]]\nid = 2\ncommand = ["{sys.executable}", "{stubborn}"]\n',
        supervisor="stop_timeout = 1.0\nready_timeout = 5.0",
    )
    await r.notification("READY=1")
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(
        "worker 2#0: generation 1 killed by SIGKILL; generation 2 serving" in line
        for line in result.stdout.splitlines()
    ), result.stdout


async def test_unclean_stop_raises_the_alert_at_start(run, make_config):
    r = run(ECHO)
    await r.notification("READY=1")
    r.proc.kill()
    r.proc.wait()
    before = alert_counter(r.config)
    again = run(ECHO)
    await again.notification("READY=1")
    assert alert_counter(again.config) > before
    assert "did not stop cleanly" in again.log


async def test_status_table_and_stop_command(run):
    r = run(ECHO)
    await r.notification("READY=1")
    result = dcod(r.config, "status")
    assert result.returncode == 0, result.stderr
    table = result.stdout
    for text in ("PROCESS", "GEN", "INFLIGHT", "UNACKED", "hub", "worker 1#0", "worker 1#1", "ready", "PROXY"):
        assert text in table, table
    assert dcod(r.config, "stop").returncode == 0
    assert r.proc.wait(30) == 0
    gone = dcod(r.config, "status")
    assert gone.returncode == 3 and "no supervisor is running" in gone.stderr


async def test_control_socket_refuses_other_users(run):
    r = run(ECHO)
    await r.notification("READY=1")
    sock = r.config.control_socket
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    # Open the file modes wide, so that only the SO_PEERCRED check stands in the way; nobody
    # must also reach our Python and dcod (a checkout in a private directory: mktemp -d).
    os.chmod(sock, 0o666)
    import dcod

    let_others_reach(sock, Path(sys.executable), Path(dcod.__file__))
    nobody = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-m",
            "dcod",
            "status",
            "--config",
            r.config.source,
        ],
        capture_output=True,
        text=True,
    )
    assert nobody.returncode == 1, nobody.stderr
    assert "permission denied: only root and group dcod may do that" in nobody.stderr
    assert "refused a control connection" in r.log


async def test_stop_during_a_reload_drains_both_hub_generations_before_the_workers(run, nursery):
    """SIGTERM while a reload waits for the new hub to be ready: the generation being replaced
    still serves every session; it drains too, and is gone, before a worker is stopped."""
    r = run(ECHO)
    await r.notification("READY=1")
    load = await started_load(nursery, r, sessions=8)
    [old] = r.children_with(" hub")
    # A proxy that nobody serves: the new generation waits for it and is not ready (ready_timeout, 30 s).
    with open(r.config.source, "a") as f:
        f.write(f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{free_port()}"\n')
    reloads = []

    async def reload() -> None:
        reloads.append(await dcod_async(r.config, "reload"))

    nursery.start_soon(reload)
    await wait_for(
        lambda: any("hub started" in line and line.endswith("generation 2") for line in r.log.splitlines()), timeout=20
    )
    [new] = [hub for hub in r.children_with(" hub") if hub.pid != old.pid]
    workers = r.children_with("dcod worker")
    assert len(workers) == 2
    await load.progress(50)  # the old generation serves meanwhile, and `dcod status` shows it
    hubs = {p["pid"]: (p["generation"], p["state"]) for p in status(r.config)["processes"] if p["name"] == "hub"}
    assert hubs == {new.pid: (2, "starting"), old.pid: (1, "ready")}
    r.proc.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(r.proc.wait, 60) == 0
    load.stop()
    await wait_for(lambda: reloads, timeout=10)
    assert reloads[0].returncode == 1 and "the service is stopping" in reloads[0].stderr, reloads[0]
    log = r.log
    # Both generations were told to drain; the alert came once both had closed their listeners,
    # and both had exited before the first worker heard of the stop.
    workers_stop = log.index("INFO: SIGTERM: stopping; quit notice")
    alert = log.index(f"quit alert {r.config.alert.name} raised")
    assert log[:alert].count("hub: INFO: asked to drain: draining") == 2, log
    assert log[:workers_stop].count("hub: INFO: hub stopped") == 2, log
    assert alert < workers_stop
    assert f"hub (pid {old.pid}) exited with status 0" in log  # drained, not killed
    assert f"hub generation 2 (pid {new.pid}) exited with status 0" in log
    assert (load.mismatched, dict(load.errors)) == (0, {}), load.error_texts  # no DCO-0003, no DCO-0005
    assert not [p for p in [old, new, *workers] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_stop_during_a_reload_waits_for_a_worker_being_removed(run, nursery, handler_module, handler_path):
    """SIGTERM while a reload waits for a removed proxy's worker to exit: the stop waits for it
    too (and SIGKILLs it past stop_timeout), rather than leaving it behind."""
    handler_module(
        "stuck",
        """\
        import trio

        async def handle(req):
            return req.body

        async def done():  # a clean-up that never ends: only SIGKILL stops this worker
            await trio.sleep_forever()
        """,
    )
    stuck_proxy = '[[proxy]]\nid = 2\nhandler = "stuck:handle"\n' + handler_path
    r = run(ECHO + stuck_proxy, supervisor="stop_timeout = 3.0")
    await r.notification("READY=1")
    [stuck] = r.children_with("--proxy 2")
    text = open(r.config.source).read()
    open(r.config.source, "w").write(text.replace(stuck_proxy, ""))
    nursery.start_soon(dcod_async, r.config, "reload")
    try:
        await wait_for(lambda: "worker 2#0: INFO: SIGTERM: stopping" in r.log, timeout=20)  # the reload removes it
        r.proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(r.proc.wait, 30) == 0
        assert not stuck.is_running(), "the removed worker outlived the supervisor"
        assert f"worker 2#0 (pid {stuck.pid}) killed by SIGKILL" in r.log
    finally:
        with contextlib.suppress(psutil.Error):
            stuck.kill()


async def test_a_worker_removed_by_a_reload_gives_up_its_socket(run):
    """The supervisor binds each worker instance's socket; once a reload has stopped a removed
    instance, nothing will be started on it again: it is closed and its path removed."""
    r = run(ECHO)
    await r.notification("READY=1")
    supervisor = psutil.Process(r.proc.pid)
    assert (await dcod_async(r.config, "reload")).returncode == 0  # the same processes as at the end, and alerted once
    fds = supervisor.num_fds()
    removed = str(r.config.worker_socket(3, 0))
    with open(r.config.source, "a") as f:
        f.write('[[proxy]]\nid = 3\nhandler = "echo"\n')
    assert (await dcod_async(r.config, "reload")).returncode == 0
    assert os.path.exists(removed)
    text = open(r.config.source).read()
    open(r.config.source, "w").write(text.replace('[[proxy]]\nid = 3\nhandler = "echo"\n', ""))
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0 and "worker 3#0: removed" in result.stdout, result.stdout + result.stderr
    assert not os.path.exists(removed)
    assert removed not in [c.laddr for c in supervisor.net_connections(kind="unix")]
    # Back to the processes it had before proxy 3 came, and to as many open files.
    await wait_for(lambda: supervisor.num_fds() == fds)


async def test_children_restarted_after_a_crash_run_the_configuration_in_effect(run):
    """Not the file as edited since, which no reload has rolled out (and which may not even work)."""
    r = run(ECHO)
    await r.notification("READY=1")
    text = open(r.config.source).read()
    open(r.config.source, "w").write(
        text.replace("instances = 2\n", "instances = 2\nconcurrency = 7\n")
        + f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{free_port()}"\n'
    )
    for child in [*r.children_with(" hub"), *r.children_with("--instance 0")]:
        child.kill()
    await wait_for(
        lambda: r.log.count("hub serving proxies") == 2 and r.log.count("worker 1#0: INFO: proxy 1:") == 2, timeout=20
    )
    assert r.log.count("hub serving proxies 1 on") == 2, r.log
    assert r.log.count("worker 1#0: INFO: proxy 1: handler echo, 64 requests at a time") == 2, r.log


@pytest.mark.parametrize("failure", ["hub not ready", "added worker not ready"])
async def test_a_reload_that_fails_before_the_new_hub_serves_changes_nothing(run, slow_init, handler_path, failure):
    """The new hub waits for a proxy nobody serves, or an added worker's init() takes longer than
    ready_timeout: what the reload started is stopped, the previous configuration stays in effect
    (also for restarts), `dcod status` shows the generation that serves, and a later reload works."""
    r = run(ECHO, supervisor="ready_timeout = 5.0\nstop_timeout = 2.0")
    await r.notification("READY=1")
    good = open(r.config.source).read()
    changes = good.replace("instances = 2\n", "instances = 2\nconcurrency = 7\n")
    if failure == "hub not ready":
        changes += f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{free_port()}"\n[[proxy]]\nid = 3\nhandler = "echo"\n'
    else:
        changes += '[[proxy]]\nid = 3\nhandler = "slowinit:handle"\n' + handler_path
    open(r.config.source, "w").write(changes)
    [hub] = r.children_with(" hub")

    result = await dcod_async(r.config, "reload")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not ready within 5s" in result.stderr and "nothing changed" in result.stderr, result.stderr
    assert "reload failed: " in r.log
    assert [c.pid for c in r.children_with(" hub")] == [hub.pid]
    assert len(r.children_with("dcod worker")) == 2 and not r.children_with("--proxy 3")
    assert not r.config.worker_socket(3, 0).exists()
    snapshot = status(r.config)
    assert [(p["pid"], p["generation"], p["state"]) for p in snapshot["processes"] if p["name"] == "hub"] == [
        (hub.pid, 1, "ready")
    ]
    assert "hub generation 1 ready, 2/2 worker instances ready" in snapshot["supervisor"]["status"]
    assert snapshot["supervisor"]["rollout"]["state"] == "failed"

    # Restarted after a crash, the hub and a worker run the previous configuration.
    for child in [hub, *r.children_with("--instance 0")]:
        child.kill()
    await wait_for(
        lambda: (
            r.log.count("hub serving proxies") == 2 + (failure == "hub not ready")
            and r.log.count("worker 1#0: INFO: proxy 1:") == 2
        ),
        timeout=20,
    )
    assert r.log.count("hub serving proxies 1 on") == 2, r.log
    assert r.log.count("worker 1#0: INFO: proxy 1: handler echo, 64 requests at a time") == 2, r.log

    open(r.config.source, "w").write(good + '[[proxy]]\nid = 3\nhandler = "echo"\n')
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    snapshot = status(r.config)
    assert {p["name"]: (p["generation"], p["state"]) for p in snapshot["processes"]} == {
        "hub": (4 if failure == "hub not ready" else 3, "ready"),
        "worker 1#0": (3, "ready"),
        "worker 1#1": (2, "ready"),
        "worker 3#0": (1, "ready"),
    }


async def test_a_reload_that_fails_at_a_worker_keeps_what_was_done_and_says_so(run, slow_init, handler_path):
    """The new hub serves, then worker 1#0's new handler takes longer than ready_timeout in init():
    the new configuration stays in effect, for 1#1's restarts too; the error names what still runs
    the previous one; the pmon kills 1#0 (no heartbeat within ready_timeout) and its slot restarts
    it; it is used once ready (not held for a rollout that is over)."""
    r = run(ECHO, supervisor="ready_timeout = 5.0")
    await r.notification("READY=1")
    good = open(r.config.source).read()
    open(r.config.source, "w").write(good.replace('handler = "echo"', f'handler = "slowinit:handle"\n{handler_path}'))

    result = await dcod_async(r.config, "reload")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "worker 1#0 generation 2" in result.stderr and "not ready within 5s" in result.stderr, result.stderr
    assert "the new configuration stays in effect" in result.stderr and "worker 1#1" in result.stderr, result.stderr
    assert f"reload failed: {result.stderr.removeprefix('dcod: ').strip()}" in r.log
    await wait_for(lambda: re.search(r"worker 1#0 started: pid \d+, generation 3\b", r.log), timeout=10)
    assert re.search(r"worker 1#0 \(pid \d+\) sent no heartbeat for", r.log), r.log
    snapshot = status(r.config)
    assert {p["name"]: (p["generation"], p["state"]) for p in snapshot["processes"]} == {
        "hub": (2, "ready"),
        "worker 1#0": (3, "starting"),
        "worker 1#1": (1, "ready"),
    }

    slow_init.touch()
    await wait_for(lambda: row(status(r.config), "worker 1#0")["state"] == "ready", timeout=20)
    await wait_for(
        lambda: (
            [(i["state"], i["held"]) for i in status(r.config)["hub"]["proxies"]["1"]["instances"]]
            == [("up", False), ("up", False)]
        ),
        timeout=20,
    )
    [old] = r.children_with("--instance 1")
    old.kill()  # restarted with the configuration in effect: the new one
    await wait_for(lambda: r.log.count("worker 1#1: INFO: proxy 1: handler") == 2, timeout=20)
    assert "worker 1#1: INFO: proxy 1: handler slowinit:handle" in r.log

    open(r.config.source, "w").write(good)
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p["name"]: (p["generation"], p["state"]) for p in status(r.config)["processes"]} == {
        "hub": (3, "ready"),
        "worker 1#0": (4, "ready"),
        "worker 1#1": (3, "ready"),
    }


async def test_the_hub_serving_during_a_failing_reload_is_still_watched(run):
    """Killed while the new generation waits for a proxy nobody serves: it is alerted and restarted
    with the configuration in effect, and is there when the reload fails."""
    r = run(ECHO, supervisor="ready_timeout = 5.0")
    await r.notification("READY=1")
    with open(r.config.source, "a") as f:
        f.write(f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{free_port()}"\n')
    [old] = r.children_with(" hub")
    async with trio.open_nursery() as nursery:
        reloads = []

        async def reload() -> None:
            reloads.append(await dcod_async(r.config, "reload"))

        nursery.start_soon(reload)
        await wait_for(lambda: "hub started: " in r.log.partition("control: reload")[2], timeout=20)
        old.kill()
    assert reloads[0].returncode == 1 and "nothing changed" in reloads[0].stderr, reloads[0]
    assert f"hub (pid {old.pid}) killed by SIGKILL: raising the quit alert" in r.log
    assert r.log.count("hub serving proxies 1 on") == 2, r.log  # the first generation, and its restart
    await wait_for(lambda: row(status(r.config), "hub")["state"] == "ready", timeout=20)
    assert row(status(r.config), "hub")["generation"] == 3


async def test_a_reload_that_renames_the_alert_raises_the_old_hubs_quit_under_the_old_name_then_uses_the_new(run):
    """The sessions of the hub a reload retires listen for the alert as it was configured when they
    connected; every hub that goes away later is announced with the new settings."""
    r = run(ECHO, supervisor=FAST_PMON)
    await r.notification("READY=1")
    old_file = r.config.alert_file
    path = Path(r.config.source)
    path.write_text(path.read_text() + '[alert]\nname = "Renamed-QUIT"\n')
    result = await dcod_async(r.config, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    new_file = old_file.with_name("Renamed-QUIT")
    assert old_file.exists() and not new_file.exists()
    [hub] = r.children_with(" hub")
    hub.kill()
    await wait_for(new_file.exists, timeout=15)
    assert new_file.read_text().split()[1] == r.config.hub.advertise


async def test_a_removed_proxys_queued_sync_requests_are_answered_and_the_reload_says_so(run, nursery):
    """Proxy 2's worker is down: its requests wait in the queue. A reload removes it: the sessions
    waiting for a reply get DCO-0005 at once (not the end of their connection when the drain times
    out), and the output says how many were answered and where the queue is kept."""
    remote = f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{free_port()}"\n'
    r = run(ECHO + remote, supervisor="ready_timeout = 2.0\ndrain_timeout = 20.0")
    await r.notification("READY=1")
    from dcod.client import DcoError, Session

    answers: list[BaseException] = []
    async with Session(r.config.hub.advertise, audsid=9) as session:
        for _ in range(3):
            await session.send_request(2, oneway=True)
        rseqs = [await session.send_request(2) for _ in range(2)]
        await wait_for(lambda: status(r.config)["hub"].get("proxies", {}).get("2", {}).get("queued_now") == 5)
        path = Path(r.config.source)
        path.write_text(path.read_text().replace(remote, ""))
        result = await dcod_async(r.config, "reload")
        for rseq in rseqs:
            with pytest.raises(DcoError) as answer:
                await session.read_response(rseq, timeout=5)
            answers.append(answer.value)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all("DCO-0005" in str(e) and "proxy 2 removed" in str(e) for e in answers), answers
    lines = result.stdout.splitlines()
    assert any("proxy 2: removed; 2 sync requests queued for it answered with DCO-0005" in line for line in lines)
    assert any("proxy 2: removed with 5 requests queued; kept in " in line for line in lines), result.stdout
    assert any(re.search(r"hub: generation 1 \(pid \d+\) drained, exited with status 0", line) for line in lines)


@pytest.fixture
def never_finished(run, handler_module, handler_path, slow_init, tmp_path):
    """never_finished(supervisor) -> (Run, reload): proxy 1 an echo, proxy 2 a handler that never
    returns from the first request it gets (its event loop is fine: heartbeats go on), noting each
    request's body in tmp_path/notes. ``await reload(then)`` reloads with proxy 1's handler made
    slow to start: while the reload waits for 1#0's new generation, the hub that now serves
    forwards a one-way request to 2#0, which never finishes it; 1#0 is then let start, and
    ``then()`` runs while the reload goes on to 2#0. Returns the reload's CompletedProcess."""
    stuck = tmp_path / "stuck-once"
    handler_module(
        "forever",
        f"""\
        import os
        import trio

        async def handle(req):
            with open({str(tmp_path / "notes")!r}, "a") as notes:
                notes.write(req.body.decode() + "\\n")
            if not os.path.exists({str(stuck)!r}):
                open({str(stuck)!r}, "w").close()
                await trio.sleep_forever()
            return req.body
        """,
    )
    proxies = "".join(
        f'[[proxy]]\nid = {n}\nhandler = "{handler}"\n{handler_path}'
        for n, handler in enumerate(["echo", "forever:handle"], 1)
    )

    def start(supervisor: str):
        r = run(proxies, supervisor=supervisor)

        async def reload(then=None) -> subprocess.CompletedProcess:
            path = Path(r.config.source)
            path.write_text(path.read_text().replace('handler = "echo"', 'handler = "slowinit:handle"'))
            from dcod.client import Session

            reloads = []
            async with trio.open_nursery() as nursery:

                async def reload() -> None:
                    reloads.append(await dcod_async(r.config, "reload"))

                nursery.start_soon(reload)
                await wait_for(lambda: re.search(r"worker 1#0 started: pid \d+, generation 2", r.log), timeout=30)
                async with Session(r.config.hub.advertise, audsid=9) as session:  # the new hub: the old one is gone
                    session.write(b"never done")
                    await session.send_request(2, oneway=True)
                await wait_for(lambda: stuck.exists(), timeout=10)
                slow_init.touch()  # 1#0 gets ready; then 2#0 is held, and its request is never acknowledged
                if then is not None:
                    await then()
            return reloads[0]

        return r, reload

    return start


async def test_a_hold_ends_at_drain_timeout_when_the_worker_never_finishes(never_finished, tmp_path):
    """The hold on 2#0 ends after drain_timeout, 2#0 is replaced (killed after stop_timeout), and
    the request it never acknowledged goes to its next generation."""
    r, reload = never_finished(FAST_PMON + "drain_timeout = 2.0\nstop_timeout = 1.0\n")
    await r.notification("READY=1")
    with trio.fail_after(100):  # before: the hold waited for the acknowledgement for ever
        result = await reload()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker 2#0: generation 1 killed by SIGKILL; generation 2 serving" in result.stdout, result.stdout
    await wait_for(lambda: status(r.config)["hub"]["proxies"]["2"]["acked"] == 1, timeout=10)
    assert (tmp_path / "notes").read_text().splitlines() == ["never done", "never done"]
    assert "worker 2#0: held, with 1 requests still not finished after drain_timeout (2s)" in r.log


async def test_a_hub_that_stops_answering_during_a_hold_ends_the_reload_within_heartbeat_timeout(never_finished):
    """The hub is SIGSTOPped while it holds 2#0 (drain_timeout is long): the pmon kills it after
    heartbeat_timeout, the hold gets its exit for an answer, and the reload fails saying so; the hub
    is restarted."""
    r, reload = never_finished(FAST_PMON + "drain_timeout = 60.0\n")
    await r.notification("READY=1")
    stopped = []

    async def stop_the_hub_once_it_holds() -> None:
        await wait_for(lambda: status(r.config)["hub"]["proxies"]["2"]["instances"][0]["held"], timeout=30)
        [hub] = r.children_with(" hub")
        hub.send_signal(signal.SIGSTOP)
        stopped.append(hub.pid)

    result = await reload(stop_the_hub_once_it_holds)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"worker 2#0: the hub cannot hold it: hub {'killed by SIGKILL'}" in result.stderr, result.stderr
    assert "still running the previous one: worker 2#0" in result.stderr
    assert re.search(rf"hub \(pid {stopped[0]}\) sent no heartbeat for [\d.]+s \(hung\)", r.log), r.log
    await wait_for(lambda: row(status(r.config), "hub")["state"] == "ready", timeout=20)


async def test_a_draining_hub_exits_by_itself_when_a_session_does_not_read_its_last_answers(
    run, handler_module, handler_path
):
    """A session that stopped reading (its replies fill its socket) while a request of its is still
    in flight at drain_timeout: the hub answers it, gives the answer a bounded time to be written,
    and exits on its own, not killed by the supervisor after stop_timeout."""
    handler_module(
        "slowbig",
        """\
        import trio

        async def handle(req):
            if req.body == b"slow":
                await trio.sleep(60)
            return req.body * 64
        """,
    )
    r = run(
        '[[proxy]]\nid = 1\nhandler = "slowbig:handle"\n' + handler_path,
        supervisor="drain_timeout = 2.0\nstop_timeout = 4.0\n",
    )
    await r.notification("READY=1")
    from peers import OracleSession

    host, port = r.config.hub.advertise.rsplit(":", 1)
    session = await OracleSession.connect((host, int(port)), audsid=9)
    await session.send(1, 1, b"slow")
    for rseq in range(2, 40):  # 38 replies of 4 MiB, never read: they fill its socket, and wait in the hub
        await session.send(1, rseq, b"r" * 65536)
    await wait_for(lambda: status(r.config)["hub"].get("proxies", {}).get("1", {}).get("replies") == 38, timeout=20)
    result = await dcod_async(r.config, "reload")
    session.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"hub: generation 1 \(pid \d+\) drained, exited with status 0", result.stdout), result.stdout
