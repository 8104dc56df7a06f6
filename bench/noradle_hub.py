#!/usr/bin/env python3
"""The reference for the hub's figures: the same load on a Node.js hub that behaves as Noradle's.

    .venv/bin/python bench/noradle_hub.py                  # 16 sessions x 4, 100-byte bodies, 10 s
    .venv/bin/python bench/noradle_hub.py --duration 8 --json
    .venv/bin/python bench/noradle_hub.py --log-pdus       # with Noradle's default logging

It starts one dcod echo worker and tests/noradle/ext_hub.js (the Node.js emulation of
Noradle's ext-hub the compatibility tests use: one connection per proxy, one write per PDU,
Node's default socket options) in front of it, and runs `dcod bench --hub` against that hub,
measuring the Node process's CPU. With --log-pdus the hub logs a line per PDU each way, as
Noradle's ext_hub.js does by default, into a file (as `node ... 2>file` would). Every other
argument goes to `dcod bench`. Compare with `dcod bench --instances 1` (one worker
connection, as Noradle has) run just before or after: the machine's speed changes from hour
to hour.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from dcod.bench.target import free_port

HUB_JS = Path(__file__).resolve().parent.parent / "tests" / "noradle" / "ext_hub.js"


def main(argv: list[str]) -> int:
    log_pdus = "--log-pdus" in argv
    argv = [arg for arg in argv if arg != "--log-pdus"]
    with tempfile.TemporaryFile() as pdu_log:
        status = run(argv, log_pdus, pdu_log)
        if log_pdus:
            pdu_log.seek(0)
            print(f"noradle_hub: the hub logged {sum(1 for _ in pdu_log):,} PDUs", file=sys.stderr)
        return status


def run(argv: list[str], log_pdus: bool, pdu_log) -> int:
    worker_address = f"127.0.0.1:{free_port()}"
    worker = subprocess.Popen([sys.executable, "-m", "dcod", "worker", "--proxy", "1", "--listen", worker_address])
    hub = subprocess.Popen(
        ["node", str(HUB_JS), "0", f"1={worker_address}", *(["--log-pdus"] if log_pdus else [])],
        stdout=subprocess.PIPE,
        stderr=pdu_log if log_pdus else None,
        text=True,
    )
    try:
        first = json.loads(hub.stdout.readline() or "{}")  # {"event": "listening", "port": N}
        if first.get("event") != "listening":
            print(f"noradle_hub: {HUB_JS.name} did not start", file=sys.stderr)
            return 2
        # Its later events (a line per worker connection) must not fill the pipe.
        threading.Thread(target=hub.stdout.read, daemon=True).start()
        bench = [
            sys.executable,
            "-m",
            "dcod",
            "bench",
            "--hub",
            f"127.0.0.1:{first['port']}",
            "--pid",
            str(hub.pid),
            *argv,
        ]
        return subprocess.run(bench).returncode
    finally:
        for process in (hub, worker):
            process.terminate()
            process.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
