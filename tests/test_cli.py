"""The `dcod` command line: options before or after the command, --help, and the man page and bash
completion written from the parser (dcod.cli.reference), as the package's build writes them."""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys

import pytest

from dcod.cli import main, reference
from dcod.protocol import ErrorCode


def dcod(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcod", *args], capture_output=True, text=True, timeout=60)


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
        "  3  `status`, `reload`, `stop`: no supervisor is running",
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
