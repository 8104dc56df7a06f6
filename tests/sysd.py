"""A real, throwaway systemd for end-to-end tests (a Python take on /work/shared/tools/sysd-sandbox.sh).

systemd runs as PID 1 of private pid, mount, uts, ipc, cgroup and net namespaces. Inside,
/etc /var /usr /opt are overlays whose upper layers live on a private tmpfs, and /run /tmp are
tmpfs: `dpkg -i`, `systemctl enable`, users made by systemd-sysusers, StateDirectory= ... never
touch the host; the rest of the root filesystem (the checkout included) is shared read-write.
The network namespace is private (nothing clashes with a port in use on the host): run clients
with ``sandbox.run(...)`` or get a socket in it with ``sandbox.connect(port)``.

    with Sandbox() as sb:                       # or: sb = Sandbox(); sb.start(); ...; sb.stop()
        sb.run("dpkg", "-i", sb.put("/path/dcod.deb"))
        sb.systemctl("start", "dco-hub.socket")
        sb.show("dco-hub.service", "MainPID")   # -> {"MainPID": "123"}
        sb.journal("dco-hub.service")

``stop()`` always cleans up (asks systemd to exit, SIGKILLs the namespace's init when it does
not, removes the cgroups and the state directory) and may be called more than once. If the test
process itself is SIGKILLed, the sandbox dies with it (PR_SET_PDEATHSIG) and the next Sandbox
removes what was left (``cleanup_stale``).

``unavailable()`` says why a sandbox cannot run here (not root, tools or namespaces missing),
for ``pytest.skip``.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

BASE = Path(os.environ.get("SYSD_BASE", "/tmp/sysd"))
PREFIX = "sysd-py-"
CGROUP_V1 = Path("/sys/fs/cgroup/systemd")  # the name=systemd hierarchy of a hybrid host
CGROUP_V2 = Path("/sys/fs/cgroup/unified")  # its cgroup2 hierarchy
SYSTEMD = Path("/lib/systemd/systemd")
UNIT_DIR = Path("/lib/systemd/system")
# Tools run inside get a plain environment: Debian's own binaries and python3, never a venv's.
INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}
# PATH for the namespaces' init: Debian's, not pyenv's or a venv's
INIT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000

# PID 1 of the new namespaces: prepares the mounts, then exec's systemd (see sysd-sandbox.sh).
INNER_SH = r"""#!/bin/bash
set -euo pipefail
STATE="$1" CGMODE="$2"
# every mount/umount uses -n: libmount must not create /run/mount/utab on the host's /run
mount -n -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mkdir /run/.keep; mount -n --bind "$STATE" /run/.keep
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p "$STATE"; mount -n --move /run/.keep "$STATE"; rmdir /run/.keep
# /proc/sys and /sys read-only (per-mount flag; host superblocks untouched)
for p in /proc/sys /proc/sysrq-trigger; do [ -e $p ] || continue; mount -n --bind $p $p; mount -n -o remount,bind,ro $p; done
umount -n -l /sys/fs/cgroup
mount -n --bind /sys /sys; mount -n -o remount,bind,ro,nosuid,nodev,noexec /sys
# cgroups: fresh mounts inside our cgroup namespace => their root is our own sub-cgroup
if [ "$CGMODE" = hybrid ]; then
  mount -n -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs /sys/fs/cgroup
  mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
  mount -n -t cgroup -o none,name=systemd,nosuid,nodev,noexec cgroup /sys/fs/cgroup/systemd
  mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup/unified
  mount -n -o remount,ro /sys/fs/cgroup
else
  mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
