"""`dcod run` as a real process tree: readiness, socket activation, restarts, orderly stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import trio

from peers import OracleSession

ECHO = '[[proxy]]\nid = 1\nhandler = "echo"\ninstances = 2\n'


class Run:
    """A `dcod run` process with a private NOTIFY_SOCKET, so tests wait on its real sd_notify."""

    def __init__(self, config, tmp_path, listen_socket: socket.socket | None = None) -> None:
        self.config = config
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify.sock"))
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        argv = [sys.executable, "-m", "dcod", "run", "--config", config.source]
        pass_fds = ()
        if listen_socket is not None:
            # As systemd would: the socket at fd 3, LISTEN_PID set to the process's own pid.
            fd = listen_socket.fileno()
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES="hub")
            shim = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                    "os.execv(sys.argv[2], sys.argv[2:])")
            argv = [sys.executable, "-c", shim, str(fd), *argv]
            pass_fds = (fd,)
        self.stderr_path = tmp_path / "run.log"
        self.proc = subprocess.Popen(argv, env=env, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
                                     stderr=open(self.stderr_path, "wb"))

    async def notification(self, field: str, timeout: float = 15.0) -> str:
        """Wait for an sd_notify datagram containing field (e.g. "READY=1"); returns it."""
        tsock = trio.socket.from_stdlib_socket(self.notify)
        with trio.fail_after(timeout):
            while True:
                message = (await tsock.recv(4096)).decode()
                if field in message.split("\n"):
                    return message

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def children_with(self, role: str) -> list[psutil.Process]:
        """Living children whose command line contains role (one may exit while we look)."""
        found = []
        for c in self.children():
            try:
                if role in " ".join(c.cmdline()):
                    found.append(c)
            except psutil.Error:
                pass
        return found

    @property
    def log(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def run(make_config, tmp_path):
    runs = []

    def start(proxies=ECHO, listen_socket=None, **kw):
        runs.append(Run(make_config(proxies, **kw), tmp_path, listen_socket))
        return runs[-1]

    yield start
    for r in runs:
        r.proc.kill()
        r.proc.wait()


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


async def test_socket_from_systemd_is_used(run):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
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
