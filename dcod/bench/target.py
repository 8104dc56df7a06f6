"""The hub a bench loads: a private `dcod run` started for it (``own_hub``), or one given with ``--hub``;
and what starting a `dcod run` takes, shared with tests/ and the bench/ scripts: a free port, a NOTIFY_SOCKET
to read its sd_notify messages, a listening socket passed to it as systemd passes one."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import trio

from dcod import config as configuration
from dcod.config import Config, ProxyConfig
from dcod.net import sockets
from dcod.supervisor.process import describe_exit

START_TIMEOUT = 30.0  # seconds for `dcod run` to be ready, for a load process to connect, for idle sessions
SPOOL_READY_TIMEOUT = 1.0  # a --spool hub reaches no worker, so never says "ready": READY=1 comes after this
TMPFS = Path("/dev/shm")  # where the private runtime dir goes when it is a tmpfs, like /run in production


class BenchError(Exception):
    """The bench could not run (no hub, a load process died): no figures to report."""


@dataclass(frozen=True)
class Target:
    """The hub under load, the config its sessions follow, and the pids whose CPU is measured."""

    address: str
    config: Config
    pids: tuple[int, ...]  # with own: (the supervisor,)
    own: bool  # started by the bench


def bench_config(
    base: Config, directory: Path, runtime: Path, proxy_id: int, instances: int, *, spool: bool = False
) -> Config:
    """``base``'s tuning with a free port, runtime files in ``runtime``, state in ``directory``, and only
    the proxy under load; written to ``directory``. The alert dir exists from the start, to be watched."""
    address = f"127.0.0.1:{free_port()}"
    supervisor = dataclasses.replace(base.supervisor, runtime_dir=str(runtime), state_dir=str(directory / "state"))
    if spool:
        supervisor = dataclasses.replace(supervisor, ready_timeout=SPOOL_READY_TIMEOUT)
    config = dataclasses.replace(
        base,
        hub=dataclasses.replace(base.hub, listen=address, advertise=address),
        supervisor=supervisor,
        # Only the file alert: a bench must not signal a real database when its hub stops.
        alert=dataclasses.replace(base.alert, backends=("file",), dir=str(runtime / "alerts")),
        proxies=(bench_proxy(proxy_id, instances, spool),),
    )
    path = directory / "dcod.toml"
    path.write_text(configuration.dump(config))
    config = configuration.load(path)
    config.alert_dir.mkdir(parents=True, exist_ok=True)
    return config


def bench_proxy(proxy_id: int, instances: int, spool: bool) -> ProxyConfig:
    """Echo workers; for --spool an external proxy on a port just found free, where nothing listens."""
    if spool:
        return ProxyConfig(id=proxy_id, name="nowhere", address=f"127.0.0.1:{free_port()}")
    return ProxyConfig(id=proxy_id, name="echo", handler="echo", instances=instances)


def python_build() -> str:
    """The Python that ran the bench and the private hub: how it was built changes the hub's
    figures by a fifth (BENCHMARKS.md), so a report says which one it was."""
    return f"{platform.python_version()} ({sys.executable}), trio {trio.__version__}"


def filesystem(path: Path) -> str:
    """The type of the filesystem that holds ``path`` ("tmpfs", "ext4", ...), "?" if unknown."""
    real = os.path.realpath(path)
    mounts = [
        p
        for p in psutil.disk_partitions(all=True)
        if real == p.mountpoint or real.startswith(p.mountpoint.rstrip("/") + "/")
    ]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype if mounts else "?"


def _runtime_parent() -> str | None:
    """A tmpfs for the runtime dir if there is one (the alert's fsync is free there, as on /run), else None."""
    return str(TMPFS) if filesystem(TMPFS) == "tmpfs" and os.access(TMPFS, os.W_OK) else None


@contextlib.contextmanager
def own_hub(base: Config, proxy_id: int, instances: int, *, spool: bool = False) -> Iterator[Target]:
    """A private `dcod run`, ready (its READY=1 read from a private NOTIFY_SOCKET); SIGTERM at the end."""
    with (
        tempfile.TemporaryDirectory(prefix="dcod-bench-") as tmp,
        tempfile.TemporaryDirectory(prefix="dcod-bench-run-", dir=_runtime_parent()) as runtime,
    ):
        directory = Path(tmp)
        config = bench_config(base, directory, Path(runtime), proxy_id, instances, spool=spool)
        log_path = directory / "run.log"
        with NotifySocket(directory / "notify.sock") as notify, open(log_path, "wb") as run_log:
            env = {**os.environ, **notify.env}
            run = subprocess.Popen(
                [sys.executable, "-m", "dcod", "run", "--config", config.source],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=run_log,
            )
            try:
                _wait_ready(notify, run, log_path)
                yield Target(config.hub.advertise, config, (run.pid,), own=True)
            finally:
                _stop(run, config.supervisor.drain_timeout + config.supervisor.stop_timeout)


def _wait_ready(notify: NotifySocket, run: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if notify.wait("READY=1", min(left, 0.2)) is not None:
            return
        if run.poll() is not None:
            raise BenchError(f"dcod run {describe_exit(run.returncode)}:\n{_tail(log_path)}")
    raise BenchError(f"dcod run not ready within {START_TIMEOUT:g} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(run: subprocess.Popen, timeout: float) -> None:
    run.send_signal(signal.SIGTERM)
    try:
        run.wait(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()


# ---------------------------------------------------------------- starting a `dcod run`, for tests/ and bench/ too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifySocket:
    """A private NOTIFY_SOCKET (put ``env`` in the environment of a `dcod run`), read as systemd reads its own:
    every sd_notify datagram at once, by a thread, so that the sender never waits on us. ``wait`` or, from trio,
    ``notification`` return the messages with a given field one after the other."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._returned = 0  # the first message a wait may return: those before were returned or passed over
        self._arrived = threading.Condition()
        self._closed = False
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        threading.Thread(target=self._read, name=f"notify {path}", daemon=True).start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _read(self) -> None:
        while True:
            try:
                message = self._socket.recv(65536).decode()
            except OSError:
                return
            with self._arrived:
                if self._closed:
                    return  # close() woke the recv
                self.messages.append(message)
                self._arrived.notify_all()

    def wait(self, field: str, timeout: float) -> str | None:
        """The next message, after those already returned, with ``field`` (e.g. "READY=1") among its lines;
        None if none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for i in range(self._returned, len(self.messages)):
                    if field in self.messages[i].split("\n"):
                        self._returned = i + 1
                        return self.messages[i]
                left = deadline - time.monotonic()
                if left <= 0 or not self._arrived.wait(left):
                    return None

    def pass_over(self) -> None:
        """From now on, ``wait`` returns only messages that arrive later: those of a process started next."""
        with self._arrived:
            self._returned = len(self.messages)

    async def notification(self, field: str, timeout: float) -> str | None:
        """``wait`` for trio code: a cancellation is seen within a second (the thread waits that long at most)."""
        with trio.move_on_after(timeout):
            while (message := await trio.to_thread.run_sync(self.wait, field, min(timeout, 1.0))) is None:
                pass
            return message
        return None

    def close(self) -> None:
        with self._arrived:
            self._closed = True
        self._socket.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv, which close() alone would not
        self._socket.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# Moves the socket passed at fd argv[1] to fd 3 and closes the original (or every child of `dcod run` would
# inherit it), then execs the rest of argv: the product's LISTEN_PID shim, then `dcod run`.
_TO_FD3 = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd == 3 or os.close(fd); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def socket_activated(argv: list[str], listener: socket.socket, env=os.environ) -> tuple[list[str], dict]:
    """``argv`` and the options of subprocess.Popen or trio's open_process that start it as systemd starts a
    socket-activated service: ``listener`` at fd 3, named "hub", LISTEN_PID set to the process's own pid."""
    fd = listener.fileno()
    shimmed = [sys.executable, "-c", _TO_FD3, str(fd), *sockets.LISTEN_PID_SHIM, *argv]
    return shimmed, {"env": sockets.child_environment(["hub"], env), "pass_fds": (fd,)}
