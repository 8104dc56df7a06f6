"""dcod(1) and dcod's bash completion, written from the argument parser (dcod.cli.main) so that
they cannot drift from it; the package's build runs::

    python3 -m dcod.cli.reference man > dcod.1
    python3 -m dcod.cli.reference bash-completion > dcod.bash-completion

In the man page, every command with its description and options comes from the parser; the
sections that --help ends with (exit status, signals, environment, files, examples) from the
same lists in dcod.cli.main; the error replies from dcod.protocol.ErrorCode.

Not Debian 12's tools for this: its argparse-manpage (1.2.2) writes a NAME line without a
description (lintian: bad-whatis-entry), takes extra sections only through a private attribute
of the parser and drops the epilog; its shtab (1.5.5) writes a bash completion that offers only
the first command. Both are a walk over the parser, done here.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from dcod import __version__
from dcod.cli import main
from dcod.protocol import ErrorCode

SUMMARY = "Noradle DCO ext-hub, worker proxies and their supervisor"

ERROR_REPLIES = {
    ErrorCode.UNKNOWN_PROXY: "unknown proxy id",
    ErrorCode.REPLY_TIMEOUT: "no reply within hub.reply_timeout",
    ErrorCode.WORKER_LOST: "the worker instance went away before replying",
    ErrorCode.QUEUE_FULL: "queue full (the proxy's spool_max reached; or, its spool not durable, queue_memory)",
    ErrorCode.DRAINING: "the hub stopped before the reply came (drain_timeout), or a reload removed the proxy",
    ErrorCode.HANDLER_FAILED: "the worker's handler failed (an exception: its type and text follow)",
    ErrorCode.OVERLOADED: "the session has hub.max_inflight_per_session sync requests unanswered already",
    ErrorCode.POISON: "the request was set aside as poison: its worker died on it hub.poison_after times "
    "(asked again, the same request is answered so at once)",
}

SERVICE = """\
On a Debian system the supervisor runs as dco-hub.service, started by the first connection to \
dco-hub.socket (TCP 127.0.0.1:1523), as user and group dcod. The socket unit decides where the service \
listens, not hub.listen: `systemctl edit dco-hub.socket` changes it. `systemctl reload dco-hub` runs \
`dcod reload`; `systemctl stop dco-hub` sends SIGTERM. Members of group dcod may use `dcod status`, \
`dcod reload` and `dcod stop`. The hub and the workers run isolated (python3 -I): a handler module of your \
own is an installed package or lies in its proxy's handler_path.

