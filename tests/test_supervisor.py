"""`dcod run` as a real process tree: readiness, socket activation, restarts, orderly stop."""

from __future__ import annotations

import signal

import psutil
import trio

from conftest import wait_for
from dcod.net import sockets
from peers import OracleSession
from runs import ECHO


async def echo_roundtrip(address: str, audsid: int, body: bytes = b"ping") -> bytes:
    session = await OracleSession.connect(address, audsid=audsid)
    await session.send(1, 1, body)
    reply = (await session.read())[3]
    session.close()
    return reply


async def test_run_is_ready_serves_and_stops_in_order(run):
    r = run()
    status = await r.notification("READY=1")
    assert "STATUS=serving on" in status
    assert await echo_roundtrip(r.config.hub.listen, 1) == b"ping"
    children = r.children()
    assert len(children) == 3  # hub and two workers
    assert r.stop() == 0
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    log = r.log
    # The hub drains and exits before the workers are told to stop.
    assert log.index("hub (pid") < log.index("worker 1#0 (pid")
    assert log.count(f"quit alert {r.config.alert.name} raised") == 1  # by the stop, which asked it to drain


async def test_socket_from_systemd_is_used(run):
    listener = sockets.bind("127.0.0.1:0")
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    r = run(listen_socket=listener)
    await r.notification("READY=1")
    assert await echo_roundtrip(address, 2) == b"ping"
    assert "using the listening socket passed by systemd (hub)" in r.log


async def test_killed_worker_is_restarted_on_the_same_socket(run):
    r = run()
    await r.notification("READY=1")
    [worker] = r.children_with("--instance 0")
    worker.kill()
    with trio.fail_after(10):
        while True:  # the supervisor restarts it; poll its children (no event to wait on from outside)
            replacement = r.children_with("--instance 0")
            if replacement and replacement[0].pid != worker.pid:
                break
            await trio.sleep(0.02)
    for audsid in range(10, 20):  # both instances serve again
        assert await echo_roundtrip(r.config.hub.listen, audsid) == b"ping"
    assert "worker 1#0 (pid %d) killed by SIGKILL; restarting" % worker.pid in r.log


async def test_failing_child_stays_down_after_its_restart_budget(run, tmp_path):
    r = run(ECHO + '[[proxy]]\nid = 2\ncommand = ["/bin/false"]\n', supervisor="restart_max = 3")
    await r.notification("READY=1")
    with trio.fail_after(15):
        while "leaving it down" not in r.log:
            await trio.sleep(0.05)
    assert r.log.count("worker 2#0 started") == 3
    assert await echo_roundtrip(r.config.hub.listen, 3) == b"ping"  # the rest keeps serving


async def test_children_stop_when_the_supervisor_is_killed(run):
    r = run()
    await r.notification("READY=1")
    children = r.children()
    r.proc.kill()
    r.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


async def test_nothing_is_restarted_while_the_service_stops(run, tmp_path):
    """A hub that drains and exits at once (no session), and a worker killed meanwhile, while the
    stop still waits for the quit alert: both exits belong to the stop, neither is restarted."""
    release = tmp_path / "release"
    held = tmp_path / "alert.sh"
    held.write_text(f"#!/bin/sh\nwhile [ ! -e {release} ]; do sleep 0.01; done\n")  # the alert takes until we say
    held.chmod(0o755)
    r = run(f'[alert]\nbackends = ["command"]\ncommand = ["{held}"]\n' + ECHO)
    await r.notification("READY=1")
    [hub] = r.children_with(" hub")
    [worker] = r.children_with("--instance 0")
    r.proc.send_signal(signal.SIGTERM)
    await trio.to_thread.run_sync(hub.wait, 10)  # drained, exited and reaped
    worker.kill()
    await wait_for(lambda: f"worker 1#0 (pid {worker.pid}) killed by SIGKILL;" in r.log, timeout=10)
    release.touch()
    assert await trio.to_thread.run_sync(r.proc.wait, 30) == 0
    log = r.log
    assert log.count("hub started") == 1 and log.count("worker 1#0 started") == 1, log
    assert f"hub (pid {hub.pid}) exited with status 0\n" in log  # planned: the stop told it to drain
    assert f"worker 1#0 (pid {worker.pid}) killed by SIGKILL; the service is stopping: not restarted" in log