fi
# private minimal /dev (console and kmsg are plain files in $STATE)
D=/run/.dev; mkdir $D; mount -n -t tmpfs -o mode=755,nosuid tmpfs $D
for n in null zero full random urandom tty; do touch $D/$n; mount -n --bind /dev/$n $D/$n; done
touch $D/console $D/kmsg; mount -n --bind "$STATE/console" $D/console; mount -n --bind "$STATE/kmsg" $D/kmsg
mkdir $D/pts $D/shm
mount -n -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts $D/pts
ln -s pts/ptmx $D/ptmx
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs $D/shm
ln -s /proc/self/fd $D/fd; ln -s /proc/self/fd/0 $D/stdin; ln -s /proc/self/fd/1 $D/stdout; ln -s /proc/self/fd/2 $D/stderr
umount -n -l /dev; mount -n --move $D /dev; rmdir $D
# /etc, /var, /usr, /opt: overlays with their upper layer in the private /run
for d in etc var usr opt; do
  mkdir -p /run/sysd-overlay/$d/upper /run/sysd-overlay/$d/work
  mount -n -t overlay -o lowerdir=/$d,upperdir=/run/sysd-overlay/$d/upper,workdir=/run/sysd-overlay/$d/work overlay /$d
done
# a policy-rc.d that forbids starting services (as in build containers) is the host's business
rm -f /usr/sbin/policy-rc.d
# empty /etc/systemd/system inside (the host's enabled units are hidden); part of the unit path
mount -n -t tmpfs -o mode=755 tmpfs /etc/systemd/system
# no generators (their output would be ignored anyway; faster start)
mount -n -t tmpfs -o ro,mode=755 tmpfs /usr/lib/systemd/system-generators
# journald: volatile, does not read the (host) kernel log
mkdir -p /run/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nRateLimitBurst=0\n' > /run/systemd/journald.conf.d/00-sysd.conf
ip link set lo up 2>/dev/null || true
exec env -i container=sysd-test SYSTEMD_UNIT_PATH="/etc/systemd/system:/run/systemd/system:$STATE/units" \
  PATH=__PATH__ LANG=C.UTF-8 "__SYSTEMD__" --system --unit=multi-user.target --show-status=no </dev/null
"""


class SandboxError(RuntimeError):
    pass


def unavailable() -> str | None:
    """Why a sandbox cannot run on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "the systemd sandbox needs root (namespaces, mounts, cgroups)"
    for tool in ("unshare", "nsenter", "mount", "setsid", "bash"):
        if shutil.which(tool, path=INIT_PATH) is None:
            return f"the systemd sandbox needs {tool} (util-linux)"
    if not SYSTEMD.exists():
        return f"the systemd sandbox needs systemd ({SYSTEMD} is missing)"
    for ns in ("pid", "mnt", "uts", "ipc", "cgroup", "net"):
        if not Path(f"/proc/self/ns/{ns}").exists():
            return f"the kernel has no {ns} namespaces"
    if cgroup_mode() is None:
        return "no usable cgroup hierarchy (need a hybrid name=systemd+cgroup2 or a cgroup2 /sys/fs/cgroup)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "--net", "true"],
        capture_output=True,
        text=True,
        env=INNER_ENV,
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip() or probe.returncode}"
    return None


