"""The quit alert's backends: file (read by the real client), command, oracle, several at once."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
import trio

from dcod import config as configuration
from dcod.client import QuitAlert
from dcod.config import ConfigError
from dcod.supervisor.alert import Alerter, Backend, check
from dcod.supervisor.alert import file as file_backend

NAME = "Noradle-DCO-EXTHUB-QUIT"
ORACLE_VARS = ("DCOD_TEST_ORACLE_DSN", "DCOD_TEST_ORACLE_USER", "DCOD_TEST_ORACLE_PASSWORD")
LINE = re.compile(rb"(\d+) (\S+)\n")


def toml_value(value) -> str:
    return json.dumps(value)  # JSON strings, numbers and arrays of strings are TOML too


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(**alert_keys) -> Config loaded (and validated) from a file, runtime dir under tmp_path."""

    def make(**alert) -> configuration.Config:
        lines = "\n".join(f"{key} = {toml_value(value)}" for key, value in alert.items())
        path = tmp_path / "dcod.toml"
        path.write_text(
            textwrap.dedent(f"""\
            [supervisor]
            runtime_dir = "{tmp_path / "run"}"
            state_dir = "{tmp_path / "state"}"
            [alert]
            """)
            + lines
            + "\n"
        )
        config = configuration.load(path)
        check(config)
        return config

    return make


@pytest.fixture
def clock(monkeypatch):
    """The wall clock the file backend reads, in ms, set by the test."""
    now = types.SimpleNamespace(ms=1_000_000)
    monkeypatch.setattr(file_backend, "_now_ms", lambda: now.ms)
    return now


def alert_line(path: Path) -> tuple[int, str]:
    match = LINE.fullmatch(path.read_bytes())
    assert match, path.read_bytes()
    return int(match[1]), match[2].decode()


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "dcod.supervisor.alert" and r.levelno == logging.WARNING
    ]


# ---------------------------------------------------------------- file backend


async def test_file_backend_writes_one_line_counter_and_message(make_config):
    config = make_config()
    alerter = Alerter.from_config(config)
    before = time.time_ns() // 1_000_000
    await alerter.signal("10.0.0.7:1523")
    after = time.time_ns() // 1_000_000
    counter, message = alert_line(config.alert_file)
    assert message == "10.0.0.7:1523"
    assert before <= counter <= after  # the wall time in ms when nothing came before
    assert config.alert_file == Path(config.runtime_dir) / "alerts" / NAME
    assert [p.name for p in config.alert_file.parent.iterdir()] == [NAME]  # no temp file left
    stats = alerter.stats()
    assert stats["file"]["sent"] == 1 and stats["file"]["failed"] == 0 and stats["file"]["last_error"] is None
    assert before / 1000 - 1 <= stats["file"]["last_sent"] <= time.time()
    json.dumps(stats)  # it goes over the control socket to `dcod status`


