"""The supervisor's directories: private to the user it runs as, and one supervisor in each.

`dcod run` claims them before it touches anything else. The runtime directory (sockets, the
configuration copies, the quit alert) and the state directory (the spool, the unclean-stop
marker) are made if missing, refused unless trusted (dcod.fs: ours, writable by nobody else,
nor swappable by anyone else), then locked: a file ``dcod.lock`` in each, flock'ed for the
supervisor's life (the kernel lets go when it dies, even by SIGKILL) and holding its pid. A
second `dcod run` on either finds the lock taken and stops there, naming that pid.

The packaged service's directories, /run/dcod and /var/lib/dcod, belong to user dcod: any other
user's `dcod run`, root's too, is refused them by their owner alone, and user dcod's by the lock
while the service runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

from dcod import fs
from dcod.config import BUILTIN, Config

log = logging.getLogger(__name__)

LOCK_FILE = "dcod.lock"
RUNTIME_MODE = 0o751  # as RuntimeDirectoryMode= of dco-hub.service: the alert file is reachable by its path
STATE_MODE = 0o700  # the spool holds the requests' bodies
ALERT_DIR_MODE = 0o755  # the quit alert is read by the Oracle sessions' users
SERVICE_DIRS = (Path("/run/dcod"), Path("/var/lib/dcod"))  # RuntimeDirectory=, StateDirectory= of dco-hub.service


class Refused(Exception):
    """`dcod run` cannot use its directories: the message says which, why, and what to do."""


class Claim:
    """The locks on the runtime and state directories, held until released (or the process ends)."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _directories(config: Config) -> list[tuple[str, str, Path, int, bool]]:
    """(key, what, path, mode, locked) of each directory `dcod run` makes and checks, in that order."""
    directories = [
        ("supervisor.runtime_dir", "runtime directory", config.runtime_dir, RUNTIME_MODE, True),
        ("supervisor.state_dir", "state directory", config.state_dir, STATE_MODE, True),
    ]
    if "file" in config.alert.backends:
        directories.append(("alert.dir", "alert directory", config.alert_dir, ALERT_DIR_MODE, False))
    return directories


def claim(config: Config) -> Claim:
    """Make, check and lock the runtime and state directories, then make and check the alert
    directory (file backend). Raises Refused."""
    held = Claim()
    try:
        locked: set[str] = set()
        for key, what, path, mode, lock in _directories(config):
            _make_trusted(path, f"{what} ({key})", mode, config)
            if lock and os.path.realpath(path) not in locked:  # one lock if both are the same directory
                held.fds.append(_lock(path, f"{what} ({key})"))
                locked.add(os.path.realpath(path))
    except BaseException:
        held.release()
        raise
    return held


def check(config: Config) -> list[tuple[str, str]]:
    """What claim() would refuse, as (key, reason), without making or locking anything (a dcod run
    may hold the locks): each directory is trusted and writable by us, or can be made. The packaged
    service's own directories are left out: systemd makes them for user dcod when it starts the service."""
    refusals = []
    for key, what, path, mode, _ in _directories(config):
        if not _is_service_dir(path):
            try:
                _make_trusted(path, f"{what} ({key})", mode, config, make=False)
            except Refused as e:
                refusals.append((key, str(e)))
    return refusals


def _make_trusted(path: Path, what: str, mode: int, config: Config, *, make: bool = True) -> None:
    """Make ``path`` if missing (without ``make``: only see that it could be), then check it is
    trusted (and, without ``make``, writable by us)."""
    try:
        if make:
            fs.make_directory(path, mode)
        elif not os.path.lexists(path):
            _can_make(path)
            return
        fs.check_directory(path, what)
        if not make and not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"not writable by {fs.user_name(os.geteuid())}", str(path))
    except fs.UntrustedDirectory as e:
        raise Refused(f"{e} {_remedy(path, config)}") from None
    except OSError as e:
        raise Refused(f"{what} {path}: {e.strerror} ({e.filename}). {_remedy(path, config)}") from None


def _can_make(path: Path) -> None:
    """OSError unless fs.make_directory(path) could make it: its nearest existing ancestor is a
    directory we may write to."""
    ancestor = next(p for p in Path(os.path.abspath(path)).parents if os.path.lexists(p))
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(ancestor))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        user = fs.user_name(os.geteuid())
        raise PermissionError(errno.EACCES, f"cannot be made: not writable by {user}", str(ancestor))


def _is_service_dir(path: Path) -> bool:
    return any(Path(os.path.abspath(path)).is_relative_to(d) for d in SERVICE_DIRS)


def _remedy(path: Path, config: Config) -> str:
    """What the operator can do; who uses the directory, if a dcod run does."""
    pid = holder(path)
    used = f"A dcod run (pid {pid}) uses it. " if pid else ""
    if _is_service_dir(path):
        used += (
            "It is the packaged service's (dco-hub.service, user dcod): `systemctl start dco-hub` runs "
            "that one, `dcod status` asks it. "
        )
    where = f"in {config.source}" if config.source != BUILTIN else "in a file given with --config"
    return f"{used}To run dcod yourself, set supervisor.runtime_dir and state_dir {where} to directories of your own."


def _lock(directory: Path, what: str) -> int:
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        kind = "a symlink, not dcod's lock file: remove it" if os.path.islink(path) else e.strerror
        raise Refused(f"{what}: {path}: {kind}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise Refused(
            f"{what} {directory} is in use by another dcod run (pid {pid}): stop that one first "
            f"(`dcod stop --config ...`, or `systemctl stop dco-hub` for the service), or give this one "
            f"directories of its own (supervisor.runtime_dir, state_dir)"
        ) from None
    os.ftruncate(fd, 0)
    try:
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:  # a full disk: the lock holds all the same, only its holder goes unnamed
        log.warning("%s: cannot write our pid in it (%s); the lock holds", path, e.strerror)
    return fd


def holder(directory: Path) -> int | None:
    """The pid of the dcod run holding the directory's lock, if one does (and we may read it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            return int(pid) if pid.isdigit() else None
        finally:
            os.close(fd)  # also lets go of a lock we got: nobody holds it
    return None


def _read_pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
