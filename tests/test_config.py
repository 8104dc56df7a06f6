"""Configuration: the built-in default, and refusals that name file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcod import config
from dcod.cli import main as cli
from dcod.config import ConfigError

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