async def test_file_and_dir_are_readable_by_other_users_whatever_the_umask(make_config):
    config = make_config()
    old = os.umask(0o077)
    try:
        await Alerter.from_config(config).signal("10.0.0.7:1523")
    finally:
        os.umask(old)
    assert stat.S_IMODE(config.alert_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(config.alert_file.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(config.alert_file.parent.parent.stat().st_mode) == 0o755  # the runtime dir was missing too


async def test_counter_grows_within_and_across_instances_and_after_a_wipe(make_config, clock):
    config = make_config()
    first = Alerter.from_config(config)
    await first.signal("a:1")
    await first.signal("a:1")
    assert alert_line(config.alert_file)[0] == clock.ms + 1  # same millisecond: previous + 1
    # A new supervisor: the counter goes on from the file, even with the clock behind it.
    clock.ms -= 5000
    await Alerter.from_config(config).signal("a:1")
    assert alert_line(config.alert_file)[0] == 1_000_002
    # The file deleted: the same instance remembers its last counter ...
    config.alert_file.unlink()
    await first.signal("a:1")
    assert alert_line(config.alert_file)[0] == 1_000_002
    # ... and a new one after the runtime directory was wiped (a reboot) takes the wall time.
    shutil.rmtree(config.runtime_dir)
    clock.ms = 1_000_500
    await Alerter.from_config(config).signal("b:2")
    assert alert_line(config.alert_file) == (1_000_500, "b:2")
    assert stat.S_IMODE(config.alert_file.parent.stat().st_mode) == 0o755


async def test_the_client_sees_every_new_alert(make_config, clock):
    config = make_config()
    watcher = QuitAlert(config.alert_file)
    assert watcher.check() is None  # no alert yet
    alerter = Alerter.from_config(config)
    for i in range(30):
        # Same clock and same length each time: only the counter tells the alerts apart.
        message = f"10.0.0.{i % 10}:1523"
        await alerter.signal(message)
        assert watcher.check() == message
        assert watcher.check() is None  # seen once
    # A restarted supervisor, and one after a wipe with the clock moved on: still seen.
    await Alerter.from_config(config).signal("10.0.0.1:1523")
    assert watcher.check() == "10.0.0.1:1523"
    shutil.rmtree(config.alert_dir)
    clock.ms += 60_000
    await Alerter.from_config(config).signal("10.0.0.2:1523")
    assert watcher.check() == "10.0.0.2:1523"
    # A client started later does not act on an alert raised before it, given the counter it read.
    late = QuitAlert(config.alert_file)
    late.counter = watcher.counter
    assert late.check() is None


async def test_a_reader_never_sees_a_partial_file(make_config):
    config = make_config()
    alerter = Alerter.from_config(config)
    await alerter.signal("start:0")
    stop = threading.Event()
    seen: list[bytes] = []
    bad: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(config.alert_file, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                bad.append(b"<missing>")
                continue
            match = LINE.fullmatch(data)
            # The message says how long it is: a torn or mixed write cannot pass.
            if not match or (match[2] != b"start:0" and len(match[2]) != int(match[2].split(b":")[0])):
                bad.append(data)
            seen.append(data)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        signals = 0
        with trio.fail_after(60):
            while signals < 300 or len(set(seen)) < 100:
                length = 20 + signals % 200
                await alerter.signal(f"{length}:".ljust(length, "x"))
                signals += 1
    finally:
        stop.set()
        await trio.to_thread.run_sync(thread.join)
    assert not bad, bad[:3]
    counters = [int(LINE.fullmatch(d)[1]) for d in seen]
    assert counters == sorted(counters)  # and never goes back
    assert alerter.stats()["file"]["sent"] == signals + 1


async def test_file_backend_failure_is_logged_and_counted(make_config, tmp_path, caplog):
    (tmp_path / "blocker").write_text("a file, not a dir")
    config = make_config(dir=str(tmp_path / "blocker" / "alerts"))
    alerter = Alerter.from_config(config)
    await alerter.signal("10.0.0.7:1523")  # does not raise
    await alerter.signal("10.0.0.7:1523")
    stats = alerter.stats()["file"]
    assert stats["sent"] == 0 and stats["failed"] == 2 and "blocker" in stats["last_error"]
    assert stats["last_sent"] is None and stats["last_failed"] is not None
    assert any("file backend failed" in w and "blocker" in w for w in warnings_of(caplog))


async def test_a_message_with_a_line_break_is_refused_by_the_file_backend(make_config):
    config = make_config()
    alerter = Alerter.from_config(config)
    await alerter.signal("a:1\n2 forged:1")
    assert not config.alert_file.exists()
    assert "line break" in alerter.stats()["file"]["last_error"]


# ---------------------------------------------------------------- command backend


async def test_command_gets_name_and_message_as_arguments(make_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dcod.supervisor.alert")
    out = tmp_path / "args"
    command = script(
        tmp_path,
        "alert.sh",
        f"""\
        printf '%s\\n' "$#" "$@" > {out}
        echo "told the pager"
        echo "a note on stderr" >&2
        """,
    )
    config = make_config(backends=["command"], command=[command, "--extra"])
    alerter = Alerter.from_config(config)
    message = "10.0.0.7:1523 $(touch pwned) *"  # no shell sees it
    await alerter.signal(message)
    assert out.read_text().splitlines() == ["3", "--extra", NAME, message]
    assert not (tmp_path / "pwned").exists()
    assert alerter.stats()["command"]["sent"] == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "dcod.supervisor.alert"]
    assert any("stdout: told the pager" in m for m in logged)
    assert any("stderr: a note on stderr" in m for m in logged)


async def test_command_failure_is_logged_and_counted(make_config, tmp_path, caplog):
    command = script(
        tmp_path,
        "fail.sh",
        """\
        echo "pager unreachable" >&2
        exit 3
        """,
    )
    alerter = Alerter.from_config(make_config(backends=["command"], command=[command]))
    await alerter.signal("10.0.0.7:1523")  # does not raise
    stats = alerter.stats()["command"]
    assert stats["sent"] == 0 and stats["failed"] == 1
    assert stats["last_error"] == "exit status 3: pager unreachable"
    assert any("command backend failed: exit status 3" in w for w in warnings_of(caplog))


async def test_a_command_that_cannot_start_is_a_failure(make_config, tmp_path, caplog):
    alerter = Alerter.from_config(make_config(backends=["command"], command=[str(tmp_path / "missing")]))
    await alerter.signal("10.0.0.7:1523")
    stats = alerter.stats()["command"]
    assert stats["failed"] == 1 and "No such file" in stats["last_error"]
    assert any("command backend failed" in w for w in warnings_of(caplog))


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # dead, waiting for its reaper


async def test_command_timeout_kills_its_process_group_and_is_counted(make_config, tmp_path, caplog):
    pids = tmp_path / "pids"
    command = script(
        tmp_path,
        "hang.sh",
        f"""\
        sleep 60 &
        echo "$$ $!" > {pids}
        wait
        """,
    )
    alerter = Alerter.from_config(make_config(backends=["command"], command=[command], command_timeout=0.5))
    with trio.fail_after(10):  # the timeout, not the 60 s of sleep
        await alerter.signal("10.0.0.7:1523")
    stats = alerter.stats()["command"]
    assert stats["failed"] == 1 and "still running after 0.5 s" in stats["last_error"]
    assert any("command backend failed: still running" in w for w in warnings_of(caplog))
    shell, child = map(int, pids.read_text().split())
    assert process_gone(shell)
    # The background child got the signal too (its reaper may take a moment to collect it).
    with trio.fail_after(5):
        while not process_gone(child):
            await trio.sleep(0.01)


# ---------------------------------------------------------------- several backends


async def test_file_and_command_together(make_config, tmp_path):
    out = tmp_path / "args"
    command = script(tmp_path, "alert.sh", f'printf "%s %s" "$1" "$2" > {out}\n')
    config = make_config(backends=["file", "command"], command=[command])
    alerter = Alerter.from_config(config)
    await alerter.signal("10.0.0.7:1523")
    assert alert_line(config.alert_file)[1] == "10.0.0.7:1523"
    assert out.read_text() == f"{NAME} 10.0.0.7:1523"
    assert {k: v["sent"] for k, v in alerter.stats().items()} == {"file": 1, "command": 1}


async def test_a_failing_backend_does_not_stop_the_others(make_config, tmp_path, caplog):
    out = tmp_path / "args"
    command = script(tmp_path, "alert.sh", f'echo "$2" > {out}\n')
    (tmp_path / "blocker").write_text("")
    config = make_config(backends=["file", "command"], command=[command], dir=str(tmp_path / "blocker" / "x"))
    alerter = Alerter.from_config(config)
    await alerter.signal("10.0.0.7:1523")
    assert out.read_text() == "10.0.0.7:1523\n"
    stats = alerter.stats()
    assert (stats["file"]["failed"], stats["command"]["sent"]) == (1, 1)
    assert len(warnings_of(caplog)) == 1


class Rendezvous(Backend):
    """A backend that sets its own event and waits for the other one's: only concurrent sends finish."""

    def __init__(self, kind: str, mine: trio.Event, other: trio.Event) -> None:
        self.kind, self.mine, self.other = kind, mine, other

    async def send(self, message: str) -> None:
        self.mine.set()
        await self.other.wait()


async def test_backends_are_raised_concurrently():
    a, b = trio.Event(), trio.Event()
    alerter = Alerter(NAME, [Rendezvous("first", a, b), Rendezvous("second", b, a)])
    with trio.fail_after(5):
        await alerter.signal("10.0.0.7:1523")
    assert {k: v["sent"] for k, v in alerter.stats().items()} == {"first": 1, "second": 1}


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"backends": []}, "alert.backends: needs at least one"),
        ({"backends": ["pager"]}, "alert.backends: unknown backend 'pager' (file, command, oracle)"),
        ({"backends": ["file", "file"]}, "alert.backends: 'file' is listed twice"),
        ({"backends": ["command"]}, "alert.command: needed by the command backend"),
        ({"command_timeout": 0}, "alert.command_timeout: must be > 0"),
        ({"name": "a/b"}, "alert.name: must be a file name"),
        ({"name": ""}, "alert.name: must be a file name"),
        (
            {"backends": ["oracle"], "oracle_user": "u", "oracle_password_file": "/p"},
            "alert.oracle_dsn: needed by the oracle backend",
        ),
        (
            {"backends": ["oracle"], "oracle_dsn": "db:1521/x", "oracle_password_file": "/p"},
            "alert.oracle_user: needed by the oracle backend",
        ),
        (
            {"backends": ["oracle"], "oracle_dsn": "db:1521/x", "oracle_user": "u"},
            "alert.oracle_password_file: needed by the oracle backend",
        ),
        (
            {
                "backends": ["oracle"],
                "oracle_dsn": "db:1521/x",
                "oracle_user": "u",
                "oracle_password_file": "credential:",
            },
            "alert.oracle_password_file: credential:<name> needs a credential name",
        ),
        (
            {
                "backends": ["oracle"],
                "oracle_dsn": "db:1521/x",
                "oracle_user": "u",
                "oracle_password_file": "/p",
                "name": "Noradle-DCO-EXTHUB-QUIT-LONGER-NAME",
            },
            "alert.name: must be at most 30 bytes for DBMS_ALERT",
        ),
        ({"oracle_timeout": -1}, "alert.oracle_timeout: must be > 0"),
    ],
)
def test_invalid_alert_config_names_file_key_and_reason(make_config, tmp_path, monkeypatch, keys, message):
    monkeypatch.setitem(sys.modules, "oracledb", types.ModuleType("oracledb"))  # installed or not
    with pytest.raises(ConfigError) as e:
        make_config(**keys)
    assert str(e.value).startswith(f"{tmp_path / 'dcod.toml'}: ")
    assert message in str(e.value)