Outside systemd, `dcod run` uses directories of its own user (root's too): $XDG_RUNTIME_DIR/dcod (else \
~/.local/state/dcod/run) and ~/.local/state/dcod. It refuses a directory that is not its user's or that \
others may write to, and locks each (dcod.lock): a second `dcod run` on it exits 1 naming the pid of the \
first."""

SEE_ALSO = "systemctl(1), journalctl(1), systemd.socket(5); /usr/share/doc/dcod/README.md"


def escape(text: str) -> str:
    """Text as roff prints it literally: backslashes, minus signs, and a dot or quote that starts a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def _paragraphs(text: str) -> list[str]:
    """Text as paragraphs (filled by roff), from the parser's wrapped text."""
    return [" ".join(p.split()) for p in text.strip().split("\n\n") if p.strip()]


def _invocation(action: argparse.Action) -> str:
    """``\\fB\\-\\-config\\fR \\fIFILE\\fR`` for an option, ``\\fIPROXY\\fR`` for a positional."""
    if not action.option_strings:
        return f"\\fI{escape(action.metavar or action.dest)}\\fR"
    value = "" if action.nargs == 0 else f" \\fI{escape(action.metavar or action.dest.upper())}\\fR"
    return ", ".join(f"\\fB{escape(option)}\\fR{value}" for option in action.option_strings)


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def _options(parser: argparse.ArgumentParser, described: frozenset[str] = frozenset()) -> list[str]:
    """The parser's options and positionals as a list, but for those ``described`` already."""
    lines = []
    for action in parser._actions:
        if (
            isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            or action.help == argparse.SUPPRESS
            or described.intersection(action.option_strings)
        ):
            continue
        lines += [".TP", _invocation(action), escape(action.help or "")]
    return lines


def _items(items: list[tuple[str, str]]) -> list[str]:
    lines = []
    for term, what in items:
        lines += [".TP", f"\\fB{escape(term)}\\fR", escape(what)]
    return lines


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's commands, by name, in the order --help lists them."""
    return dict(_subparsers(parser).choices)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option of a parser (not its commands'), --help included."""
    return [option for action in parser._actions for option in action.option_strings]


def manpage(parser: argparse.ArgumentParser, date: datetime.date) -> str:
    subcommands = commands(parser)
    summaries = {action.dest: action.help for action in _subparsers(parser)._choices_actions}
    lines = [
        f'.TH DCOD 1 "{date:%B %Y}" "dcod {__version__}" "User Commands"',
        ".SH NAME",
        f"dcod \\- {escape(SUMMARY)}",
        ".SH SYNOPSIS",
        ".B dcod",
        escape("[--config FILE] [-v] COMMAND [OPTIONS]"),
        ".br",
        ".B dcod",
        escape("--version | --help"),
    ]
    lines += [".SH DESCRIPTION"]
    for paragraph in [*_paragraphs(parser.description), *_paragraphs(SERVICE)]:
        lines += [escape(paragraph), ".PP"]
    lines[-1:] = []
    lines += [
        ".SH OPTIONS",
        escape("These come before the command or after it; `dcod COMMAND --help` describes the command's own."),
        *_options(parser),
    ]
    common = frozenset(option_strings(parser))
    lines += [".SH COMMANDS"]
    for name, command in subcommands.items():
        lines += [f".SS {escape(name)}", f"\\fB{escape(_usage(command))}\\fR", ".PP"]
        for paragraph in _paragraphs(command.description or summaries[name] or ""):
            lines += [escape(paragraph), ".PP"]
        lines[-1:] = []
        lines += _options(command, common)
    lines += [
        ".SH CONFIGURATION",
        escape(" ".join(main.CONFIGURATION.split())),
        ".PP",
        escape(
            "The file documents every key. After editing it, `systemctl reload dco-hub` rolls the change "
            "out; an invalid file is refused and changes nothing."
        ),
    ]
    for title, items in main.SECTIONS.items():
        lines += [f".SH {title.upper()}", *_items(items)]
    lines += [
        ".SH ERROR REPLIES",
        escape(
            "A sync request is always answered, by the worker's reply or by an error reply whose text "
            "starts with a stable code:"
        ),
        *_items([(code.text("").strip(), what) for code, what in ERROR_REPLIES.items()]),
    ]
    lines += [".SH SEE ALSO", escape(SEE_ALSO)]
    return "\n".join(lines) + "\n"


def build_date() -> datetime.date:
    """$SOURCE_DATE_EPOCH's (a reproducible build: the changelog's date), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date()
    return datetime.date.today()


BASH_COMPLETION = """\
# bash completion for dcod(1), written from its argument parser by dcod.cli.reference: do not edit.
_dcod() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} command="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            {global_values}) ((i++)) ;;
            -*) ;;
            *) command=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    case $prev in
        {file_values})
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return ;;
        {other_values}) return ;;
    esac
    local options
    case $command in
        "")
            if [[ $cur != -* ]]; then
                mapfile -t COMPREPLY < <(compgen -W "{commands}" -- "$cur")
                return
            fi
            options="{global_options}" ;;
{command_options}
        *) return ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$options" -- "$cur")
    fi
}}
complete -F _dcod dcod
"""


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """Commands, then each command's options; an option's value is completed with file names
    if its metavar is FILE, else not at all. --config and -v before the command are understood."""
    subcommands = commands(parser)
    takes_value = [a for p in [parser, *subcommands.values()] for a in p._actions if a.option_strings and a.nargs != 0]
    files = sorted({o for a in takes_value if a.metavar == "FILE" for o in a.option_strings})
    others = sorted({o for a in takes_value if a.metavar != "FILE" for o in a.option_strings} - set(files))
    global_values = [o for a in parser._actions if a.option_strings and a.nargs != 0 for o in a.option_strings]
    return BASH_COMPLETION.format(
        global_values="|".join(global_values),
        file_values="|".join(files),
        other_values="|".join(others),
        commands=" ".join(subcommands),
        global_options=" ".join(option_strings(parser)),
        command_options="\n".join(
            f'        {name}) options="{" ".join(option_strings(command))}" ;;' for name, command in subcommands.items()
        ),
    )


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) == 2 else ""
    if what not in ("man", "bash-completion"):
        sys.exit("usage: python3 -m dcod.cli.reference man|bash-completion")
    parser = main.build_parser()
    sys.stdout.write(manpage(parser, build_date()) if what == "man" else bash_completion(parser))
