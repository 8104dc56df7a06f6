"""`dcod status` and `dcod stop` against a real `dcod run` (and against stand-ins for a supervisor
that goes away): the exit statuses, the JSON, the stop's steps, and what the journal gets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
import trio

from conftest import free_port, wait_for
from peers import OracleSession
from runs import ECHO
from test_rollout import dcod, status


@pytest.fixture
def gate(tmp_path):
    """The [[proxy]] table of an echo proxy (id 1, 1 instance) whose handler holds a body "hold"
    until tmp_path/release exists, once it has written tmp_path/held."""
    (tmp_path / "gate.py").write_text(
        textwrap.dedent(f"""\
        import os
        import trio

        async def handle(req):
            if req.body == b"hold":
                open({str(tmp_path / "held")!r}, "w").close()
                while not os.path.exists({str(tmp_path / "release")!r}):
                    await trio.sleep(0.01)
            return req.body
        """)
    )
    return f'[[proxy]]\nid = 1\nhandler = "gate:handle"\nhandler_path = ["{tmp_path}"]\ninstances = 1\n'


def dcod_stop(config, command: str = "stop") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dcod", command, "--config", config.source],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def lines_until(stream, text: str, timeout: float = 20) -> list[str]:
    """Lines read from ``stream`` up to the first that contains ``text``."""
    lines = []
    with trio.fail_after(timeout):
        while not lines or text not in lines[-1]:
            line = await trio.to_thread.run_sync(stream.readline)
            assert line, f"no line with {text!r}; got {lines}"
            lines.append(line)
    return lines


def in_order(output: str, *texts: str) -> bool:
    positions = [output.find(text) for text in texts]
    return -1 not in positions and positions == sorted(positions)


async def test_stop_says_each_step_and_what_it_waits_for_and_returns_once_all_has_exited(run, gate, tmp_path):
    r = run(gate)
    await r.notification("READY=1")
    [hub] = r.children_with(" hub")
    [worker] = r.children_with("--instance 0")
    session = await OracleSession.connect(r.config.hub.listen, audsid=5)
    await session.send(1, 1, b"hold")
    await wait_for(lambda: (tmp_path / "held").exists(), timeout=10)
    stop = dcod_stop(r.config)
    try:
        # The hub drains: it waits for the request its worker still handles, and says so.
        lines = await lines_until(stop.stdout, "waiting for 1 request on hub generation 1")
        (tmp_path / "release").touch()
        assert (await session.read())[3] == b"hold"  # answered by the draining hub
        session.close()
        out, err = await trio.to_thread.run_sync(stop.communicate, None, 60)
    finally:
        stop.kill()
    assert stop.returncode == 0, err
    assert r.proc.poll() == 0  # the supervisor has exited (and with it everything) when `dcod stop` returns
    assert not [p for p in (hub, worker) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    output = "".join(lines) + out
    assert in_order(
        output,
        "stop: asking the supervisor",
        f"stop: hub generation 1 (pid {hub.pid}) draining",
        f"stop: quit alert {r.config.alert.name} raised for {r.config.hub.advertise}",
        f"stop: waiting for 1 request on hub generation 1 (pid {hub.pid}), 1 session connected",
        f"stop: hub generation 1 (pid {hub.pid}) exited with status 0",
        f"stop: workers stopping: worker 1#0 generation 1 (pid {worker.pid})",
        f"stop: worker 1#0 generation 1 (pid {worker.pid}) exited with status 0",
        "stop: every process has exited; the supervisor exits",
        f"stop: the supervisor (pid {r.proc.pid}) has exited",
    ), output
    assert "control: stop from pid" in r.log  # a command that changes something is in the journal


async def test_a_second_stop_and_sigterm_join_the_stop_under_way(run, gate, tmp_path):
    r = run(gate)
    await r.notification("READY=1")
    session = await OracleSession.connect(r.config.hub.listen, audsid=6)
    await session.send(1, 1, b"hold")
    await wait_for(lambda: (tmp_path / "held").exists(), timeout=10)
    first = dcod_stop(r.config)
    try:
        await lines_until(first.stdout, "waiting for 1 request")
        r.proc.send_signal(signal.SIGTERM)
        second = dcod_stop(r.config)
        await lines_until(second.stdout, "waiting for 1 request")
        (tmp_path / "release").touch()
        results = [await trio.to_thread.run_sync(p.communicate, None, 60) for p in (first, second)]
    finally:
        first.kill()
    assert [first.returncode, second.returncode] == [0, 0], results
    assert all("has exited" in out for out, _ in results)
    assert r.proc.poll() == 0


@pytest.mark.parametrize("command", ["reload", "stop"])
async def test_ctrl_c_leaves_the_command_going_on_in_the_supervisor_and_says_so(run, gate, tmp_path, command):
    r = run(gate)
    await r.notification("READY=1")
    session = await OracleSession.connect(r.config.hub.listen, audsid=7)
    await session.send(1, 1, b"hold")
    await wait_for(lambda: (tmp_path / "held").exists(), timeout=10)
    cli = dcod_stop(r.config, command)
    try:
        await lines_until(cli.stdout, "draining")  # the hub drains, waiting for the held request
        cli.send_signal(signal.SIGINT)
        out, err = await trio.to_thread.run_sync(cli.communicate, None, 60)
    finally:
        cli.kill()
    assert cli.returncode == 130, out + err
    assert "Traceback" not in err and f"interrupted: the {command} goes on in the supervisor" in err
    (tmp_path / "release").touch()
    assert (await session.read())[3] == b"hold"  # the draining hub still answers it
    session.close()
    if command == "stop":
        assert await trio.to_thread.run_sync(r.proc.wait, 60) == 0
    else:
        await wait_for(lambda: status(r.config)["supervisor"]["rollout"]["state"] == "done", timeout=30)


FAKE_SUPERVISOR = """\
import json, os, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen()
print("listening", flush=True)
conn, _ = listener.accept()
conn.recv(1000)
conn.sendall(json.dumps({"progress": "hub generation 1 draining"}).encode() + b"\\n")
if sys.argv[2] == "exit":
    os._exit(0)  # gone without its final answer
