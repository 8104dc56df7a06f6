"""Issue 17, local security, with real processes: children isolated from the working directory and
PYTHON* variables, handler modules from handler_path only; runtime and state directories refused
unless private, attacked by a second user (nobody); files made there through no symlink; one
supervisor per directory, also when it is another user's (the packaged service's)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import dcod
from conftest import free_port, let_others_reach
from dcod import config as configuration
from peers import OracleSession
from runs import DCOD, ECHO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the second user is nobody, through setpriv: root only")

NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
REPO = Path(dcod.__file__).resolve().parent.parent
DEBIAN_PYTHON = "/usr/bin/python3"  # one that nobody may run (ours may be in root's home), with dcod's dependencies


def service_command() -> tuple[str, ...]:
    """`dcod` run by nobody (setpriv drops root's rights only at its exec, so nobody's own children must
    reach python too): Debian's python with this checkout on PYTHONPATH, so children get it explicitly."""
    probe = as_nobody("env", f"PYTHONPATH={REPO}", DEBIAN_PYTHON, "-c", "import dcod.supervisor.supervisor")
    if probe.returncode != 0:
        pytest.skip(
            f"nobody cannot run dcod with {DEBIAN_PYTHON} (apt-get install python3-trio python3-psutil "
            f"python3-sdnotify python3-tomli-w): {probe.stderr.strip()[-200:]}"
        )
    return (*NOBODY, DEBIAN_PYTHON, "-m", "dcod")


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=60)


def config_file(tmp_path: Path, runtime: Path, state: Path, proxies: str = ECHO, name: str = "dcod.toml") -> Path:
    port = free_port()
    path = tmp_path / name
    path.write_text(
        f'[hub]\nlisten = "127.0.0.1:{port}"\nadvertise = "127.0.0.1:{port}"\n'
        f'[supervisor]\nruntime_dir = "{runtime}"\nstate_dir = "{state}"\n' + proxies
    )
    os.chmod(path, 0o644)
    return path


def refused(path: Path, *, command: tuple[str, ...] = DCOD) -> str:
    """`dcod run --config path`, which must refuse to start (exit 1): its stderr."""
    proc = subprocess.Popen(
        [*command, "run", "--config", str(path)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.communicate()
        pytest.fail("dcod run did not refuse: it runs")
    assert proc.returncode == 1, err
    return err


def read_if_there(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def snapshot(*directories: Path) -> dict[str, tuple]:
    """Every file under the directories: inode, size, mtime, and the target of a symlink."""
    files = {}
    for directory in directories:
        for path in [directory, *directory.rglob("*")]:
            st = os.lstat(path)
            files[str(path)] = (
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
            )
    return files


async def roundtrip(address: str, proxy: int, body: bytes = b"ping") -> tuple[int, bytes]:
    session = await OracleSession.connect(address, audsid=7)
    await session.send(proxy, 1, body)
    length, _, _, reply = await session.read()
    session.close()
    return length, reply


# ---------------------------------------------------------------- isolated children

PLANTED_TOMLI_W = """\
import os
with open({trap!r}, "a") as trap:
    trap.write(f"{{os.getpid()}} imported tomli_w.py from the working directory\\n")
raise ImportError("planted")
"""
PLANTED_SITECUSTOMIZE = """\
import os
with open({trap!r}, "a") as trap:
    trap.write(f"{{os.getpid()}} ran sitecustomize.py from PYTHONPATH\\n")
"""


async def test_children_import_nothing_from_the_working_directory_or_pythonpath(run, tmp_path):
    """Root runs the installed `dcod run` from a directory where someone dropped a tomli_w.py, with
    a PYTHONPATH whose sitecustomize.py anyone may have written: the supervisor takes the
    PYTHONPATH it is given, no child takes either."""
    trap = tmp_path / "trapped"
    workdir, pythonpath = tmp_path / "workdir", tmp_path / "pythonpath"
    workdir.mkdir()
    pythonpath.mkdir()
    (workdir / "tomli_w.py").write_text(PLANTED_TOMLI_W.format(trap=str(trap)))
    (pythonpath / "sitecustomize.py").write_text(PLANTED_SITECUSTOMIZE.format(trap=str(trap)))
    console_script = Path(sys.executable).parent / "dcod"  # as /usr/bin/dcod: no working directory on its path
    r = run(ECHO, how={"command": (str(console_script),), "cwd": workdir, "env": {"PYTHONPATH": str(pythonpath)}})
    await r.notification("READY=1")
    assert await roundtrip(r.config.hub.listen, 1) == (16, b"ping")
    children = r.children()
    assert len(children) == 3 and all(c.cmdline()[1] == "-I" for c in children), [c.cmdline() for c in children]
    trapped = trap.read_text().splitlines()
    assert trapped == [f"{r.proc.pid} ran sitecustomize.py from PYTHONPATH"], trapped


async def test_handler_modules_come_from_handler_path_not_from_pythonpath(run, tmp_path):
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "mine.py").write_text("async def handle(req):\n    return b'mine: ' + req.body\n")
    proxies = (
        ECHO + f'[[proxy]]\nid = 2\nhandler = "mine:handle"\nhandler_path = ["{handlers}"]\n'
        '[[proxy]]\nid = 3\nhandler = "mine:handle"\n'
    )
    r = run(proxies, supervisor="restart_max = 1", how={"env": {"PYTHONPATH": str(handlers)}})
    await r.notification("READY=1")
    assert await roundtrip(r.config.hub.listen, 2) == (12 + 10, b"mine: ping")
    assert "worker 3#0: ERROR: handler 'mine:handle': cannot import mine: ModuleNotFoundError" in r.log


# ---------------------------------------------------------------- directories: a second user


@pytest.fixture
def shared(tmp_path) -> Path:
    """A directory where everyone may make their own, as /tmp (mode 1777), reachable by nobody."""
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o1777)
    let_others_reach(directory / "x")
    return directory


@pytest.mark.parametrize("key", ["runtime_dir", "state_dir"])
def test_a_directory_another_user_made_is_refused(tmp_path, shared, key):
    """nobody made it first, open to all (as /tmp/dcod-<uid> was, before the worker sockets were
    hers to replace): `dcod run` refuses it, says whose it is and what to do, and makes nothing there."""
    theirs = shared / "theirs"
    made = as_nobody("mkdir", "-m", "777", str(theirs))
    assert made.returncode == 0, made.stderr
    ours = tmp_path / "ours"
    dirs = {"runtime_dir": ours, "state_dir": ours / "state", key: theirs}
    err = refused(config_file(tmp_path, dirs["runtime_dir"], dirs["state_dir"]))
    assert f"{theirs} (owner nobody, mode 0777) does not belong to root, who runs dcod" in err, err
    assert f"set supervisor.runtime_dir and state_dir in {tmp_path / 'dcod.toml'}" in err, err
    assert os.listdir(theirs) == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777], ids=oct)
