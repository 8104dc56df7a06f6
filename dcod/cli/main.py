"""The `dcod` command: its argument parser, which is also the source of the man page and of the
bash completion (dcod.cli.reference writes them when the package is built), and its dispatch."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from dcod import __version__

DESCRIPTION = """\
dcod runs the Noradle DCO ("direct call out") tier: the ext-hub that Oracle sessions
connect to, the worker proxies that make the out-calls, and a supervisor that keeps
them running and restarts them without losing a request.
"""

CONFIGURATION = """\
--config FILE, else $DCOD_CONFIG, else /etc/dcod/dcod.toml if it exists, else the built-in
default (a hub on 127.0.0.1:1523 and an echo proxy, id 1, 2 instances). --config and -v may come
before or after the command."""

# The sections that --help ends with and the man page has, each a list of (term, what).
EXIT_STATUS = [
    ("0", "success; `status`: everything is up"),
    (
        "1",
        "failure: an invalid configuration, a reload or stop that failed, a command the supervisor "
        "refused (permission), an error reply or no reply in time (`call`), a request lost, refused or "
        "answered wrongly (`bench`)",
    ),
    ("2", "bad arguments; `call`: no hub reached; `bench`: the bench could not run"),
    (
        "3",
        "`status`, `reload`, `stop`: no supervisor is running (LSB: program is not running); "
        "`status`: degraded: a worker instance or hub down, restarting after a failure (backoff) or "
        "left down (failed), or a quit-alert backend whose last attempt failed",
    ),
    (
        "4",
        "`reload --upgrade`: the running supervisor cannot take the dcod installed now over in place (it "
        "predates upgrades in place, or cannot hand over to that dcod); nothing changed, a restart "
        "runs the new code",
    ),
    ("130", "`reload`, `stop`: interrupted (Ctrl-C); the supervisor carries on with the reload or stop"),
]
SIGNALS = [
    ("SIGHUP", "to `dcod run`: a reload, as `dcod reload` (its steps and outcome go to the log)"),
    (
        "SIGTERM, SIGINT",
        "to `dcod run`: stop, as `dcod stop`: every hub generation drains (the quit alert is "
        "raised), then the workers stop; exit status 0",
    ),
]
ENVIRONMENT = [
    ("DCOD_CONFIG", "the configuration file when --config is not given"),
    (
        "RUNTIME_DIRECTORY, STATE_DIRECTORY",
        "set by systemd: the defaults of supervisor.runtime_dir and supervisor.state_dir",
    ),
    (
        "LISTEN_FDS, LISTEN_FDNAMES, NOTIFY_SOCKET, WATCHDOG_USEC",
        "set by systemd: the socket passed to `dcod run`, sd_notify, the watchdog",
    ),
]
FILES = [
    ("/etc/dcod/dcod.toml", "the configuration; it documents every key"),
    (
        "/run/dcod/",
        "the runtime directory (supervisor.runtime_dir): control.sock, the control socket of "
        "`dcod status|reload|stop` (root and group dcod); worker-ID-N.sock, the worker instances' "
        "sockets; config-*.toml, the configuration the children run",
    ),
    (
        "/run/dcod/alerts/Noradle-DCO-EXTHUB-QUIT",
        'the quit alert file (alert.dir, alert.name): one line "COUNTER HOST:PORT", replaced whenever a hub goes away',
    ),
    (
        "/var/lib/dcod/",
        "the state directory (supervisor.state_dir): spool/, the durable queue of requests "
        "waiting for a worker instance; dead-letters/, the requests set aside as poison "
        "(`dcod dead-letters`); hub.running, left behind by an unclean stop",
    ),
]
EXAMPLES = [
    ("dcod run", "start hub and workers in the foreground"),
    ("dcod call 1 hello", 'send "hello" to proxy 1 and print the reply'),
    ("dcod call 1 --oneway hi", "send a one-way request, do not wait"),
    ("dcod status", "what runs: processes, generations, counters, queues"),
    ("dcod dead-letters list", "the requests set aside as poison, every proxy's"),
    ("dcod dead-letters retry 1 --all", "queue proxy 1's dead letters again, once its handler is fixed"),
    ("systemctl reload dco-hub", "roll out new code and config (runs `dcod reload`)"),
    ("dcod --config x.toml config --check", "check all that `dcod run` would meet and exit"),
    ("dcod bench --duration 10", "measure round trips/s and hub CPU per round trip"),
    ("dcod bench --reload-at 4", "the same, with a `dcod reload` 4 s into the window"),
]
SECTIONS = {
    "exit status": EXIT_STATUS,
    "signals": SIGNALS,
    "environment": ENVIRONMENT,
    "files": FILES,
    "examples": EXAMPLES,
}


TERM_WIDTH = 24  # a longer term in --help has a line of its own


def _epilog() -> str:
    parts = ["configuration:\n" + textwrap.indent(CONFIGURATION, "  ")]
    for title, items in SECTIONS.items():
        width = max(len(term) for term, _ in items if len(term) <= TERM_WIDTH) + 2
        lines = [f"{title}:"]
        for term, what in items:
            text = textwrap.wrap(what, 96 - width, break_on_hyphens=False)
            lead = f"  {term:<{width}}"
            if len(term) > width - 2:  # too long to share a line with its text
                lines.append(f"  {term}")
                lead = " " * (width + 2)
            lines += [lead + text[0], *(" " * (width + 2) + line for line in text[1:])]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _add_common(parser: argparse.ArgumentParser, default) -> None:
    """--config and -v, which every command takes, before the command or after it. After it, an
    absent option must not overwrite the value given before it: its default is SUPPRESS."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,  # FILE: completed with file names
        help="configuration file (TOML); default: $DCOD_CONFIG, else /etc/dcod/dcod.toml if it "
        "exists, else the built-in one",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=False if default is None else default, help="log debug messages"
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)

    parser = argparse.ArgumentParser(
        prog="dcod", description=DESCRIPTION, epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dcod {__version__}")
    _add_common(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser(
        "run",
        parents=[common],
        help="run the supervisor: hub and workers (the service's main process)",
        description="Run the hub and the managed worker proxies and keep them running. Takes the "
        "Oracle-facing socket from systemd (socket activation) or binds hub.listen. With metrics.listen "
        "set, also serves Prometheus metrics on http://HOST:PORT/metrics (the counters of `dcod status`).",
    )

    p = sub.add_parser(
        "status",
        parents=[common],
        help="show processes, generations, in-flight, queues, memory",
        description="Ask the running supervisor what runs: every process with pid, generation, "
        "state, uptime, memory, CPU and counters; then the hub's totals per proxy, and "
        "what is degraded. Exit status 0 when everything is up; 3 when something is "
        "degraded (a worker instance or hub down, restarting after a failure or left "
        "down, a quit-alert backend whose last attempt failed), or when no supervisor "
        "answers; 1 if the supervisor refuses.",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the status as JSON, data only: numbers, wall times in seconds since the epoch, "
        "null where a value is absent; its problems list says what makes the exit status 3",
    )
    p = sub.add_parser(
        "reload",
        parents=[common],
        help="roll out: re-read the config, restart hub and workers one by one",
        description="Re-read and validate the configuration, then replace the hub (new generation "
        "first, the old one drains) and each worker instance in turn, without losing a "
        "request. Prints one line per step and exits 0 only when the rollout is done; "
        "if it fails, the old generation keeps serving. This is ExecReload= of "
        "dco-hub.service.",
    )
    p.add_argument(
        "--upgrade",
        action="store_true",
        help="first re-execute the supervisor in place (same pid) on the dcod installed now, once that "
        "has shown it can take over; then roll out, so that every process runs the new code. The "
        "package's postinst runs this on upgrade",
    )
    sub.add_parser(
        "stop",
        parents=[common],
        help="stop the supervisor: drain the hub, then stop the workers",
        description="Stop the service's processes in order: every hub generation drains (the quit "
        "alert is raised; its sessions' requests are answered), then the workers stop, "
        "then the supervisor. Prints one line per step, and what it waits for, and exits "
        "0 once the supervisor has exited; 1 if the stop failed, 3 if no supervisor runs. "
        "The same as SIGTERM to `dcod run`. Under systemd, prefer `systemctl stop dco-hub`: "
        "`dcod stop` leaves the socket listening, and the next connection starts the "
        "service again.",
    )

    p = sub.add_parser(
        "dead-letters",
        parents=[common],
        help="list, retry or drop the requests set aside as poison",
        description="A one-way request whose worker instance went away (died, or was killed as hung) "
        "before finishing it hub.poison_after times is set aside as poison in its proxy's dead-letter "
        "file (state_dir/dead-letters/proxy-ID.jsonl) and never delivered again unless retried. "
        "`list` shows them (every proxy's, or PROXY's), with their key: the session's audsid and the "
        "hub's request number; `retry` queues them again for PROXY (a running hub takes them within a "
        "second; else the next one), their attempts reset; `drop` deletes them. Through the running "
        "supervisor, else on the files directly (then run it as the service's user). Exit status 1 if "
        "an ID is not there. A sync request that killed its worker hub.poison_after times (sent again by "
        "its session) is set aside too, and answered DCO-0008; it cannot be retried (its session is gone), "
        "only dropped; the running hub refuses the same request until it is dropped.",
    )
    p.add_argument("action", choices=("list", "retry", "drop"), metavar="ACTION", help="list, retry or drop")
    p.add_argument("proxy", nargs="?", type=int, metavar="PROXY", help="the proxy id (retry and drop need it)")
    p.add_argument("ids", nargs="*", type=int, metavar="ID", help="the dead letters to retry or drop, as `list` shows")
    p.add_argument("--all", action="store_true", help="retry or drop every dead letter of PROXY")
    p.add_argument("--json", action="store_true", help="print the dead letters concerned as JSON (without their PDUs)")

    p = sub.add_parser("hub", parents=[common], help="run only the ext-hub (for debugging)")
    p.add_argument("--listen", metavar="ADDR", help="host:port or unix socket path (default: hub.listen)")

    p = sub.add_parser("worker", parents=[common], help="run one worker proxy instance (for debugging)")
    p.add_argument("--proxy", type=int, required=True, metavar="ID", help="proxy id from the configuration")
    p.add_argument("--instance", type=int, default=0, metavar="N", help="instance number (default 0)")
    p.add_argument("--listen", metavar="ADDR", help="host:port or unix socket path (default: its runtime socket)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only load the handler as the worker would (handler_path, the import, an async function; "
        "not init()) and exit: 0, or 1 with the reason; `dcod config --check` runs this for each proxy",
    )

    p = sub.add_parser(
        "call",
        parents=[common],
        help="send one request as an Oracle session would",
        description="Send TEXT to a proxy through the hub; print the reply.",
    )
    p.add_argument("proxy", type=int, metavar="PROXY", help="proxy id")
    p.add_argument("text", metavar="TEXT", help="request body")
    p.add_argument("--oneway", action="store_true", help="one-way request: no reply expected")
    p.add_argument("--hub", metavar="HOST:PORT", help="hub address (default: hub.advertise)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for the reply")

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="load a hub with sessions and measure rate, latency and CPU",
        description="Load a hub with Oracle-style sessions, each keeping DEPTH requests outstanding; "
        "report round trips/s, latency, lost/error/mismatched replies, and the CPU time "
        "of every dcod process per round trip and how many round trips it served per "
        "wake-up. Without --hub it starts a private "
        "`dcod run` with echo workers. Exit status 1 if any request was lost, refused "
        "or answered wrongly, 2 if the bench could not run.",
    )
    p.add_argument("--hub", metavar="HOST:PORT", help="load this running hub (default: start a private one)")
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        metavar="PID",
        help="with --hub: a process (and its children) whose CPU to measure; repeatable",
    )
    p.add_argument("--proxy", type=int, default=1, metavar="ID", help="proxy id to call (default 1)")
    p.add_argument(
        "--instances", type=int, default=2, metavar="N", help="echo worker instances of the private hub (default 2)"
    )
    p.add_argument("--sessions", type=int, default=16, metavar="N", help="Oracle sessions (default 16)")
    p.add_argument("--depth", type=int, default=4, metavar="D", help="requests outstanding per session (default 4)")
    p.add_argument("--size", type=int, default=100, metavar="BYTES", help="request body size (default 100)")
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--duration", type=float, default=10.0, metavar="S", help="seconds measured after the warmup (default 10)"
    )
    length.add_argument("--count", type=int, metavar="C", help="measure C round trips instead of a duration")
    p.add_argument(
        "--warmup", type=float, default=1.0, metavar="S", help="seconds of load before measuring (default 1)"
    )
    p.add_argument("--oneway", action="store_true", help="one-way requests: measure the send rate (no replies)")
    p.add_argument(
        "--processes", type=int, default=1, metavar="P", help="load processes the sessions are split over (default 1)"
    )
    disrupt = p.add_mutually_exclusive_group()
    disrupt.add_argument(
        "--reload-at",
        type=float,
        metavar="S",
        help="run `dcod reload` S seconds into the window; report its duration and the latency "
        "of requests sent during it against the others (private hub only)",
    )
    disrupt.add_argument(
        "--kill-hub-at",
        type=float,
        metavar="S",
        help="SIGKILL the hub S seconds into the window; report ms to the quit alert and to the "
        "first reply from the new hub (private hub only)",
    )
    p.add_argument(
        "--idle-sessions",
        type=int,
        metavar="N",
        help="also connect N sessions that only send their handshake; report the hub RSS they cost",
    )
    p.add_argument(
        "--spool",
        action="store_true",
        help="no worker: the proxy is a port where nothing listens, so every request (one-way) goes "
        "to the hub's durable spool; report spooled requests/s and hub CPU per request",
    )
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")

    p = sub.add_parser(
        "config",
        parents=[common],
        help="print the effective configuration, or check it",
        description="Load and validate the configuration and print it with every default made "
        "explicit. Exit status 1 if it is invalid; every error is reported, one line each: file, "
        "key, reason.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check all that `dcod run` would meet, print nothing if all is well: the file; each "
        "handler loads in a worker's environment (`dcod worker --check`); each command is an "
        "executable; the runtime, state and alert directories can be made or are ours and "
        "writable; hub.listen and metrics.listen can be bound (unless systemd passes the socket, or "
        "this configuration's dcod run holds it); a stop fits in the TimeoutStopSec of dco-hub.service "
        "(as systemd has it, else the packaged 75 s). A reload runs the same checks first, "
        "but for the directories and the addresses, which it keeps",
    )
    p.add_argument(
        "--no-host-checks",
        action="store_true",
        help="with --check: leave out the directories and the listen addresses, which depend on the "
        "host (for a configuration meant for another one, or a package build)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dcod import config as configuration  # not before: the parser alone needs only the standard library
    from dcod import log
    from dcod.supervisor import alert

    path = configuration.config_path(args.config)
    try:
        config = configuration.load(path)
        if args.command == "config" and args.check:
            from dcod.supervisor import preflight

            preflight.check_alone(config, host=not args.no_host_checks)  # the alert backends' settings too
        else:
            alert.check(config)  # each alert backend checks its own settings
    except configuration.ConfigError as e:
        for line in e.errors:
            print(f"dcod: {line}", file=sys.stderr)
        return 1
    level = logging.DEBUG if args.verbose else logging.INFO

    if args.command == "config":
        if not args.check:
            print(f"# {config.source}")
            print(configuration.dump(config), end="")
        return 0
    if args.command == "call":
        import functools

        import trio

        from dcod import client

        return trio.run(
            functools.partial(
                client.call, config, args.proxy, args.text, oneway=args.oneway, hub=args.hub, timeout=args.timeout
            )
        )
    if args.command == "bench":
        from dcod.bench import cli as bench

        log.setup("bench", level)
        return bench.main(config, args)
    if args.command in ("status", "reload", "stop"):
        from dcod.cli import admin

        if args.command == "status":
            return admin.status(config, as_json=args.json)
        if args.command == "reload":
            return admin.reload(config, upgrade=args.upgrade)
        return getattr(admin, args.command)(config)
    if args.command == "dead-letters":
        from dcod.cli import admin

        if args.action != "list" and (args.proxy is None or bool(args.ids) == args.all):
            print(f"dcod: dead-letters {args.action}: give PROXY, then IDs or --all", file=sys.stderr)
            return 2
        return admin.dead_letters(config, args.action, args.proxy, args.ids or None, as_json=args.json)
    if args.command == "hub":
        from dcod.hub import server as hub

        log.setup("hub", level)
        return hub.main(config, args.listen)
    if args.command == "worker":
        from dcod.worker import runtime as worker

        try:
            config.proxy(args.proxy)
        except KeyError:
            print(f"dcod: {config.source}: no [[proxy]] with id = {args.proxy}", file=sys.stderr)
            return 1
        if args.check:
            return worker.check(config, args.proxy)
        log.setup(f"worker {args.proxy}#{args.instance}", level)
        return worker.main(config, args.proxy, args.instance, args.listen)
    if args.command == "run":
        from dcod.supervisor import supervisor

        log.setup("supervisor", level)
        return supervisor.main(config)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
