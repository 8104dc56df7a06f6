"""What `dcod run` would meet, checked before it does: `dcod config --check`, and every reload
before it changes anything.

dcod.config checks the file (keys, types, values) and the alert backends their settings; this
checks the rest against the host: each proxy's handler loads, in a child that runs as the workers
do (the same interpreter, isolated, the proxy's handler_path: `dcod worker --check`); each
command is an executable; the directories are usable (dcod.supervisor.rundir); the listen
addresses (hub, metrics) can be bound; a stop fits in the service's TimeoutStopSec. check() raises one ConfigError that
lists every problem, each with file, key and reason.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dcod.config import SYSTEM_CONFIG, Config, ConfigError, ProxyConfig, dump
from dcod.net import sockets
from dcod.supervisor import alert, rundir
from dcod.supervisor.process import dcod_command, describe_exit

SERVICE = "dco-hub.service"
SOCKET_UNIT = "dco-hub.socket"
PACKAGED_TIMEOUT_STOP = 75.0  # seconds: TimeoutStopSec= of units/dco-hub.service
STOP_MARGIN = 2.0  # seconds for the supervisor's own last steps of a stop (its last answers, its exit)
SYSTEMCTL_TIMEOUT = 10.0
# systemd's time span units (systemd.time(7)) in seconds
TIMESPAN_UNITS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1,
    "min": 60,
    "h": 3600,
    "d": 86400,
    "w": 604800,
    "M": 2629800,
    "y": 31557600,
}


def check(
    config: Config,
    worker_argv: Callable[[ProxyConfig], Sequence[str]],
    *,
    host: bool = True,
    unit: str | None = SERVICE,
) -> None:
    """Raise ConfigError listing every problem ``config`` would meet (the alert backends' settings too).

    ``worker_argv(proxy)`` is the command line of `dcod worker --check` for a proxy, as the
    supervisor would start that proxy's workers. Without ``host``, the directories and the listen
    addresses are not checked (a reload keeps those of the running supervisor; a package build has
    none). ``unit`` is the systemd service whose TimeoutStopSec a stop must fit in (None: no limit).
    """
    problems: list[tuple[str, str | None]] = []  # (key, reason), None where all is well
    if host:
        problems += rundir.check(config)
        problems.append(("hub.listen", _hub_unbindable(config)))
        if config.metrics.listen:
            problems.append(("metrics.listen", _unbindable(config, config.metrics.listen)))
    if unit is not None:
        problems.append(("supervisor.drain_timeout", _stop_too_long(config, unit)))
    errors = [_line(config, key, reason) for key, reason in problems if reason]
    try:
        alert.check(config)
    except ConfigError as e:
        errors += e.errors
    errors += _proxies(config, worker_argv)
    if errors:
        raise ConfigError("\n".join(errors))


def _line(config: Config, key: str, reason: str) -> str:
    return f"{config.source}: {key}: {reason}"


# ---------------------------------------------------------------- proxies


def _proxies(config: Config, worker_argv: Callable[[ProxyConfig], Sequence[str]]) -> list[str]:
    """Each command's program, and each handler, loaded by `dcod worker --check` in children run
    side by side, each given ready_timeout (the time a worker has to get ready)."""
    timeout = config.supervisor.ready_timeout
    deadline = time.monotonic() + timeout
    children: dict[int, subprocess.Popen | str] = {}
    errors = []
    try:
        for i, proxy in enumerate(config.proxies):
            if proxy.handler:
                try:
                    children[i] = subprocess.Popen(
                        worker_argv(proxy),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                        errors="replace",
                    )
                except OSError as e:
                    children[i] = f"handler {proxy.handler!r}: cannot start the check: {e}"
        for i, proxy in enumerate(config.proxies):
            if proxy.command:
                reason = _not_executable(proxy.command[0])
                if reason:
                    errors.append(_line(config, f"proxy[{i}].command", reason))
            elif i in children:
                reason = _handler_refused(proxy, children[i], deadline, timeout)
                if reason:
                    errors.append(_line(config, f"proxy[{i}].handler", reason))
    finally:
        for child in children.values():
            if isinstance(child, subprocess.Popen) and child.poll() is None:
                child.kill()
                child.wait()
    return errors


def _handler_refused(proxy: ProxyConfig, child: subprocess.Popen | str, deadline: float, timeout: float) -> str | None:
    """Why the handler would not load, as its `dcod worker --check` said; None if it loads."""
    if isinstance(child, str):
        return child
    try:
        _, stderr = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return f"handler {proxy.handler!r}: not loaded within ready_timeout ({timeout:g}s), as a worker must be"
    if child.returncode == 0:
        return None
    said = [line for line in stderr.splitlines() if line.strip()]
    return said[-1] if said else f"handler {proxy.handler!r}: its check {describe_exit(child.returncode)}"


def _not_executable(program: str) -> str | None:
    """Why ``program`` could not be started (as the shell that launches it finds it, on $PATH
    unless it has a '/'); None if it could."""
    path = os.environ.get("PATH", os.defpath)
    if shutil.which(program, path=path) is not None:
        return None
    if "/" in program:
        return f"{program!r} is not an executable file"
    return f"{program!r} is not found on PATH ({path})"


# ---------------------------------------------------------------- the listen address


def _hub_unbindable(config: Config) -> str | None:
    """Why `dcod run` could not listen on hub.listen; None if it could, or if it would not try:
    systemd passes the socket (to this process, or dco-hub.socket to the service whose
    configuration this is)."""
    if sockets.passed_count() or (config.source == str(SYSTEM_CONFIG) and _unit_properties(SOCKET_UNIT, "LoadState")):
        return None
    return _unbindable(config, config.hub.listen)


def _unbindable(config: Config, address: str) -> str | None:
    """Why `dcod run` could not listen on ``address``; None if it could, or if the dcod run of this
    configuration is running and holds it."""
    try:
        sockets.bind(address).close()  # as the supervisor binds it: SO_REUSEADDR
    except OSError as e:
        if e.errno == errno.EADDRINUSE and rundir.holder(config.runtime_dir):
            return None
        name = errno.errorcode.get(e.errno or 0, "")
        return f"cannot listen on {address}: {e.strerror}" + (f" ({name})" if name else "")
    return None


# ---------------------------------------------------------------- the stop and the unit's TimeoutStopSec


def _stop_too_long(config: Config, unit: str) -> str | None:
    """Why a stop could outlast the unit's TimeoutStopSec, after which systemd kills what is still
    draining; None if it fits. A stop's longest: a hub has stop_timeout to close its listener, the
    quit alert its backends' timeout, the hub drain_timeout + stop_timeout to drain and exit, then
    the workers stop_timeout to exit (dcod.supervisor.process.drain_hubs, Supervisor._stop_children)."""
    limit, whose = timeout_stop(unit)
    if limit is None:
        return None
    sup, alert_settings = config.supervisor, config.alert
    alert_time = max(
        [alert_settings.command_timeout] * ("command" in alert_settings.backends)
        + [alert_settings.oracle_timeout] * ("oracle" in alert_settings.backends),
        default=0.0,
    )
    longest = sup.drain_timeout + 3 * sup.stop_timeout + alert_time + STOP_MARGIN
    if longest <= limit:
        return None
    return (
        f"a stop may take {longest:g}s (drain_timeout {sup.drain_timeout:g} + 3 x stop_timeout "
        f"{sup.stop_timeout:g}"
        + (f" + the quit alert's timeout {alert_time:g}" if alert_time else "")
        + f" + {STOP_MARGIN:g}), more than {whose} TimeoutStopSec={limit:g}s, after which systemd kills what "
        f"still runs and requests are lost: lower drain_timeout or stop_timeout, or raise TimeoutStopSec "
        f"(systemctl edit {unit})"
    )


def timeout_stop(unit: str) -> tuple[float | None, str]:
    """The TimeoutStopSec of ``unit`` in seconds (None: infinity), as systemd has it (drop-ins
    included), and whose it is; the packaged unit's when systemd does not know ``unit`` here."""
    props = _unit_properties(unit, "LoadState", "TimeoutStopUSec")
    if props.get("LoadState") == "loaded":
        with_unit = f"{unit}'s"
        if props.get("TimeoutStopUSec") == "infinity":
            return None, with_unit
        seconds = _timespan(props.get("TimeoutStopUSec", ""))
        if seconds is not None:
            return seconds, with_unit
    return PACKAGED_TIMEOUT_STOP, f"the packaged {SERVICE}'s"


def own_service() -> str | None:
    """The systemd service this process runs in (the unit of its cgroup), or None if systemd did not
    start it as a service."""
    if not os.environ.get("INVOCATION_ID"):
        return None
    try:
        cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in cgroup.splitlines():
        if line.startswith("0::"):  # the unified hierarchy
            unit = line.rpartition("/")[2]
            return unit if unit.endswith(".service") else None
    return None


def _unit_properties(unit: str, *names: str) -> dict[str, str]:
    """``systemctl show``'s properties of a unit; only those of a unit systemd has loaded, and none
    when it cannot be asked (no systemd here)."""
    try:
        shown = subprocess.run(
            ["systemctl", "show", f"--property={','.join(names)}", unit],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    props = dict(line.partition("=")[::2] for line in shown.stdout.splitlines() if "=" in line)
    return props if shown.returncode == 0 and props.get("LoadState", "loaded") == "loaded" else {}


def _timespan(text: str) -> float | None:
    """A systemd time span ("1min 15s", "500ms") in seconds; None if it is not one."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]+)", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        return None
    if any(u not in TIMESPAN_UNITS for _, u in parts):
        return None
    return sum(float(n) * TIMESPAN_UNITS[u] for n, u in parts)


def check_alone(config: Config, *, host: bool = True) -> None:
    """check() for `dcod config --check`, with no supervisor: the workers' checks read a copy of
    ``config``, as the supervisor's children read theirs."""
    with tempfile.TemporaryDirectory(prefix="dcod-check-") as directory:
        copy = Path(directory) / "dcod.toml"
        copy.write_text(dump(config))
        check(
            config,
            lambda proxy: [*dcod_command(), "worker", "--config", str(copy), "--proxy", str(proxy.id), "--check"],
            host=host,
        )