ORACLE_KEYS = {
    "backends": ["file", "oracle"],
    "oracle_dsn": "dbhost:1521/ORCLPDB1",
    "oracle_user": "dcod",
    "oracle_password_file": "credential:dcod-oracle",
}


def test_oracle_backend_without_oracledb_is_a_clear_error(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "oracledb", None)  # import oracledb raises ImportError
    with pytest.raises(ConfigError) as e:
        make_config(**ORACLE_KEYS)
    assert "alert.backends: the oracle backend needs python-oracledb" in str(e.value)
    assert "pip install 'dcod[oracle]'" in str(e.value)
    # A config built some other way is refused as clearly when the Alerter is made.
    config = make_config()
    config = dataclasses.replace(
        config,
        alert=dataclasses.replace(
            config.alert, **{k: tuple(v) if isinstance(v, list) else v for k, v in ORACLE_KEYS.items()}
        ),
    )
    with pytest.raises(ConfigError, match=r"alert.backends: the oracle backend needs python-oracledb"):
        Alerter.from_config(config)


def test_default_config_has_the_file_backend():
    config = configuration.load(None)
    assert config.alert.backends == ("file",) and config.alert.name == NAME
    assert [type(b).__name__ for b in Alerter.from_config(config).backends] == ["FileBackend"]


