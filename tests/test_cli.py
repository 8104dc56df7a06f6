"""The `dcod` command line: options before or after the command, --help, and the man page and bash
completion written from the parser (dcod.cli.reference), as the package's build writes them."""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

from dcod.bench.target import free_port, socket_activated
from dcod.cli import main, reference
from dcod.protocol import ErrorCode


def dcod(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcod", *args], capture_output=True, text=True, timeout=60, **options)


def every_command_and_option() -> list[tuple[str, list[str]]]:
    """(command, its option strings), straight from argparse: what the man page and completion must cover."""
    parser = main.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [("", [o for a in parser._actions for o in a.option_strings])] + [
        (name, [o for a in p._actions for o in a.option_strings]) for name, p in sub.choices.items()
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "{file}", "config", "--check"],
        ["config", "--check", "--config", "{file}"],
        ["-v", "--config", "{file}", "config", "--check"],
        ["config", "--config", "{file}", "--check", "-v"],
    ],
)
def test_config_and_verbose_before_or_after_the_command(tmp_path, args):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[proxy]]\nid = 1\nhandler = "echo"\ninstances = 0\n')
    result = dcod(*(a.format(file=bad) for a in args))
    assert result.returncode == 1 and f"{bad}: proxy[0].instances" in result.stderr, result.stderr


def test_option_after_the_command_does_not_undo_one_before_it():
    parser = main.build_parser()
    assert parser.parse_args(["--config", "a.toml", "-v", "status"]).config == "a.toml"
    assert parser.parse_args(["--config", "a.toml", "-v", "status"]).verbose
    assert parser.parse_args(["status"]).config is None and not parser.parse_args(["status"]).verbose
    assert parser.parse_args(["--config", "a.toml", "status", "--config", "b.toml"]).config == "b.toml"


def test_help_documents_exit_statuses_signals_and_files():
    top = dcod("--help").stdout
    for text in (
        "exit status:",
        "  3    `status`, `reload`, `stop`: no supervisor is running",
        "  130  `reload`, `stop`: interrupted (Ctrl-C)",
        "degraded",
        "SIGHUP",
        "SIGTERM",
        "/etc/dcod/dcod.toml",
        "/var/lib/dcod/",
        "Noradle-DCO-EXTHUB-QUIT",
    ):
        assert text in top, top
    status = " ".join(dcod("status", "--help").stdout.split())
    assert "Exit status 0 when everything is up; 3 when something is degraded" in status, status
    assert "exits 0 once the supervisor has exited" in " ".join(dcod("stop", "--help").stdout.split())


def test_man_page_covers_every_command_option_exit_status_signal_file_and_error_reply():
    page = reference.manpage(main.build_parser(), datetime.date(2026, 12, 1))
    assert page.startswith('.TH DCOD 1 "December 2026" "dcod ')
    for command, options in every_command_and_option():
        if command:
            assert f"\n.SS {reference.escape(command)}\n" in page, command
        for option in options:
            if option not in ("-h", "--help"):
                assert f"\\fB{reference.escape(option)}\\fR" in page, (command, option)
    for section in ("EXIT STATUS", "SIGNALS", "ENVIRONMENT", "FILES", "ERROR REPLIES", "EXAMPLES"):
        assert f"\n.SH {section}\n" in page, section
    for term in (
        "0",
        "1",
        "2",
        "3",
        "SIGHUP",
        "SIGTERM, SIGINT",
        "/etc/dcod/dcod.toml",
        "/run/dcod/",
        "/var/lib/dcod/",
        "/run/dcod/alerts/Noradle\\-DCO\\-EXTHUB\\-QUIT",
    ):
        assert f".TP\n\\fB{term}\\fR\n" in page, term
    assert set(reference.ERROR_REPLIES) == set(ErrorCode)  # a new code needs its line in the man page
    for code in ErrorCode:
        assert f"\\fBDCO\\-{code.value:04d}\\fR" in page