def test_our_own_directory_writable_by_others_is_refused(tmp_path, mode):
    runtime = tmp_path / "run"
    runtime.mkdir()
    os.chmod(runtime, mode)
    err = refused(config_file(tmp_path, runtime, tmp_path / "state"))
    assert f"{runtime} (owner root, mode {mode:04o}) is writable by its group or others" in err, err
    assert f"chmod go-w {runtime}" in err
    assert os.listdir(runtime) == []


def test_a_directory_under_one_others_may_write_to_is_refused(tmp_path):
    """Ours, private, but in a directory that is writable by all and not sticky: nobody could
    move it away and put hers in its place."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    let_others_reach(open_dir / "run")
    runtime = open_dir / "run"
    runtime.mkdir(mode=0o700)
    moved = as_nobody("mv", str(runtime), str(open_dir / "moved"))  # what she could do
    assert moved.returncode == 0, moved.stderr
    (open_dir / "moved").rename(runtime)
    err = refused(config_file(tmp_path, runtime, tmp_path / "state"))
    assert (
        f"the directory above it, {open_dir} (owner root, mode 0777), is writable by its group or others "
        f"(and not sticky)" in err
    ), err


def test_a_symlink_of_another_user_on_the_way_is_refused(tmp_path, shared):
    """nobody's symlink in a sticky directory, to a directory of ours: she may repoint it at any time."""
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = shared / "link"
    made = as_nobody("ln", "-s", str(ours), str(link))
    assert made.returncode == 0, made.stderr
    err = refused(config_file(tmp_path, link, tmp_path / "state"))
    assert f"the symlink {link} belongs to nobody" in err, err


# ---------------------------------------------------------------- files: no symlink followed


