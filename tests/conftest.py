"""Shared fixtures: a config in a private directory, an in-process hub on real sockets."""

from __future__ import annotations

import contextlib
import os
import textwrap
from pathlib import Path

import psutil
import pytest
import trio

from dcod import config as configuration
from dcod.bench.target import free_port
from dcod.hub.server import Hub
from dcod.net import sockets
from runs import ECHO, Run


def let_others_reach(*paths: Path) -> None:
    """Let any user traverse every directory above each path (a checkout or a pytest directory in
    a private place), so that a test may run something there as another user (setpriv)."""
    for path in paths:
        for parent in Path(path).parents:
            if parent == parent.parent:
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o001)


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(proxies_toml, **hub_keys) -> Config with runtime/state dirs under tmp_path (or
    ``directory``, for a second service in the same test)."""

    def make(
        proxies: str = "", *, supervisor: str = "", state_dir: Path | None = None, directory: Path | None = None, **hub
    ) -> configuration.Config:
        base = directory or tmp_path
        port = free_port()
        hub_lines = "\n".join(
            f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}" for k, v in hub.items()
        )
        text = textwrap.dedent(f"""\
            [hub]
            listen = "127.0.0.1:{port}"
            advertise = "127.0.0.1:{port}"
            {hub_lines}
            [supervisor]
            runtime_dir = "{base / "run"}"
            state_dir = "{state_dir or base / "state"}"
            {supervisor}
            """) + textwrap.dedent(proxies)
        (base / "run").mkdir(parents=True, exist_ok=True)
        path = base / "dcod.toml"
        path.write_text(text)
        return configuration.load(path)

    return make


@pytest.fixture
def start_hub(nursery):
    """await start_hub(config) -> (hub, "host:port"): a hub serving in the test's nursery."""

    async def start(config: configuration.Config) -> tuple[Hub, str]:
        listener = sockets.bind("127.0.0.1:0")
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        hub = Hub(config)
        await nursery.start(hub.run, [listener])
        return hub, address

    return start


async def wait_for(predicate, timeout: float = 5.0) -> None:
    """Wait until predicate() holds, checking after each scheduler pass (for state the hub
    changes without emitting an event, such as a counter); fails the test at the timeout."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


@pytest.fixture
def run(make_config, tmp_path):
    """run(proxies_toml, listen_socket=None, **make_config_keys) -> a started `dcod run` (Run); killed at the end.

    ``config`` runs that configuration instead; ``how`` passes Run's keyword arguments (command, cwd, env)."""
    runs = []

    def start(proxies=ECHO, listen_socket=None, *, config=None, how: dict | None = None, **kw):
        runs.append(Run(config or make_config(proxies, **kw), tmp_path, listen_socket, **(how or {})))
        return runs[-1]

    yield start
    for r in runs:
        # Its children too: a worker that ignores SIGTERM would outlive the test (under
        # systemd, the service's control group is killed as a whole).
        try:
            children = psutil.Process(r.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        r.proc.kill()
        r.proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