# ---------------------------------------------------------------- oracle backend (a fake oracledb)


class FakeOracle(types.ModuleType):
    """Just enough of python-oracledb: connect, cursor().callproc, commit, close, Error."""

    class Error(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("oracledb")
        self.connects: list[dict] = []
        self.signals: list[tuple[str, list, bool]] = []  # (procedure, args, committed)
        self.fail_calls = 0  # the next n callproc fail
        self.fail_connects = 0
        self.open: list[FakeConnection] = []
        self.hang: threading.Event | None = None  # connect waits for it: a database that accepts, then hangs
        self.closed = threading.Event()  # set by every close()

    def connect(self, **params):
        self.connects.append(params)
        if self.hang:
            self.hang.wait()
        if self.fail_connects:
            self.fail_connects -= 1
            raise self.Error("DPY-6005: cannot connect to database")
        connection = FakeConnection(self)
        self.open.append(connection)
        return connection


class FakeConnection:
    def __init__(self, module: FakeOracle) -> None:
        self.module = module
        self.call_timeout = 0
        self.pending: list = []
        self.closed = False

    def cursor(self):
        connection = self

        class Cursor:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def callproc(self, name, args):
                assert not connection.closed
                if connection.module.fail_calls:
                    connection.module.fail_calls -= 1
                    raise connection.module.Error("DPY-4011: the database or network closed the connection")
                connection.pending.append((name, list(args)))

        return Cursor()

    def commit(self):
        self.module.signals += [(name, args, True) for name, args in self.pending]
        self.pending = []

    def close(self):
        self.closed = True
        self.module.open.remove(self)
        self.module.closed.set()


SECRET = "s3cr3t-Pa55word"


@pytest.fixture
def fake_oracle(monkeypatch, tmp_path):
    module = FakeOracle()
    monkeypatch.setitem(sys.modules, "oracledb", module)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "dcod-oracle").write_text(SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    return module


async def test_oracle_backend_signals_and_commits_on_one_kept_connection(make_config, fake_oracle, caplog):
    caplog.set_level(logging.DEBUG)
    config = make_config(**ORACLE_KEYS, oracle_timeout=4.0)
    alerter = Alerter.from_config(config)
    await alerter.signal("10.0.0.7:1523")
    await alerter.signal("10.0.0.8:1523")
    assert fake_oracle.signals == [
        ("DBMS_ALERT.SIGNAL", [NAME, "10.0.0.7:1523"], True),
        ("DBMS_ALERT.SIGNAL", [NAME, "10.0.0.8:1523"], True),
    ]
    assert fake_oracle.connects == [
        {"user": "dcod", "password": SECRET, "dsn": "dbhost:1521/ORCLPDB1", "tcp_connect_timeout": 4.0}
    ]
    assert fake_oracle.open[0].call_timeout == 4000
    assert alert_line(config.alert_file)[1] == "10.0.0.8:1523"  # with the file backend
    stats = alerter.stats()
    assert stats["oracle"]["sent"] == 2 and stats["file"]["sent"] == 2
    # The password is nowhere but in the connect call.
    assert SECRET not in repr(alerter) + json.dumps(stats) + repr(config) + configuration.dump(config) + caplog.text
    await alerter.aclose()
    assert fake_oracle.open == []


async def test_oracle_backend_reopens_a_broken_connection_once(make_config, fake_oracle, caplog):
    alerter = Alerter.from_config(make_config(**ORACLE_KEYS))
    await alerter.signal("a:1")
    fake_oracle.fail_calls = 1  # the kept connection broke: reconnect, and the retry goes through
    await alerter.signal("b:2")
    assert [args[1] for _, args, _ in fake_oracle.signals] == ["a:1", "b:2"]
    assert len(fake_oracle.connects) == 2 and len(fake_oracle.open) == 1
    assert alerter.stats()["oracle"]["failed"] == 0
    fake_oracle.fail_calls = 2  # broken, and the retry fails too: one failure, not raised
    await alerter.signal("c:3")
    stats = alerter.stats()["oracle"]
    assert (stats["sent"], stats["failed"]) == (2, 1) and "DPY-4011" in stats["last_error"]
    assert len(fake_oracle.connects) == 3 and fake_oracle.open == []
    fake_oracle.fail_connects = 1  # a fresh connect that fails is not retried within the signal
    await alerter.signal("d:4")
    assert len(fake_oracle.connects) == 4 and alerter.stats()["oracle"]["failed"] == 2
    await alerter.signal("e:5")  # the next signal connects again
    assert [args[1] for _, args, _ in fake_oracle.signals] == ["a:1", "b:2", "e:5"]
    assert any("oracle backend failed" in w and "DPY-6005" in w for w in warnings_of(caplog))
    assert SECRET not in caplog.text


async def test_a_hung_database_fails_the_signal_within_twice_the_timeout(make_config, fake_oracle, caplog):
    alerter = Alerter.from_config(make_config(**ORACLE_KEYS, oracle_timeout=0.1))
    release = fake_oracle.hang = threading.Event()
    with trio.fail_after(5):
        await alerter.signal("a:1")
    stats = alerter.stats()["oracle"]
    assert stats["failed"] == 1
    assert stats["last_error"] == "no answer from dbhost:1521/ORCLPDB1 within 0.2 s (2 x alert.oracle_timeout)"
    assert any("oracle backend failed: no answer" in w for w in warnings_of(caplog))
    # The abandoned thread gets its connection late: it neither signals nor keeps it.
    fake_oracle.hang = None
    release.set()
    assert await trio.to_thread.run_sync(fake_oracle.closed.wait, 5)
    assert fake_oracle.signals == [] and fake_oracle.open == []
    await alerter.signal("b:2")
    assert [args[1] for _, args, _ in fake_oracle.signals] == ["b:2"]
    assert alerter.stats()["oracle"]["sent"] == 1 and len(fake_oracle.open) == 1
    await alerter.aclose()
    assert fake_oracle.open == []


async def test_oracle_password_from_a_file_or_a_missing_credential(make_config, fake_oracle, tmp_path, monkeypatch):
    password_file = tmp_path / "oracle.password"
    password_file.write_text("from-a-file\n")
    alerter = Alerter.from_config(make_config(**{**ORACLE_KEYS, "oracle_password_file": str(password_file)}))
    await alerter.signal("a:1")
    assert fake_oracle.connects[-1]["password"] == "from-a-file"

    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    alerter = Alerter.from_config(make_config(**ORACLE_KEYS))
    await alerter.signal("a:1")
    assert "$CREDENTIALS_DIRECTORY is not set" in alerter.stats()["oracle"]["last_error"]

    alerter = Alerter.from_config(make_config(**{**ORACLE_KEYS, "oracle_password_file": str(tmp_path / "none")}))
    await alerter.signal("a:1")
    assert "cannot read the password file" in alerter.stats()["oracle"]["last_error"]
    assert len(fake_oracle.connects) == 1


# ---------------------------------------------------------------- oracle backend (a real database)


def real_database_missing() -> str:
    if not all(os.environ.get(var) for var in ORACLE_VARS):
        return f"set {', '.join(ORACLE_VARS)} to test the oracle backend against a real database"
    if importlib.util.find_spec("oracledb") is None:
        return "python-oracledb is not installed (pip install 'dcod[oracle]')"
    return ""


# Skipped by a marker, not by pytest.skip() in the test: under trio its reason would be lost.
@pytest.mark.skipif(bool(real_database_missing()), reason=real_database_missing() or "-")
async def test_oracle_backend_against_a_real_database(make_config, tmp_path):
    import oracledb

    dsn, user, password = (os.environ[var] for var in ORACLE_VARS)
    password_file = tmp_path / "oracle.password"
    password_file.write_text(password + "\n")
    name = f"DCOD-TEST-{os.getpid()}"  # not the real alert: live sessions must not see it
    config = make_config(
        name=name, backends=["oracle"], oracle_dsn=dsn, oracle_user=user, oracle_password_file=str(password_file)
    )
    watcher = await trio.to_thread.run_sync(lambda: oracledb.connect(user=user, password=password, dsn=dsn))
    try:
        with watcher.cursor() as cursor:
            await trio.to_thread.run_sync(cursor.callproc, "DBMS_ALERT.REGISTER", [name])

            def wait_one() -> tuple[str, int]:
                message, status = cursor.var(str), cursor.var(int)
                cursor.callproc("DBMS_ALERT.WAITONE", [name, message, status, 30])
                return message.getvalue(), status.getvalue()

            async with Alerter.from_config(config) as alerter:
                await alerter.signal("10.1.2.3:1523")
                assert alerter.stats()["oracle"] == {**alerter.stats()["oracle"], "sent": 1, "failed": 0}
                assert await trio.to_thread.run_sync(wait_one) == ("10.1.2.3:1523", 0)
                await alerter.signal("10.1.2.4:1523")  # on the kept connection
                assert await trio.to_thread.run_sync(wait_one) == ("10.1.2.4:1523", 0)
            await trio.to_thread.run_sync(cursor.callproc, "DBMS_ALERT.REMOVE", [name])
    finally:
        await trio.to_thread.run_sync(watcher.close)
