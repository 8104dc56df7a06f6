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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import trio

from dcod import config as configuration
from dcod.config import Config, ProxyConfig

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


def bench_config(base: Config, directory: Path, runtime: Path, proxy_id: int, instances: int, *,
                 spool: bool = False) -> Config:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_build() -> str:
    """The Python that ran the bench and the private hub: how it was built changes the hub's
    figures by a fifth (BENCHMARKS.md), so a report says which one it was."""
    return f"{platform.python_version()} ({sys.executable}), trio {trio.__version__}"


def filesystem(path: Path) -> str:
    """The type of the filesystem that holds ``path`` ("tmpfs", "ext4", ...), "?" if unknown."""
    real = os.path.realpath(path)
    mounts = [p for p in psutil.disk_partitions(all=True)
              if real == p.mountpoint or real.startswith(p.mountpoint.rstrip("/") + "/")]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype if mounts else "?"


def _runtime_parent() -> str | None:
    """A tmpfs for the runtime dir if there is one (the alert's fsync is free there, as on /run), else None."""
    return str(TMPFS) if filesystem(TMPFS) == "tmpfs" and os.access(TMPFS, os.W_OK) else None


@contextlib.contextmanager
def own_hub(base: Config, proxy_id: int, instances: int, *, spool: bool = False) -> Iterator[Target]:
    """A private `dcod run`, ready (its READY=1 read from a private NOTIFY_SOCKET); SIGTERM at the end."""
    with tempfile.TemporaryDirectory(prefix="dcod-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="dcod-bench-run-", dir=_runtime_parent()) as runtime:
        directory = Path(tmp)
        config = bench_config(base, directory, Path(runtime), proxy_id, instances, spool=spool)
        log_path = directory / "run.log"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(log_path, "wb") as run_log:
            notify.bind(str(directory / "notify.sock"))
            env = {**os.environ, "NOTIFY_SOCKET": str(directory / "notify.sock")}
            run = subprocess.Popen([sys.executable, "-m", "dcod", "run", "--config", config.source], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=run_log)
            try:
                _wait_ready(notify, run, log_path)
                yield Target(config.hub.advertise, config, (run.pid,), own=True)
            finally:
                _stop(run, config.supervisor.drain_timeout + config.supervisor.stop_timeout)


def _wait_ready(notify: socket.socket, run: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(min(left, 0.2))
        try:
            if "READY=1" in notify.recv(4096).decode().split("\n"):
                return
        except TimeoutError:
            pass
        if run.poll() is not None:
            raise BenchError(f"dcod run exited with status {run.returncode}:\n{_tail(log_path)}")
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