async def test_no_file_is_made_through_a_symlink(run, tmp_path):
    """Symlinks at the names dcod writes (the unclean-stop marker, a configuration copy and its
    former temporary name, the alert file) are replaced or removed, never written through."""
    r = run(ECHO)
    await r.notification("READY=1")
    [copy] = r.config.runtime_dir.glob("config-*.toml")
    assert oct(copy.stat().st_mode & 0o777) == "0o600"
    assert r.stop() == 0
    victims = {}
    for name in (r.config.state_dir / "hub.running", copy, copy.with_suffix(".partial"), r.config.alert_file):
        victim = tmp_path / f"victim-{name.name}"
        victim.write_text("precious\n")
        name.unlink(missing_ok=True)
        name.symlink_to(victim)
        victims[name] = victim
    again = run(config=r.config)
    await again.notification("READY=1")
    assert stat.S_ISREG(os.lstat(r.config.state_dir / "hub.running").st_mode)
    assert stat.S_ISREG(os.lstat(copy).st_mode)
    assert again.stop() == 0
    assert stat.S_ISREG(os.lstat(r.config.alert_file).st_mode)  # the alert of the stop replaced the symlink
    assert {str(v): v.read_text() for v in victims.values()} == {str(v): "precious\n" for v in victims.values()}


def test_a_symlink_for_the_lock_file_is_refused(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (runtime / "dcod.lock").symlink_to(victim)
    err = refused(config_file(tmp_path, runtime, tmp_path / "state"))
    assert f"{runtime / 'dcod.lock'}: a symlink, not dcod's lock file: remove it" in err, err
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------- one supervisor per directory


async def test_a_second_run_on_the_same_directories_exits_1_and_touches_nothing(run, tmp_path):
    first = run(ECHO)
    await first.notification("READY=1")
    config = first.config
    alert = read_if_there(config.alert_file)
    before = snapshot(config.runtime_dir, config.state_dir)
    second = config_file(tmp_path, config.runtime_dir, config.state_dir, name="second.toml")  # another port

    err = refused(second)
    assert (
        f"runtime directory (supervisor.runtime_dir) {config.runtime_dir} is in use by another dcod run "
        f"(pid {first.proc.pid})" in err
    ), err
    assert snapshot(config.runtime_dir, config.state_dir) == before
    assert read_if_there(config.alert_file) == alert
    port = int(second.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    status = subprocess.run([*DCOD, "status", "--json", "--config", str(second)], capture_output=True, text=True)
    assert json.loads(status.stdout)["supervisor"]["pid"] == first.proc.pid
    assert await roundtrip(config.hub.listen, 1) == (16, b"ping")

    # The state directory alone is locked too.
    other_runtime = config_file(tmp_path, tmp_path / "other-run", config.state_dir, name="third.toml")
    err = refused(other_runtime)
    assert (
        f"state directory (supervisor.state_dir) {config.state_dir} is in use by another dcod run "
        f"(pid {first.proc.pid})" in err
    ), err

    assert first.stop() == 0
    then = run(config=first.config)  # the lock went with the first
    await then.notification("READY=1")


async def test_another_users_run_is_refused_the_directories_of_a_running_service(run, tmp_path):
    """As the packaged service: a supervisor runs as its own user (nobody here, dcod there) in the
    directories systemd made for it (RuntimeDirectory=, StateDirectory=: its own, 0751 and 0750).
    Root's `dcod run` on them (the conffile names them) is refused, naming the owner and the pid;
    a second run as the service's user is refused by the lock; the service goes on untouched."""
    runtime, state = tmp_path / "service-run", tmp_path / "service-state"
    for directory, mode in ((runtime, 0o751), (state, 0o750)):
        directory.mkdir()
        os.chmod(directory, mode)
        os.chown(directory, 65534, 65534)
    path = config_file(tmp_path, runtime, state)
    let_others_reach(path, Path(dcod.__file__))
    as_service = service_command()
    service = run(config=configuration.load(path), how={"command": as_service, "env": {"PYTHONPATH": str(REPO)}})
    await service.notification("READY=1")
    alert = read_if_there(service.config.alert_file)
    before = snapshot(runtime, state)

    err = refused(path)
    assert f"{runtime} (owner nobody, mode 0751) does not belong to root, who runs dcod" in err, err
    assert f"A dcod run (pid {service.proc.pid}) uses it" in err, err
    err = refused(path, command=as_service)
    assert f"{runtime} is in use by another dcod run (pid {service.proc.pid})" in err, err

    assert snapshot(runtime, state) == before
    assert read_if_there(service.config.alert_file) == alert
    assert await roundtrip(service.config.hub.listen, 1) == (16, b"ping")
    children = service.children()
    assert len(children) == 3 and all(c.uids().real == 65534 and c.cmdline()[1] == "-I" for c in children)
