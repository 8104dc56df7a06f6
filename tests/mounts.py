"""Small real filesystems, for a state directory that is full or read-only (root only)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k"):
    """Mount a tmpfs of ``size`` on path for the with block; skips the test where that is not permitted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-n", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-n", "-l", str(path)])


def remount(path: Path, mode: str) -> None:
    """Make the tmpfs on path read-only ("ro") or writable again ("rw")."""
    subprocess.run(["mount", "-n", "-o", f"remount,{mode}", str(path)], check=True)


def fill(path: Path) -> Path:
    """Take every free block of the filesystem of path with a file; returns it (delete it for room)."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler
