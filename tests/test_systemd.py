"""End to end under a real systemd 252: the .deb installed in a sandbox (tests/sysd.py), then
socket activation, status, stop, crash and restart, reload and package upgrade under load, purge.

The .deb is built once per session by packaging/deb/build.sh (from a copy of the tree, into a
temporary directory). Every test gets a fresh sandbox with the package installed, so each one
starts from a just-installed system. Select them with ``pytest -m systemd``; they skip, with
the reason, when not root, when namespaces or the Debian build tools are missing.

Inside, dcod runs on Debian's python3 and python3-* modules (installed on the host by .ci/run:
the sandbox's /usr is an overlay of the host's), as user dcod, under the hardened unit.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

import sysd
from dcod import __version__
from peers import ORACLE_MAGIC, request_pdu

pytestmark = pytest.mark.systemd

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "deb" / "build.sh"
UNITS = ("dco-hub.socket", "dco-hub.service")
SERVICE = "dco-hub.service"
SOCKET = "dco-hub.socket"
PORT = 1523
EXPOSURE_MAX = 2.5
ALERT_FILE = "/run/dcod/alerts/Noradle-DCO-EXTHUB-QUIT"
NEXT_VERSION = f"{__version__}.post1"  # of the package an upgrade installs (build.sh --version)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    """The .deb, built once per session into a temporary directory."""
    return build_deb(tmp_path_factory)


@pytest.fixture(scope="session")
def deb_next(tmp_path_factory, deb) -> Path:
    """A newer .deb of the same tree (NEXT_VERSION), to upgrade to."""
    return build_deb(tmp_path_factory, "--version", NEXT_VERSION)


def build_deb(tmp_path_factory, *options: str) -> Path:
    """packaging/deb/build.sh into a temporary directory; skips the test if it cannot be built here."""
    reason = sysd.unavailable()
    if reason:
        pytest.skip(reason)
    missing = [
        t for t in ("dpkg-buildpackage", "dh", "dh_python3", "git") if shutil.which(t, path=sysd.INIT_PATH) is None
    ]
    if missing or not Path("/usr/share/perl5/Debian/Debhelper/Buildsystem/pybuild.pm").exists():
        pytest.skip(
            f"the Debian build tools are missing ({', '.join(missing) or 'dh-python pybuild'}): "
            "apt-get install debhelper dh-python pybuild-plugin-pyproject python3-all (see .ci/run)"
        )
    work = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        [str(BUILD), "--no-lintian", "--out", str(work / "dist"), "--workdir", str(work / "build"), *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode == 3:
        pytest.skip(f"cannot build the .deb here: {result.stderr.strip()}")
    assert result.returncode == 0, f"packaging/deb/build.sh failed:\n{result.stdout}\n{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def sandbox():
    """A fresh systemd in private namespaces, torn down whatever happens."""
    reason = sysd.unavailable()
    if reason:
        pytest.skip(reason)
    sb = sysd.Sandbox(expose=UNITS)
    try:
        sb.start()
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def installed(sandbox, deb):
    """A sandbox with the .deb just installed (`dpkg -i`; its postinst starts the socket)."""
    # the man-db trigger would take a second per install (seconds on an upgrade) for nothing: the
    # answer, and the flag file that man-db's configuration would remove for it
    sandbox.run("sh", "-c", "echo 'man-db man-db/auto-update boolean false' | debconf-set-selections")
    sandbox.run("rm", "-f", "/var/lib/man-db/auto-update")
    sandbox.run("dpkg", "-i", sandbox.put(deb))
    return sandbox


# ---------------------------------------------------------------- helpers


def echo_call(
    sb: sysd.Sandbox, body: bytes, proxy: int = 1, audsid: int = 4242, rseq: int = 1, timeout: float = 20.0
) -> tuple[int, int, int, bytes]:
    """One request as an Oracle session sends it (raw bytes, from the host through the
    sandbox's netns): the 16-byte handshake, then a PDU; returns the reply PDU."""
    with sb.connect(PORT, timeout=timeout) as sock:
        sock.sendall(struct.pack(">iiiI", ORACLE_MAGIC, 17, 4242, audsid) + request_pdu(proxy, rseq, body))
        header = _recv_exactly(sock, 12)
        length, field2, got_rseq = struct.unpack(">iIi", header)
        return length, field2, got_rseq, _recv_exactly(sock, abs(length) - 12)


def _recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def activate(sb: sysd.Sandbox) -> dict[str, str]:
    """Start the service by connecting (socket activation); wait until it is active (READY=1)."""
    length, audsid, rseq, body = echo_call(sb, b"wake up")
    assert (length, audsid, rseq, body) == (12 + 7, 4242, 1, b"wake up")
    return wait_active(sb)


def wait_active(sb: sysd.Sandbox, timeout: float = 30.0) -> dict[str, str]:
    def active():
        props = sb.show(SERVICE, "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts", "Result")
        if props["ActiveState"] == "failed":
            pytest.fail(f"{SERVICE} failed: {props}\n{sb.journal(SERVICE)}")
        return props if props["ActiveState"] == "active" and props["MainPID"] != "0" else None

    return sb.wait_until(active, timeout=timeout, what=f"{SERVICE} to be active")


def service_pids(sb: sysd.Sandbox) -> list[int]:
    """Every process in the service's cgroup (pids inside the sandbox)."""
    out = sb.run("systemd-cgls", "--no-pager", "-u", SERVICE, check=False).stdout
    return [int(m) for m in re.findall(r"[├└]─(\d+) ", out)]


def has_command(sb: sysd.Sandbox, command: str) -> bool:
    return sb.run("dcod", command, "--help", check=False).returncode == 0


def status_json(sb: sysd.Sandbox) -> dict:
    """`dcod status --json` inside, whether all is up (exit status 0) or not (3)."""
    result = sb.run("dcod", "status", "--json", check=False)
    assert result.returncode in (0, 3) and result.stdout, result.stderr
    return json.loads(result.stdout)


def alert_counter(sb: sysd.Sandbox) -> int:
    text = sb.run("cat", ALERT_FILE, check=False).stdout
    return int(text.split()[0]) if text else 0


def under_load(sb: sysd.Sandbox, duration: float, action):
    """``action()`` 2 s into ``duration`` s of `dcod bench` against the service (8 sessions, 2 requests
    outstanding each): (what it returned, the seconds it took, whether the load outlasted it, the
    bench's figures, its stderr)."""
    bench = _start_bench(sb, duration)
    try:
        time.sleep(2.0)
        t0 = time.monotonic()
        done = action()
        took = time.monotonic() - t0
        outlasted = bench.poll() is None
        out, err = bench.communicate(timeout=90)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    return done, took, outlasted, json.loads(out), err


def _start_bench(sb: sysd.Sandbox, duration: float) -> subprocess.Popen:
    return sb.popen(
        "dcod",
        "bench",
        "--hub",
        f"127.0.0.1:{PORT}",
        "--sessions",
        "8",
        "--depth",
        "2",
        "--warmup",
        "0.5",
        "--duration",
        str(duration),
        "--json",
    )


def exposure(text: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text)
    assert match, text
    return float(match[1])


# ---------------------------------------------------------------- tests


def test_install(installed):
    """dpkg -i: user and group, socket enabled and listening, service not started yet, the
    config a conffile that validates, the unit as hardened as promised."""
    sb = installed
    user = sb.run("getent", "passwd", "dcod").stdout.strip().split(":")
    assert user[5] == "/var/lib/dcod" and user[6] in ("/usr/sbin/nologin", "/sbin/nologin"), user
    assert int(user[2]) < 1000, f"not a system user: {user}"
    assert sb.run("getent", "group", "dcod").returncode == 0
    assert sb.systemctl("is-enabled", SOCKET).stdout.strip() == "enabled"
    assert sb.show(SOCKET, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "listening"}
    # where the shipped configuration says (hub.listen): loopback only
    assert sb.show(SOCKET, "Listen")["Listen"] == "127.0.0.1:1523 (Stream)"
    assert sb.show(SERVICE, "ActiveState")["ActiveState"] == "inactive", "postinst must not start the service"
    assert "/etc/dcod/dcod.toml" in sb.run("dpkg-query", "-W", "-f=${Conffiles}", "dcod").stdout
    sb.run("dcod", "config", "--check")
    config = sb.run("dcod", "config").stdout
    assert '"127.0.0.1:1523"' in config and 'runtime_dir = "/run/dcod"' in config
    out = sb.run("systemd-analyze", "security", "--no-pager", SERVICE, check=False).stdout
    assert exposure(out) <= EXPOSURE_MAX, out
    print(f"systemd-analyze security {SERVICE}: exposure {exposure(out)}")


def test_socket_activation(installed):
    """The first Oracle-side connection starts the service; the echo reply comes back; systemd
    shows the supervisor's STATUS=; everything runs as dcod, in the service's cgroup."""
    sb = installed
    t0 = time.monotonic()
    length, audsid, rseq, body = echo_call(sb, b"hello from PL/SQL", audsid=77, rseq=5)
    first_reply = time.monotonic() - t0
    assert (length, audsid, rseq, body) == (12 + 17, 77, 5, b"hello from PL/SQL")
    props = wait_active(sb)
    assert props["NRestarts"] == "0"
    assert "serving" in props["StatusText"], props
    status = sb.systemctl("status", SERVICE, check=False).stdout
    assert f'Status: "{props["StatusText"]}"' in status, status
    assert "TriggeredBy:" in status and SOCKET in status
    pids = service_pids(sb)
    assert len(pids) >= 4, f"supervisor, hub and two echo workers expected: {pids}"  # the default config
    for pid in pids:
        uid_line = next(
            line for line in sb.path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")
        )
        assert sb.run("id", "-u", "dcod").stdout.strip() == uid_line.split()[1], f"pid {pid}: {uid_line}"
    assert sb.run("dcod", "call", "1", "through the packaged client").stdout == "through the packaged client\n"
    unknown = sb.run("dcod", "call", "9", "nobody", check=False)
    assert unknown.returncode != 0 and "DCO-0001" in unknown.stdout + unknown.stderr
    # the directories systemd made, with the modes the unit asks for
    assert sb.run("stat", "-c", "%U:%G %a", "/run/dcod").stdout.split() == ["dcod:dcod", "751"]
    assert sb.run("stat", "-c", "%U:%G %a", "/var/lib/dcod").stdout.split() == ["dcod:dcod", "750"]
    # the supervisor pings the watchdog (WatchdogSec=)
    sb.wait_until(
        lambda: sb.show(SERVICE, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != "0",
        timeout=10,
        what="a WATCHDOG=1",
    )
    print(f"first reply through socket activation after {first_reply:.2f}s")


def test_stop(installed):
    """systemctl stop: the supervisor drains and stops its children itself (nothing left for
    systemd to kill), exits 0; the socket keeps listening and the next connection starts it again."""
    sb = installed
    activate(sb)
    sb.systemctl("stop", SERVICE, timeout=90)
    props = sb.show(SERVICE, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, props
    journal = sb.journal(SERVICE)
    assert "Stopping dco-hub.service" in journal
    assert "SIGTERM" in journal, journal  # the supervisor says why it stops
    assert "Deactivated successfully" in journal, journal
    for bad in ("Killing process", "SIGKILL", "timed out", "Failed with result", "Traceback"):
        assert bad not in journal, f"{bad!r} in the journal:\n{journal}"
    assert not service_pids(sb)
    assert not sb.path("/run/dcod").exists(), "RuntimeDirectory= is removed on stop"
    assert sb.show(SOCKET, "SubState")["SubState"] == "listening"
    props = activate(sb)  # socket activation again
    assert props["NRestarts"] == "0"


def test_kill9_restart(installed):
    """kill -9 of the supervisor: systemd restarts it (Restart=on-failure), /run/dcod survives
    (RuntimeDirectoryPreserve=restart: the quit alert lives there), it serves again."""
    sb = installed
    old = activate(sb)
    sb.path("/run/dcod/preserved").write_text("x")
    sb.run("kill", "-9", old["MainPID"])

    def restarted():
        props = sb.show(SERVICE, "ActiveState", "MainPID", "NRestarts")
        return props if props["NRestarts"] == "1" and props["ActiveState"] == "active" else None

    props = sb.wait_until(restarted, timeout=30, what="the restart after kill -9")
    assert props["MainPID"] != old["MainPID"]
    assert sb.path("/run/dcod/preserved").exists(), "/run/dcod was removed by the restart"
    assert echo_call(sb, b"again")[3] == b"again"
    # the new supervisor saw the unclean stop and raised the quit alert
    alert = sb.wait_until(
        lambda: sb.path(ALERT_FILE).exists() and sb.path(ALERT_FILE).read_text(),
        what="the quit alert after an unclean stop",
    )
    assert re.fullmatch(r"[1-9]\d* 127\.0\.0\.1:1523\n?", alert), alert
    journal = sb.journal(SERVICE)
    assert "status=9/KILL" in journal, journal
    assert "Scheduled restart job" in journal, journal


def test_status_for_group_dcod_only(installed):
    """`dcod status` works for a member of group dcod and is refused to anyone else."""
    sb = installed
    if not has_command(sb, "status"):
        pytest.skip("`dcod status` does not exist yet")
    activate(sb)
    sb.run("useradd", "--no-create-home", "--groups", "dcod", "alice")
    sb.run("useradd", "--no-create-home", "bob")
    ok = sb.run("dcod", "status", user="alice", check=False)
    assert ok.returncode == 0, ok.stderr
    assert "hub" in ok.stdout
    as_json = json.loads(sb.run("dcod", "status", "--json", user="alice").stdout)
    assert as_json
    refused = sb.run("dcod", "status", user="bob", check=False)
    assert refused.returncode != 0
    assert "permission denied" in refused.stderr.lower(), refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_interactive_run_is_refused_the_services_directories(installed):
    """While the service runs, root's `dcod run` (reading /etc/dcod/dcod.toml, which names /run/dcod
    and /var/lib/dcod) is refused: they are user dcod's; so is user dcod's own second run (the lock).
    Either names the service's pid, and neither touches the service."""
    sb = installed
    props = activate(sb)
    before = sb.run("sh", "-c", "ls -l --time-style=+%s.%N /run/dcod /run/dcod/alerts").stdout
    root = sb.run("dcod", "run", check=False, timeout=30)
    assert root.returncode == 1, root.stderr
    assert "/run/dcod (owner dcod, mode 0751) does not belong to root, who runs dcod" in root.stderr, root.stderr
    assert f"A dcod run (pid {props['MainPID']}) uses it" in root.stderr, root.stderr
    assert "It is the packaged service's (dco-hub.service, user dcod)" in root.stderr, root.stderr
    as_dcod = sb.run("dcod", "run", user="dcod", check=False, timeout=30)
    assert as_dcod.returncode == 1, as_dcod.stderr
    assert f"/run/dcod is in use by another dcod run (pid {props['MainPID']})" in as_dcod.stderr, as_dcod.stderr
    assert sb.run("sh", "-c", "ls -l --time-style=+%s.%N /run/dcod /run/dcod/alerts").stdout == before
    after = sb.show(SERVICE, "MainPID", "NRestarts", "ActiveState")
    assert after == {"MainPID": props["MainPID"], "NRestarts": "0", "ActiveState": "active"}, after
    assert echo_call(sb, b"still served")[3] == b"still served"


def test_reload_under_load(installed):
    """systemctl reload (ExecReload=dcod reload) while sessions keep sending: nothing lost,
    no error reply, the main PID unchanged, the hub and workers replaced."""
    sb = installed
    if not has_command(sb, "reload"):
        pytest.skip("`dcod reload` does not exist yet")
    props = activate(sb)
    before = set(service_pids(sb)) - {int(props["MainPID"])}
    reload, took, _, result, err = under_load(sb, 6, lambda: sb.systemctl("reload", SERVICE, check=False, timeout=90))
    assert reload.returncode == 0, f"{reload.stderr}\n{sb.journal(SERVICE)}"
    assert (result["lost"], result["errors"], result["mismatched"]) == (0, 0, 0), f"{result}\n{err}"
    assert result["requests"] > 0
    after = sb.show(SERVICE, "MainPID", "ActiveState", "NRestarts", "StatusText")
    assert after["MainPID"] == props["MainPID"] and after["NRestarts"] == "0", after
    assert after["ActiveState"] == "active"
    children = set(service_pids(sb)) - {int(after["MainPID"])}
    assert children and not children & before, f"hub and workers not replaced: {before} -> {children}"
    journal = sb.journal(SERVICE)
    assert "Reloaded dco-hub.service" in journal, journal
    # the old hub's drain raised the quit alert; any user may read it, only group dcod may list /run/dcod
    sb.run("useradd", "--no-create-home", "bob")
    alert = sb.run("cat", ALERT_FILE, user="bob").stdout
    assert re.fullmatch(r"[1-9]\d* 127\.0\.0\.1:1523\n?", alert), alert
    assert sb.run("ls", "/run/dcod", user="bob", check=False).returncode != 0
    print(f"reload took {took:.2f}s under {result['requests_per_s']:.0f} requests/s")


def test_upgrade_under_load_loses_nothing(installed, deb_next):
    """dpkg -i of a newer .deb while sessions keep sending: the running service takes the new code
    over in place (the postinst's `dcod reload --upgrade`): the same main PID and no restart, the
    supervisor and every child on the new version, nothing lost or refused, the quit alert raised
    for the old hub; the socket left alone (it holds port 1523 and its backlog)."""
    sb = installed
    props = activate(sb)
    socket_since = sb.show(SOCKET, "ActiveEnterTimestampMonotonic")
    before = status_json(sb)
    assert before["supervisor"]["version"] == __version__
    alerts = alert_counter(sb)
    window = 15.0
    upgrade, took, outlasted, result, err = under_load(
        sb, window, lambda: sb.run("dpkg", "-i", sb.put(deb_next), check=False, timeout=180)
    )
    assert outlasted, f"the load ended before the upgrade did ({took:.1f}s)"
    assert upgrade.returncode == 0, f"{upgrade.stdout}\n{upgrade.stderr}\n{sb.journal(SERVICE)}"
    lines = [line for line in upgrade.stdout.splitlines() if line.startswith("reload: ")]
    assert lines and lines[-1].startswith("reload: done in"), f"{upgrade.stdout}\n{upgrade.stderr}"
    assert "restarting" not in upgrade.stderr, upgrade.stderr
    assert (result["lost"], result["errors"], result["mismatched"]) == (0, 0, 0), f"{result}\n{err}"
    assert result["requests"] > 0
    after = sb.show(SERVICE, "MainPID", "ActiveState", "NRestarts")
    assert after == {"MainPID": props["MainPID"], "ActiveState": "active", "NRestarts": "0"}, after
    assert sb.show(SOCKET, "ActiveEnterTimestampMonotonic") == socket_since, "the socket was restarted"
    status = status_json(sb)
    sup = status["supervisor"]
    assert (sup["pid"], sup["version"], sup["reexecs"]) == (int(props["MainPID"]), NEXT_VERSION, 1), sup
    rows = {p["name"]: (p["version"], p["state"]) for p in status["processes"]}
    assert set(rows.values()) == {(NEXT_VERSION, "ready")}, rows
    assert not {p["pid"] for p in status["processes"]} & {p["pid"] for p in before["processes"]}, rows
    assert alert_counter(sb) > alerts, "no quit alert for the old hub"
    reexeced = next(line for line in lines if "re-executed in" in line)
    print(
        f"\nupgrade {__version__} -> {NEXT_VERSION} under load: dpkg -i took {took:.2f}s; "
        f"{result['sent']} requests sent, {result['requests']} answered in the {window:g}s window "
        f"({result['requests_per_s']:.0f}/s), {result['lost']} lost, {result['errors']} errors; "
        f"{reexeced}; {lines[-1]}"
    )
    assert echo_call(sb, b"after the upgrade")[3] == b"after the upgrade"


def test_remove_then_purge(installed):
    """dpkg -r with the service running stops socket and service and keeps config and user;
    dpkg --purge then leaves no unit, /var/lib/dcod, /etc/dcod, process, nor any file of user
    dcod behind; the user and group stay, locked (Debian keeps system users: see the postrm)."""
    sb = installed
    activate(sb)
    sb.run("dpkg", "-r", "dcod")
    assert not service_pids(sb), "the service still runs after dpkg -r"
    assert sb.show(SOCKET, "ActiveState")["ActiveState"] == "inactive"
    with pytest.raises(ConnectionRefusedError):
        sb.connect(PORT).close()
    assert sb.path("/etc/dcod/dcod.toml").exists(), "dpkg -r keeps the conffile"
    assert sb.run("getent", "passwd", "dcod", check=False).returncode == 0
    sb.run("dpkg", "--purge", "dcod")
    for path in (
        "/lib/systemd/system/dco-hub.socket",
        "/lib/systemd/system/dco-hub.service",
        "/etc/dcod",
        "/var/lib/dcod",
        "/run/dcod",
        "/usr/bin/dcod",
        "/usr/lib/sysusers.d/dcod.conf",
    ):
        assert not sb.path(path).exists() and not sb.path(path).is_symlink(), f"{path} left behind"
    left = sb.run(
        "find", "/etc/systemd/system", "/var/lib/systemd/deb-systemd-helper-enabled", "-name", "*dco-hub*", check=False
    ).stdout
    assert not left, f"unit links left behind: {left}"
    user = sb.run("getent", "passwd", "dcod").stdout.strip().split(":")
    assert user[6] in ("/usr/sbin/nologin", "/sbin/nologin"), user
    assert sb.run("getent", "shadow", "dcod").stdout.split(":")[1].startswith("!"), "the account is not locked"
    assert sb.run("getent", "group", "dcod").returncode == 0
    left = sb.run(
        "find", "/etc", "/var", "/run", "/tmp", "/opt", "-xdev", "-user", "dcod", check=False, timeout=120
    ).stdout
    assert not left, f"files of user dcod left behind: {left}"
    for unit in UNITS:
        props = sb.show(unit, "LoadState", "ActiveState")
        assert props == {"LoadState": "not-found", "ActiveState": "inactive"}, (unit, props)
