"""Directories dcod can trust, and files it creates there without following anyone's symlinks.

A directory is trusted when nobody but its owner can change what is in it, nor swap it for
another: the owner is the one expected, group and others cannot write to it, and every
directory above it belongs to root or to us and is not writable by others either (unless
sticky, like /tmp: there nobody may rename or remove what is not theirs). A symlink on the way
must belong to root or to us. Every refusal says which directory, its owner and mode, and
what to do.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import tempfile
from pathlib import Path

WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UntrustedDirectory(Exception):
    """A directory dcod must not use: the message says which, why, and what to do."""


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def describe(path: Path | str, st: os.stat_result) -> str:
    """``/x (owner alice, mode 0777)``"""
    return f"{path} (owner {user_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o})"


def check_directory(path: Path, what: str, *, owners: frozenset[int] | None = None) -> None:
    """Raise UntrustedDirectory unless ``path`` is a trusted directory (see the module's docstring).

    ``what`` names it in the message ("runtime directory (supervisor.runtime_dir)"); ``owners``
    are the uids it may belong to (by default only ours).
    """
    me = os.geteuid()
    owners = owners if owners is not None else frozenset({me})
    path = Path(os.path.abspath(path))
    # Symlinks on the way: whoever owns one may point it elsewhere at any time.
    for link in (path, *path.parents):
        st = os.lstat(link)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, me):
            raise UntrustedDirectory(
                f"{what} {path}: the symlink {link} belongs to {user_name(st.st_uid)}, "
                f"who may point it elsewhere at any time."
            )
    real = Path(os.path.realpath(path))
    st = os.stat(real)
    shown = path if real == path else f"{path} (= {real})"
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedDirectory(f"{what} {shown} is not a directory.")
    if st.st_uid not in owners:
        expected = " or ".join(user_name(uid) for uid in sorted(owners))
        raise UntrustedDirectory(
            f"{what} {describe(shown, st)} does not belong to {expected}, who runs "
            f"dcod: its owner could change what dcod finds there."
        )
    if st.st_mode & WRITABLE_BY_OTHERS:
        raise UntrustedDirectory(
            f"{what} {describe(shown, st)} is writable by its group or others, who "
            f"could change what dcod finds there: chmod go-w {real}."
        )
    for parent in real.parents:
        st = os.stat(parent)
        if st.st_uid not in (0, me):
            raise UntrustedDirectory(
                f"{what} {shown}: the directory above it, {describe(parent, st)}, belongs "
                f"to {user_name(st.st_uid)}, who could move it away and put another in "
                f"its place."
            )
        if st.st_mode & WRITABLE_BY_OTHERS and not st.st_mode & stat.S_ISVTX:
            raise UntrustedDirectory(
                f"{what} {shown}: the directory above it, {describe(parent, st)}, is "
                f"writable by its group or others (and not sticky), who could move it away "
                f"and put another in its place."
            )


def make_directory(path: Path, mode: int) -> None:
    """Create ``path`` with exactly ``mode`` (whatever the umask) if it is missing, and missing
    parents with 0755; an existing one is left as it is (check it)."""
    path = Path(path)
    if os.path.lexists(path):
        return
    make_directory(path.parent, 0o755)
    try:
        os.mkdir(path, mode)
        # Not chmod(path): in a directory others may write to, it may be a symlink by now.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileExistsError:
        return  # made meanwhile, by someone: the check says whether it will do
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = False) -> None:
    """Replace ``path`` by a file holding ``data``: written under a fresh name (created exclusively,
    no symlink followed), then renamed over it, so a reader sees the old file or the new one whole.
    A symlink at ``path`` is replaced, never followed. ``durable``: fsynced before the rename, and
    the rename after."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL | O_NOFOLLOW
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        if durable:
            sync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def sync_directory(path: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_regular_file(path: Path) -> bool:
    """A regular file, itself (not a symlink to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
