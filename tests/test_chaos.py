"""A short chaos run (bench/chaos.py, about 15 s of faults): a real `dcod run` under sync and one-way
load while its hub, its workers and the supervisor itself are SIGKILLed, SIGSTOPped and SIGTERMed,
a handler blocks its worker, a poison request kills its worker, the state directory fills up (as
root), with `dcod reload` at random times. Every kind of fault is injected at least once (--cover).

The invariants are bench/chaos.py's: every sync request has exactly one outcome, every abnormal
outcome and every missing one-way request is explained by a fault just before it, nothing is
duplicated without an unclean hub death, no dcod process is left behind, none died of an
unhandled exception. The long run is `bench/chaos.py --duration 180` (see RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parent.parent / "bench" / "chaos.py"


@pytest.mark.slow
def test_chaos_run_keeps_every_invariant(tmp_path):
    report = tmp_path / "chaos.json"
    result = subprocess.run(
        [
            sys.executable,
            str(CHAOS),
            "--duration",
            "15",
            "--seed",
            "20241123",
            "--cover",
            "--calm",
            "1",
            "--storm",
            "14",
            "--interval",
            "0.8",
            "--reload-interval",
            "4",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert report.exists(), "the chaos run did not finish"
    r = json.loads(report.read_text())
    # It really was chaos: every kind of fault, load that went through, reloads tried.
    kinds = {" ".join(k.split()[::2]) if k.startswith("worker") else k for k in r["faults"]}
    signals = {f"{t} {s}" for t in ("hub", "worker", "supervisor") for s in ("SIGKILL", "SIGSTOP", "SIGTERM")}
    disk = {"state full"} if os.geteuid() == 0 else set()  # a small tmpfs of its own: root only
    assert kinds == signals | {"handler block", "handler poison"} | disk, r["faults"]
    assert r["blocked_handlers"] and "ok" not in r["blocked_handlers"]  # killed as hung
    assert r["poison"]["sent"] > 0 and r["poison"]["innocent_set_aside"] == 0
    assert r["sync"]["outcomes"].get("ok", 0) > 100 and r["oneway"]["seen"] > 100
    assert sum(r["reloads"].values()) > 0
    assert r["supervisor"]["starts"] >= 3  # started, restarted after SIGKILL, after SIGTERM
    assert r["violations"] == []
    assert result.returncode == 0
