"""Issue 18 item 6, without systemd: `dcod reload --upgrade` re-executes the supervisor in place on
the dcod installed now (same pid), which then rolls the hub and every worker onto it, under load,
losing nothing. The "installed" dcod is a copy of the package that the test then changes, as a
package upgrade changes the files under a running service (tests/test_systemd.py does it with
two .debs under a real systemd)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

import dcod
from conftest import free_port
from runs import ECHO
from test_metrics import scrape, value, with_metrics
from test_rollout import (  # noqa: F401 (fixtures)
    alert_counter,
    dcod_async,
    handler_module,
    handler_path,
    hub_sigtermed_with_a_request_held,
    slow_echo,
    started_load,
    status,
)

NEW_VERSION = "9.9.9+upgraded"


def installed_copy(tmp_path: Path) -> Path:
    """A copy of the dcod package, the one `dcod run` and its children import (tmp_path/src/dcod)."""
    src = tmp_path / "src"
    shutil.copytree(Path(dcod.__file__).parent, src / "dcod", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def set_version(src: Path, version: str) -> None:
    init = src / "dcod" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))


def run_from(run, src: Path, tmp_path: Path, proxies: str = ECHO):
    return run(proxies, how={"env": {"PYTHONPATH": str(src)}, "cwd": tmp_path})


def pids(snapshot: dict) -> set[int]:
    return {p["pid"] for p in snapshot["processes"]}


async def test_upgrade_in_place_under_load_loses_nothing(run, nursery, tmp_path):
    src = installed_copy(tmp_path)
    port = free_port()
    r = run_from(run, src, tmp_path, with_metrics(port))
    await r.notification("READY=1")
    before = status(r.config)
    assert (before["supervisor"]["version"], before["supervisor"]["reexecs"]) == (dcod.__version__, 0)
    load = await started_load(nursery, r)
    alerts = alert_counter(r.config)

    set_version(src, NEW_VERSION)  # the package is upgraded under the running service
    t0 = time.monotonic()
    result = await dcod_async(r.config, "reload", "--upgrade")
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(f"dcod {dcod.__version__} -> {NEW_VERSION}" in line for line in lines), lines
    reexeced = next(line for line in lines if f"runs dcod {NEW_VERSION}" in line)
    assert any("quit alert" in line for line in lines), lines
    assert lines[-1].startswith("reload: done in"), lines
    await r.notification("RELOADING=1")
    await r.notification("READY=1")

    await load.progress(200)  # the sessions carry on with the new generation
    load.stop()
    assert (load.lost, load.unavailable, load.mismatched, dict(load.errors)) == (0, 0, 0, {}), load.error_texts
    assert alert_counter(r.config) > alerts, "no quit alert for the old hub"
    after = status(r.config)
    sup = after["supervisor"]
    assert sup["pid"] == before["supervisor"]["pid"] == r.proc.pid and r.proc.poll() is None
    assert (sup["version"], sup["reexecs"]) == (NEW_VERSION, 1), sup
    assert sup["uptime"] >= before["supervisor"]["uptime"], "the supervisor's age starts again"
    assert sup["rollout"]["state"] == "done"
    rows = {p["name"]: (p["version"], p["generation"], p["state"]) for p in after["processes"]}
    assert rows == {name: (NEW_VERSION, 2, "ready") for name in ("hub", "worker 1#0", "worker 1#1")}, rows
    assert not pids(after) & pids(before), "a child was not replaced"
    samples = await scrape(port)  # the endpoint's socket was handed over too, and serves the new code
    assert value(samples, "dcod_build_info", version=NEW_VERSION) == 1
    print(f"upgrade in place took {took:.2f}s under load; {load.ok} calls answered, none lost; {reexeced}")

    # What the next image took over, it hands over again; and it stops as the first one would.
    result = await dcod_async(r.config, "reload", "--upgrade")
    assert result.returncode == 0, result.stdout + result.stderr
    again = status(r.config)
    assert (again["supervisor"]["pid"], again["supervisor"]["reexecs"]) == (r.proc.pid, 2)
    assert {p["generation"] for p in again["processes"]} == {3}, again["processes"]
    children = r.children()
    assert r.stop() == 0, r.log  # SIGTERM, blocked across each exec, is taken again
    assert not [c for c in children if c.is_running()], "children left behind"


@pytest.mark.parametrize(
    ("change", "said", "returncode"),
    [
        # broken: the old dcod goes on (exit status 1); the postinst leaves it serving, and says so
        (lambda text: text + "\nraise ImportError('a broken upgrade')\n", "a broken upgrade", 1),
        # sound, but not in place (exit status 4): the postinst restarts the service instead
        (lambda text: text.replace("\nFORMAT = 1 ", "\nFORMAT = 2 "), "this dcod reads format 2", 4),
    ],
    ids=["import error", "another hand-over format"],
)
async def test_upgrade_refused_when_the_new_code_cannot_take_over(run, tmp_path, change, said, returncode):
    src = installed_copy(tmp_path)
    r = run_from(run, src, tmp_path)
    await r.notification("READY=1")
    before = status(r.config)
    reexec = src / "dcod" / "supervisor" / "reexec.py"
    reexec.write_text(change(reexec.read_text()))

    result = await dcod_async(r.config, "reload", "--upgrade")
    assert result.returncode == returncode, result.stdout + result.stderr
    assert "cannot take over" in result.stderr and said in result.stderr, result.stderr
    assert "nothing changed" in result.stderr
    after = status(r.config)
    assert after["supervisor"]["pid"] == r.proc.pid and r.proc.poll() is None
    assert (after["supervisor"]["version"], after["supervisor"]["reexecs"]) == (dcod.__version__, 0)
    assert pids(after) == pids(before), "a child was replaced"
    assert all(p["state"] == "ready" for p in after["processes"]), after["processes"]
    called = await dcod_async(r.config, "call", "1", "still served")
    assert called.stdout.strip() == "still served", called.stderr


async def test_upgrade_waits_until_a_hub_draining_from_outside_has_exited(run, slow_echo, tmp_path):  # noqa: F811
    """What is handed over is running processes only: a hub generation that drains (SIGTERM from
    outside, a request held until drain_timeout) is waited for, and said so."""
    r = run(slow_echo, supervisor="drain_timeout = 3.0\nstop_timeout = 1.0")
    await r.notification("READY=1")
    async with hub_sigtermed_with_a_request_held(r, tmp_path, audsid=81) as hub:
        result = await dcod_async(r.config, "reload", "--upgrade")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"waiting for hub generation 1 (pid {hub.pid}) to exit" in result.stdout, result.stdout
    assert result.stdout.index("to exit") < result.stdout.index("re-executing")
    snapshot = status(r.config)
    assert (snapshot["supervisor"]["pid"], snapshot["supervisor"]["reexecs"]) == (r.proc.pid, 1)
    assert [p["state"] for p in snapshot["processes"]] == ["ready"] * 3, snapshot["processes"]


async def test_a_supervisor_that_predates_upgrades_in_place_is_restarted_instead(run, tmp_path):
    """The first upgrade to a dcod that has them: the running supervisor does not know the command;
    `dcod reload --upgrade` exits 4, which tells the postinst to restart the service."""
    src = installed_copy(tmp_path)
    supervisor = src / "dcod" / "supervisor" / "supervisor.py"
    older = supervisor.read_text().replace("elif command == Control.UPGRADE:", "elif False:")
    assert older != supervisor.read_text()
    supervisor.write_text(older)
    r = run_from(run, src, tmp_path)
    await r.notification("READY=1")

    result = await dcod_async(r.config, "reload", "--upgrade")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "unknown command 'upgrade'" in result.stderr, result.stderr
    assert "a restart of the service runs the new code" in result.stderr