def cgroup_mode() -> str | None:
    """ "hybrid" (name=systemd v1 + cgroup2 under unified/, as on this project's machines),
    "unified" (cgroup2 mounted on /sys/fs/cgroup), else None."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    types = {line.split()[1]: line.split()[2] for line in mounts}
    if types.get(str(CGROUP_V1)) == "cgroup" and types.get(str(CGROUP_V2)) == "cgroup2":
        return "hybrid"
    if types.get("/sys/fs/cgroup") == "cgroup2":
        return "unified"
    return None


def _cgroup_roots(mode: str) -> list[Path]:
    return [CGROUP_V1, CGROUP_V2] if mode == "hybrid" else [Path("/sys/fs/cgroup")]


def _remove_cgroup(path: Path) -> None:
    """rmdir a cgroup and its sub-cgroups, deepest first (they must be empty of processes)."""
    if not path.is_dir():
        return
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def _cgroup_pids(path: Path) -> list[int]:
    pids = []
    for procs in path.rglob("cgroup.procs"):
        try:
            pids += [int(x) for x in procs.read_text().split()]
        except OSError:
            pass
    return pids


def cleanup_stale() -> None:
    """Remove what sandboxes of dead test processes left behind (their pid is in the name)."""
    mode = cgroup_mode()
    names = set()
    for root in _cgroup_roots(mode) if mode else []:
        if root.is_dir():
            names |= {p.name for p in root.glob(PREFIX + "*")}
    if BASE.is_dir():
        names |= {p.name for p in BASE.glob(PREFIX + "*")}
    for name in names:
        match = re.match(re.escape(PREFIX) + r"(\d+)-", name)
        if not match or Path(f"/proc/{match[1]}").exists():
            continue  # its owner is alive (or not ours)
        for root in _cgroup_roots(mode) if mode else []:
            cg = root / name
            for pid in _cgroup_pids(cg):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(50):
                if not _cgroup_pids(cg):
                    break
                time.sleep(0.02)
            _remove_cgroup(cg)
        shutil.rmtree(BASE / name, ignore_errors=True)


class Sandbox:
    """One systemd 252 instance in private namespaces. See the module docstring."""

    def __init__(self, expose: tuple[str, ...] = (), boot_timeout: float = 20.0) -> None:
        """``expose``: unit names that packages will install into /lib/systemd/system.

        That directory is not in the sandbox's unit path (its *.wants would pull in udev, getty,
        logind ...); each exposed name is a link to it from a directory that is, dangling until
        a package installs the file (its postinst's daemon-reload then finds it).
        """
        self.expose = tuple(expose)
        self.id = f"{PREFIX}{os.getpid()}-{os.urandom(3).hex()}"
        self.state = BASE / self.id
        self.boot_timeout = boot_timeout
        self.mode = cgroup_mode()
        self.unshare: subprocess.Popen | None = None
        self.pid: int | None = None  # host pid of the namespaces' PID 1 (systemd)
        self._cgroups: list[Path] = []

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Sandbox:
        reason = unavailable()
        if reason:
            raise SandboxError(reason)
        cleanup_stale()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        units = self.state / "units"
        (units / "sysinit.target.wants").mkdir(parents=True)
        (units / "sockets.target.wants").mkdir()
        (self.state / "console").touch()
        (self.state / "kmsg").touch()
        # Unit path: the (empty) /etc/systemd/system and /run/systemd/system inside, plain copies of
        # the stock targets and slices (no *.wants: nothing else is pulled in), journald and dbus,
        # and links to the exposed units. /lib/systemd/system is not searched.
        stock = [p for p in UNIT_DIR.glob("*.target") if p.name != "default.target"]
        stock += [
            UNIT_DIR / n
            for n in (
                "machine.slice",
                "user.slice",
                "systemd-exit.service",
                "systemd-poweroff.service",
                "systemd-halt.service",
                "systemd-reboot.service",
                "systemd-journald.service",
                "systemd-journald.socket",
                "systemd-journald-dev-log.socket",
                "dbus.service",
                "dbus.socket",
            )
        ]
        for unit in stock:
            if unit.exists():
                shutil.copy(unit, units / unit.name)
        (units / "default.target").symlink_to("multi-user.target")
        for name in self.expose:
            (units / name).symlink_to(UNIT_DIR / name)
        (units / "sysinit.target.wants" / "systemd-journald.service").symlink_to("../systemd-journald.service")
        for s in ("systemd-journald.socket", "systemd-journald-dev-log.socket", "dbus.socket"):
            if (units / s).exists():
                (units / "sockets.target.wants" / s).symlink_to(f"../{s}")
        inner = self.state / "inner.sh"
        inner.write_text(INNER_SH.replace("__PATH__", INIT_PATH).replace("__SYSTEMD__", str(SYSTEMD)))
        inner.chmod(0o755)

        self._cgroups = [root / self.id for root in _cgroup_roots(self.mode)]
        for cg in self._cgroups:
            cg.mkdir()
        procs = " ".join(str(cg / "cgroup.procs") for cg in self._cgroups)
        log = open(self.state / "unshare.log", "wb")
        # the shell moves itself into our cgroups, then becomes unshare, whose child is PID 1 inside
        script = (
            f"for f in {procs}; do echo $$ > $f; done; "
            f"exec unshare --pid --fork --kill-child --mount --mount-proc --propagation private "
            f"--uts --ipc --cgroup --net {inner} {self.state} {self.mode}"
        )
        self.unshare = subprocess.Popen(
            ["bash", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=INNER_ENV,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + self.boot_timeout
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        while self.pid is None:
            try:
                text = children.read_text().split()
            except OSError:
                text = []
            if text:
                self.pid = int(text[0])
            elif self.unshare.poll() is not None or time.monotonic() > deadline:
                raise SandboxError(f"no namespace init: {self._logs()}")
            else:
                time.sleep(0.005)
        state = ""
        while True:
            if self.unshare.poll() is not None:
                raise SandboxError(f"the sandbox died while booting: {self._logs()}")
            if Path(f"/proc/{self.pid}/root/run/systemd/private").is_socket():
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if time.monotonic() > deadline:
                raise SandboxError(f"systemd did not come up in {self.boot_timeout}s (state {state!r}): {self._logs()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        if self.unshare is not None and self.unshare.poll() is None:
            if self.pid is not None:
                try:
                    subprocess.run(
                        ["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", "exit", "0"],
                        capture_output=True,
                        timeout=10,
                        env=INNER_ENV,
                    )
                except subprocess.TimeoutExpired:
                    pass
                try:
                    self.unshare.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if self.unshare.poll() is None:
                # SIGKILL to the namespace's PID 1: the kernel kills every process in it
                for pid in filter(None, (self.pid, self.unshare.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.unshare.wait()
        for cg in self._cgroups:
            for _ in range(100):  # processes killed with the namespace may take a moment to go
                pids = _cgroup_pids(cg)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.02)
            _remove_cgroup(cg)
        shutil.rmtree(self.state, ignore_errors=True)
        self.unshare = None
        self.pid = None

    def _logs(self) -> str:
        parts = []
        for name in ("unshare.log", "kmsg", "console"):
            try:
                text = (self.state / name).read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"--- {name}\n{text[-3000:]}")
        return "\n".join(parts) or "(no output)"

    # ------------------------------------------------------------ inside

    def nsenter(self, user: str | None = None) -> list[str]:
        """The command prefix that runs a program inside (all its namespaces, its root)."""
        if self.pid is None:
            raise SandboxError("the sandbox is not running")
        prefix = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-n", "-C", "--"]
        if user:
            prefix += ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"]
        return prefix

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 60,
        user: str | None = None,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command inside (as root, or as ``user`` with that user's groups); output as text."""
        argv = self.nsenter(user) + list(cmd)
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input, env={**INNER_ENV, **(env or {})}
        )
        if check and result.returncode != 0:
            raise SandboxError(
                f"{' '.join(cmd)}: exit status {result.returncode}\n"
                f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
            )
        return result

    def popen(self, *cmd: str, user: str | None = None, **kwargs) -> subprocess.Popen:
        """Start a command inside without waiting (e.g. a load generator); output as text."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.nsenter(user) + list(cmd), text=True, env=INNER_ENV, **kwargs)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """Unit properties (systemctl show -p ...), as strings."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *args: str) -> str:
        """The journal's messages (of one unit), oldest first."""
        self.run("journalctl", "--sync", check=False)
        sel = ["-u", unit] if unit else []
        return self.run("journalctl", "--no-pager", "-o", "cat", *sel, *args, check=False).stdout

    def wait_until(self, predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
        """Poll ``predicate()`` until it returns something true; return it, or fail at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise SandboxError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def put(self, host_file: str | Path) -> str:
        """Copy a host file (e.g. from the host's /tmp, which is not visible inside) to where the
        sandbox sees it; returns the path to use inside."""
        dest = self.state / "files" / Path(host_file).name
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(host_file, dest)
        return str(dest)  # $STATE is visible inside at the same path

    def path(self, inner: str) -> Path:
        """A path inside, as seen from the host (through /proc/<pid>/root)."""
        return Path(f"/proc/{self.pid}/root") / inner.lstrip("/")

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
        """A TCP connection from inside the sandbox's network namespace, usable from this process."""
        result: dict = {}

        def in_netns() -> None:  # setns() changes only this thread's network namespace
            try:
                fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                result["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                result["error"] = e

        thread = threading.Thread(target=in_netns)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        sock = result["sock"]
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (then --kill-child takes
    the namespace's init, and the kernel every process in it)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