def test_man_page_needs_only_the_standard_library_to_be_written(tmp_path):
    """The package's build writes it with Debian's python3 and no dcod dependency installed."""
    probe = (
        "import sys, runpy; sys.argv = ['reference', 'man']; runpy.run_module('dcod.cli.reference', "
        "run_name='__main__'); print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'trio', 'psutil', 'tomli_w', 'httpx', 'sdnotify'}), file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={"SOURCE_DATE_EPOCH": "1764547200", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert result.stderr.strip() == "[]"
    assert '.TH DCOD 1 "December 2025"' in result.stdout  # the date of SOURCE_DATE_EPOCH: a reproducible build


@pytest.mark.skipif(not shutil.which("man"), reason="man-db is not installed (lintian brings it)")
def test_man_page_renders_without_warnings(tmp_path):
    path = tmp_path / "dcod.1"
    path.write_text(reference.manpage(main.build_parser(), datetime.date.today()))
    result = subprocess.run(
        ["man", "--warnings", "-l", str(path)],
        capture_output=True,
        text=True,
        env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "dcod - Noradle DCO ext-hub" in result.stdout
    whatis = subprocess.run(["lexgrog", str(path)], capture_output=True, text=True)  # what lintian checks
    assert whatis.returncode == 0, whatis.stdout


@pytest.fixture
def complete(tmp_path):
    """complete("dcod st") -> what bash offers for the last word (an empty one after a trailing space)."""
    script = tmp_path / "dcod.bash"
    script.write_text(reference.bash_completion(main.build_parser()))
    (tmp_path / "conf.toml").touch()
    (tmp_path / "confdir").mkdir()

    def run(line: str) -> list[str]:
        words = line.split() + ([""] if line.endswith(" ") else [])
        quoted = " ".join(f"'{w}'" for w in words)
        program = (
            f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _dcod; "
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        result = subprocess.run(
            ["bash", "--norc", "-c", program], cwd=tmp_path, capture_output=True, text=True, check=True
        )
        assert not result.stderr, result.stderr
        return [w for w in result.stdout.split("\n") if w]

    return run


def test_bash_completion_offers_every_command_then_its_options(complete):
    commands = [name for name, _ in every_command_and_option() if name]
    assert complete("dcod ") == commands
    assert complete("dcod st") == ["status", "stop"]
    for command, options in every_command_and_option():
        assert complete(f"dcod {command} -".replace("  ", " ")) == options, command


def test_bash_completion_understands_options_before_the_command_and_completes_files(complete):
    assert complete("dcod --config conf.toml -v s") == ["status", "stop"]
    assert complete("dcod --config conf.toml stop --c") == ["--config"]
    assert complete("dcod --config con") == ["conf.toml", "confdir"]
    assert complete("dcod status --config confd") == ["confdir"]
    assert complete("dcod call --hub ") == []  # a value: nothing to offer
    assert complete("dcod nosuch -") == []


# ---------------------------------------------------------------- config --check: what `dcod run` would meet


@pytest.fixture
def held_port():
    """A port something else listens on: (its socket, "127.0.0.1:port")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock, "127.0.0.1:%d" % sock.getsockname()[1]


def config_file(tmp_path, listen: str, proxies: str, supervisor: str = "") -> str:
    path = tmp_path / "dcod.toml"
    path.write_text(
        f'[hub]\nlisten = "{listen}"\nadvertise = "{listen}"\n'
        f'[supervisor]\nruntime_dir = "{tmp_path / "run"}"\nstate_dir = "{tmp_path / "state"}"\n{supervisor}'
        + textwrap.dedent(proxies)
    )
    return str(path)


def test_config_check_reports_all_that_dcod_run_would_meet_at_once(tmp_path, held_port):
    """Issue 18: each of these passed `dcod config --check`, and `dcod run` (or a stop under
    systemd) then failed on it; now every one is reported, with file, key and reason."""
    _, listen = held_port
    (tmp_path / "a-file").write_text("")
    path = config_file(
        tmp_path,
        listen,
        """\
        [[proxy]]
        id = 1
        handler = "ehco"
        [[proxy]]
        id = 2
        handler = "nosuchpkg.mod:handle"
        [[proxy]]
        id = 3
        handler = "json:nosuchfunc"
        [[proxy]]
        id = 4
        command = ["nosuch-dcod-worker", "--fast"]
        [[proxy]]
        id = 5
        handler = "echo"
        """,
        supervisor=f'drain_timeout = 600\n[alert]\ndir = "{tmp_path / "a-file" / "alerts"}"\n',
    )
    result = dcod("config", "--check", "--config", path, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and not result.stdout, result
    lines = result.stderr.splitlines()
    expected = [
        f"alert.dir: alert directory (alert.dir) {tmp_path}/a-file/alerts: Not a directory ({tmp_path}/a-file).",
        f"hub.listen: cannot listen on {listen}: Address already in use (EADDRINUSE)",
        "supervisor.drain_timeout: a stop may take 632s (drain_timeout 600 + 3 x stop_timeout 10 + 2), more than "
        "the packaged dco-hub.service's TimeoutStopSec=75s, after which systemd kills what still runs",
        "proxy[0].handler: handler 'ehco': no built-in handler of that name (echo, http); one of your own is "
        '"package.module:function"',
        "proxy[1].handler: handler 'nosuchpkg.mod:handle': cannot import nosuchpkg.mod: ModuleNotFoundError: "
        "No module named 'nosuchpkg'",
        "proxy[2].handler: handler 'json:nosuchfunc': json has no async function 'nosuchfunc'",
        "proxy[3].command: 'nosuch-dcod-worker' is not found on PATH (/usr/bin:/bin)",
    ]
    assert len(lines) == len(expected), result.stderr
    for line, text in zip(lines, expected, strict=True):
        assert line.startswith(f"dcod: {path}: {text}"), (line, text)

    # What depends on the host aside (another host's configuration, a package build): the rest.
    result = dcod("config", "--check", "--no-host-checks", "--config", path)
    assert result.returncode == 1 and "alert.dir" not in result.stderr and "hub.listen" not in result.stderr
    assert "supervisor.drain_timeout" in result.stderr and "proxy[2].handler" in result.stderr, result.stderr


def test_config_check_loads_handlers_as_the_workers_do(tmp_path):
    """Isolated (python -I, as the supervisor starts them): a module found only through PYTHONPATH
    or the working directory is refused, one in handler_path is found."""
    port = f"127.0.0.1:{free_port()}"
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "mine.py").write_text("async def handle(req):\n    return req.body\n")
    proxies = '[[proxy]]\nid = 1\nhandler = "mine:handle"\n'
    path = config_file(tmp_path, port, proxies)
    result = dcod("config", "--check", "--config", path, cwd=handlers, env={**os.environ, "PYTHONPATH": str(handlers)})
    assert result.returncode == 1, result
    assert f"{path}: proxy[0].handler: handler 'mine:handle': cannot import mine: ModuleNotFoundError" in result.stderr
    config_file(tmp_path, port, proxies + f'handler_path = ["{handlers}"]\n')
    result = dcod("config", "--check", "--config", path)
    assert result.returncode == 0 and not result.stdout and not result.stderr, result


def test_config_check_leaves_the_address_to_systemd_when_it_passes_the_socket(tmp_path, held_port):
    sock, listen = held_port
    path = config_file(tmp_path, listen, '[[proxy]]\nid = 1\nhandler = "echo"\n')
    argv, options = socket_activated([sys.executable, "-m", "dcod", "config", "--check", "--config", path], sock)
    result = subprocess.run(argv, **options, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result
    assert dcod("config", "--check", "--config", path).returncode == 1  # as a plain `dcod run` would


async def test_config_check_of_the_running_services_configuration_passes(run):
    """Its own supervisor holds the address: not a problem (checking before a reload)."""
    r = run()
    await r.notification("READY=1")
    result = dcod("config", "--check", "--config", r.config.source)
    assert result.returncode == 0 and not result.stderr, result


def test_config_check_gives_a_handler_ready_timeout_to_load_then_kills_its_check(tmp_path):
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    pid_file = tmp_path / "pid"
    (handlers / "stuck.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n"
        "async def handle(req):\n    return req.body\n"
    )
    path = config_file(
        tmp_path,
        f"127.0.0.1:{free_port()}",
        f'[[proxy]]\nid = 1\nhandler = "stuck:handle"\nhandler_path = ["{handlers}"]\n',
        supervisor="ready_timeout = 3.0\n",
    )
    result = dcod("config", "--check", "--config", path)
    assert result.returncode == 1, result
    assert (
        f"{path}: proxy[0].handler: handler 'stuck:handle': not loaded within ready_timeout (3s), as a worker must be"
        in result.stderr
    ), result.stderr
    assert not psutil.pid_exists(int(pid_file.read_text()))
