"""Configuration: the built-in default, and refusals that name file, key and reason."""

from __future__ import annotations

import os
import pwd
from dataclasses import fields
from pathlib import Path

import pytest

from dcod import config
from dcod.cli import main as cli
from dcod.config import ConfigError
from dcod.supervisor import preflight, rundir

REPO = Path(__file__).resolve().parent.parent


def test_conf_file_is_the_builtin_default():
    assert (REPO / "conf" / "dcod.toml").read_text() == config.default_text()
    builtin = config.load(None)
    assert [(p.id, p.handler, p.instances) for p in builtin.proxies] == [(1, "echo", 2)]
    assert builtin.hub.listen == "127.0.0.1:1523"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[hub]\nmax_pdu = 4\n", "hub.max_pdu: must be >= 12, not 4"),
        ("[hub]\nlisten = 1523\n", "hub.listen: must be a string, not 1523"),
        ("[hub]\npoison_after = 1\n", "hub.poison_after: must be >= 2 (the last delivery goes alone), not 1"),
        ('[hub]\nlisten = "nowhere"\n', "hub.listen: must be host:port"),
        ('[hub]\nallow = ["10.0.0.0/33"]\n', "hub.allow: '10.0.0.0/33' is not a network"),
        ("[hub]\ncolour = 1\n", "hub.colour: unknown key"),
        ('[[proxy]]\nid = 1\nhandler = "echo"\ninstances = 0\n', "proxy[0].instances: must be >= 1, not 0"),
        ("[[proxy]]\nid = 1\n", "proxy[0]: needs exactly one of handler, address, command"),
        ('[[proxy]]\nhandler = "echo"\n', "proxy[0].id: missing"),
        (
            '[[proxy]]\nid = 1\nhandler = "echo"\n[[proxy]]\nid = 1\nhandler = "echo"\n',
            "proxy[1].id: 1 is already proxy[0]",
        ),
        ("[supervisor]\nheartbeat_timeout = 0.1\n", "supervisor.heartbeat_timeout: must be longer"),
        ("[hub\n", "not valid TOML"),
        # Noradle's PL/SQL keeps the quit alert's message (hub.advertise) in a VARCHAR2(30).
        (
            '[hub]\nadvertise = "dco-hub-1.prod.example.com:1523"\n',
            "hub.advertise: must be at most 30 bytes, not 31 ('dco-hub-1.prod.example.com:1523'): Noradle's PL/SQL",
        ),
        (
            '[[proxy]]\nid = 1\nhandler = "mine:handle"\nhandler_path = ["handlers"]\n',
            "proxy[0].handler_path: must be absolute paths (the workers run in no particular directory), "
            "not 'handlers'",
        ),
        (
            '[[proxy]]\nid = 1\ncommand = ["/bin/true"]\nhandler_path = ["/opt/h"]\n',
            "proxy[0].handler_path: is for a handler; this proxy has none",
        ),
    ],
)
def test_invalid_config_names_file_key_and_reason(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_advertise_and_alert_name_of_30_bytes_are_accepted(tmp_path, capsys):
    path = tmp_path / "ok.toml"
    path.write_text(
        '[hub]\nadvertise = "dco-hub-1.prod.example.co:1523"\n'
        '[alert]\nname = "Noradle-DCO-EXTHUB-QUIT-\u00e9\u00e9\u00e9"\n'
    )
    loaded = config.load(path)
    assert len(loaded.hub.advertise) == 30 and len(loaded.alert.name.encode()) == 30
    assert cli.main(["config", "--check", "--config", str(path)]) == 0, capsys.readouterr().err


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: cannot read: No such file"):
        config.load(tmp_path / "nope.toml")


def test_config_command_checks_and_prints(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[hub]\nmax_pdu = 4\n")
    assert cli.main(["config", "--check", "--config", str(bad)]) == 1
    assert "bad.toml: hub.max_pdu" in capsys.readouterr().err
    assert cli.main(["config", "--config", str(REPO / "conf" / "dcod.toml")]) == 0
    printed = capsys.readouterr().out
    assert 'handler = "echo"' in printed and "reply_timeout = 30.0" in printed


def test_config_check_refuses_what_an_alert_backend_refuses(tmp_path, capsys):
    """The alert backends check their own settings: `dcod config --check` asks each of them."""
    bad = tmp_path / "bad.toml"
    for alert, message in [
        ('backends = ["pager"]', "alert.backends: unknown backend 'pager'"),
        ('backends = ["command"]', "alert.command: needed by the command backend"),
        ('backends = ["file", "oracle"]', "alert.oracle_dsn: needed by the oracle backend"),
        # DBMS_ALERT names are at most 30 bytes, whichever backends raise the alert.
        ('name = "Noradle-DCO-EXTHUB-QUIT-REGION2"', "alert.name: must be at most 30 bytes for DBMS_ALERT, not 31"),
        (
            'name = "Noradle-DCO-EXTHUB-QUIT-\u00e9\u00e9\u00e9\u00e9"',
            "alert.name: must be at most 30 bytes for DBMS_ALERT, not 32",
        ),
    ]:
        bad.write_text(f"[alert]\n{alert}\n")
        config.load(bad)  # the configuration itself is well-formed
        assert cli.main(["config", "--check", "--config", str(bad)]) == 1
        assert f"bad.toml: {message}" in capsys.readouterr().err


@pytest.fixture
def no_directories_from_the_environment(monkeypatch, tmp_path):
    """No systemd, no XDG variables; HOME is tmp_path."""
    for var in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_default_directories_are_the_users_own_never_shared_nor_the_services(
    no_directories_from_the_environment, tmp_path
):
    """Also for root (the tests run as root): not /run/dcod and /var/lib/dcod, which belong to the
    packaged service, nor a predictable name in /tmp."""
    builtin = config.load(None)
    assert builtin.state_dir == tmp_path / ".local/state/dcod"
    assert builtin.runtime_dir == tmp_path / ".local/state/dcod/run"


def test_default_directories_from_xdg_and_systemd(no_directories_from_the_environment, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    builtin = config.load(None)
    assert (builtin.runtime_dir, builtin.state_dir) == (Path("/run/user/1000/dcod"), tmp_path / "state/dcod")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/dcod")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/dcod:/var/lib/other")
    builtin = config.load(None)
    assert (builtin.runtime_dir, builtin.state_dir) == (Path("/run/dcod"), Path("/var/lib/dcod"))


def test_every_error_is_reported_at_once(tmp_path):
    """Not only the first: one line each, with file, key and reason, in the file's order."""
    path = tmp_path / "bad.toml"
    path.write_text(
        "[hub]\nmax_pdu = 4\nlisten = 1523\ncolour = 1\n[supervisor]\nheartbeat_timeout = 0.1\n"
        '[[proxy]]\nid = 1\nhandler = "echo"\ninstances = 0\n'
        '[[proxy]]\nhandler = "echo"\n'
        '[[proxy]]\nid = 1\naddress = "nowhere"\n'
    )
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.errors == [
        f"{path}: hub.colour: unknown key (known: {', '.join(sorted(f.name for f in fields(config.HubConfig)))})",
        f"{path}: hub.listen: must be a string, not 1523",
        f"{path}: proxy[0].instances: must be >= 1, not 0",
        f"{path}: proxy[1].id: missing",
        f"{path}: proxy[2].address: must be host:port, not 'nowhere'",
        f"{path}: hub.max_pdu: must be >= 12, not 4",
        f"{path}: supervisor.heartbeat_timeout: must be longer than heartbeat_interval",
        f"{path}: proxy[2].id: 1 is already proxy[0]",
    ]


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_file_is_refused(tmp_path, text):
    """Without a file dcod runs its built-in default; an empty one is a mistake (a file not written yet)."""
    path = tmp_path / "empty.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: proxy: missing: the file has no settings"):
        config.load(path)


# ---------------------------------------------------------------- what `dcod run` would meet (preflight)


def test_the_packaged_units_timeout_stop_is_the_one_assumed_without_systemd():
    unit = (REPO / "units" / "dco-hub.service").read_text()
    assert f"\nTimeoutStopSec={preflight.PACKAGED_TIMEOUT_STOP:g}\n" in unit


@pytest.mark.parametrize(
    "text, seconds",
    [("1min 15s", 75), ("500ms", 0.5), ("2h 30min", 9000), ("1d", 86400), ("90s", 90), ("soon", None), ("", None)],
)
def test_systemd_time_spans(text, seconds):
    assert preflight._timespan(text) == seconds


@pytest.fixture
def systemctl(tmp_path, monkeypatch):
    """systemctl(output, status=0): a `systemctl` first on PATH that prints ``output``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def fake(output: str, status: int = 0) -> None:
        script = bin_dir / "systemctl"
        script.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {status}\n")
        script.chmod(0o755)

    return fake


@pytest.mark.parametrize(
    "systemd, drain_timeout, refused",
    [
        # systemd knows the service: its TimeoutStopSec, drop-ins included
        ("LoadState=loaded\\nTimeoutStopUSec=1min 30s\\n", 58, None),
        ("LoadState=loaded\\nTimeoutStopUSec=1min 30s\\n", 59, "dco-hub.service's TimeoutStopSec=90s"),
        ("LoadState=loaded\\nTimeoutStopUSec=infinity\\n", 600, None),
        # no such unit, or no systemd: the packaged unit's 75 s
        ("LoadState=not-found\\nTimeoutStopUSec=1min 30s\\n", 43, None),
        ("LoadState=not-found\\nTimeoutStopUSec=1min 30s\\n", 44, "the packaged dco-hub.service's TimeoutStopSec=75s"),
        ("", 600, "the packaged dco-hub.service's TimeoutStopSec=75s"),
    ],
)
def test_a_stop_must_fit_in_the_services_timeout_stop(tmp_path, systemctl, capsys, systemd, drain_timeout, refused):
    """drain_timeout + 3 x stop_timeout (10) + 2: the longest a stop may take (preflight._stop_too_long)."""
    systemctl(systemd, status=0 if systemd else 1)
    path = tmp_path / "dcod.toml"
    path.write_text(f'[supervisor]\ndrain_timeout = {drain_timeout}\n[[proxy]]\nid = 1\naddress = "127.0.0.1:9"\n')
    status = cli.main(["config", "--check", "--no-host-checks", "--config", str(path)])
    err = capsys.readouterr().err
    if refused is None:
        assert status == 0 and not err, err
    else:
        assert status == 1 and f"{path}: supervisor.drain_timeout: a stop may take " in err, err
        assert f"more than {refused}, after which systemd kills" in err, err


def test_the_default_timeouts_fit_in_the_packaged_unit_whatever_the_alert_backend(tmp_path, systemctl, capsys):
    """30 + 3 x 10 + the command backend's 10 + 2 = 72 <= 75."""
    systemctl("", status=1)
    path = tmp_path / "dcod.toml"
    path.write_text(
        '[alert]\nbackends = ["file", "command"]\ncommand = ["/bin/true"]\n[[proxy]]\nid = 1\naddress = "127.0.0.1:9"\n'
    )
    assert cli.main(["config", "--check", "--no-host-checks", "--config", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a directory to nobody: root only")
def test_directories_dcod_run_would_refuse_are_refused_without_touching_them(tmp_path):
    """Another user's, open to others, under a file: as `dcod run` would refuse them (dcod.supervisor.rundir),
    neither made nor locked; one that can be made is fine."""
    theirs, open_to_all = tmp_path / "theirs", tmp_path / "open"
    theirs.mkdir()
    os.chown(theirs, pwd.getpwnam("nobody").pw_uid, -1)
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "dcod.toml"
    path.write_text(
        f'[supervisor]\nruntime_dir = "{theirs}"\nstate_dir = "{open_to_all}"\n'
        f'[alert]\ndir = "{tmp_path / "a-file" / "alerts"}"\n[[proxy]]\nid = 1\nhandler = "echo"\n'
    )
    refusals = dict(rundir.check(config.load(path)))
    assert f"{theirs} (owner nobody, mode 0755) does not belong to root" in refusals["supervisor.runtime_dir"]
    assert f"{open_to_all} (owner root, mode 0777) is writable by its group" in refusals["supervisor.state_dir"]
    assert f"{tmp_path}/a-file/alerts: Not a directory ({tmp_path}/a-file)" in refusals["alert.dir"]
    assert not (theirs / "dcod.lock").exists() and not (open_to_all / "dcod.lock").exists()
    path.write_text(f'[supervisor]\nruntime_dir = "{tmp_path / "new" / "run"}"\nstate_dir = "{tmp_path / "new"}"\n')
    assert rundir.check(config.load(path)) == [] and not (tmp_path / "new").exists()