conn.close()
sys.stdin.read()  # the connection ended, and it stays
"""


@pytest.mark.parametrize(
    "behaviour, code, text",
    [
        ("exit", 0, "stop: the supervisor (pid {pid}) has exited"),
        (
            "stay",
            1,
            "dcod: the supervisor ended the connection without an answer, but it still runs (pid {pid}) after 1s",
        ),
    ],
)
async def test_stop_without_a_final_answer_succeeds_only_if_the_supervisor_exits(make_config, behaviour, code, text):
    config = make_config(supervisor="stop_timeout = 1.0")
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_SUPERVISOR, str(config.control_socket), behaviour],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert await trio.to_thread.run_sync(fake.stdout.readline) == "listening\n"
        result = await trio.to_thread.run_sync(dcod, config, "stop")
    finally:
        fake.kill()
        fake.wait()
    assert result.returncode == code, result.stderr
    assert "stop: hub generation 1 draining" in result.stdout
    assert text.format(pid=fake.pid) in result.stdout + result.stderr


async def test_status_exits_0_when_all_is_up_and_its_json_is_data(run):
    r = run(ECHO)
    await r.notification("READY=1")
    result = dcod(r.config, "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["problems"] == []
    assert snapshot["supervisor"]["rollout"] is None  # no reload yet
    for process in snapshot["processes"]:
        assert process["last_exit"] is None and process["state"] == "ready"
        assert isinstance(process["pid"], int) and isinstance(process["uptime"], float)
    assert "control: status" not in r.log  # polls are logged at debug only
    assert dcod(r.config, "reload").returncode == 0
    snapshot = status(r.config)
    rollout = snapshot["supervisor"]["rollout"]
    assert rollout["state"] == "done" and rollout["error"] is None and rollout["seconds"] > 0
    worker = next(p for p in snapshot["processes"] if p["name"] == "worker 1#0")
    assert worker["last_exit"]["returncode"] == 0 and worker["last_exit"]["replaced"] is True
    assert abs(worker["last_exit"]["time"] - rollout["started"]) < 60


async def test_status_exits_3_with_a_worker_left_down_and_says_so(run):
    r = run(ECHO + '[[proxy]]\nid = 2\ncommand = ["/bin/false"]\n', supervisor="restart_max = 2")
    await r.notification("READY=1")
    await wait_for(lambda: "leaving it down" in r.log, timeout=15)
    result = dcod(r.config, "status")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "DEGRADED: worker 2#0 failed" in result.stdout
    assert "exited with status 1 at " in result.stdout and "; left down after 2 failures" in result.stdout
    snapshot = status(r.config)
    assert snapshot["problems"] == ["worker 2#0 failed"]  # what the exit status 3 is for, as data
    down = next(p for p in snapshot["processes"] if p["name"] == "worker 2#0")
    assert (down["pid"], down["uptime"], down["rss"], down["cpu_percent"]) == (None, None, None, None)
    assert down["last_exit"]["returncode"] == 1 and down["last_exit"]["replaced"] is False


async def test_status_exits_3_with_an_instance_the_hub_cannot_reach(run):
    port = free_port()
    r = run(ECHO + f'[[proxy]]\nid = 2\naddress = "127.0.0.1:{port}"\n', supervisor="ready_timeout = 3")
    await r.notification("READY=1")  # after ready_timeout: the hub waits for proxy 2
    result = dcod(r.config, "status")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"DEGRADED: proxy 2 instance 2#0 (127.0.0.1:{port}) connecting" in result.stdout


async def test_status_exits_3_while_an_alert_backend_fails(run, tmp_path):
    r = run('[alert]\nbackends = ["command"]\ncommand = ["/bin/false"]\n' + ECHO)
    await r.notification("READY=1")
    assert dcod(r.config, "status").returncode == 0  # not tried yet: not failing
    [hub] = r.children_with(" hub")
    hub.kill()  # the quit alert is raised, and fails
    await wait_for(lambda: "command backend failed" in r.log, timeout=10)
    result = dcod(r.config, "status")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "DEGRADED: quit alert backend command failing: " in result.stdout
