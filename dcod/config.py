"""The configuration: TOML in, validated dataclasses out, and back to TOML.

Every refusal names the file, the key and the reason, so an operator can fix it
without reading code: ``/etc/dcod/dcod.toml: proxy[2].instances: must be >= 1, not 0``;
every refusal at once, one line each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

SYSTEM_CONFIG = Path("/etc/dcod/dcod.toml")
BUILTIN = "<built-in default>"


class ConfigError(Exception):
    """An invalid configuration: the message says file, key and reason, one line per error."""

    @property
    def errors(self) -> list[str]:
        return str(self).splitlines()


@dataclass(frozen=True)
class HubConfig:
    listen: str = "127.0.0.1:1523"
    advertise: str = "127.0.0.1:1523"
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_pdu: int = 16 * 1024 * 1024
    reply_timeout: float = 30.0
    queue_memory: int = 64 * 1024 * 1024
    spool_max: int = 1024 * 1024 * 1024
    spool_fsync_interval: float = 0.2
    max_connections: int = 4096
    max_inflight_per_session: int = 1024
    stall_timeout: float = 30.0
    poison_after: int = 3


@dataclass(frozen=True)
class SupervisorConfig:
    runtime_dir: str = ""
    state_dir: str = ""
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 3.0
    drain_timeout: float = 30.0
    stop_timeout: float = 10.0
    restart_max: int = 5
    restart_window: float = 60.0
    ready_timeout: float = 30.0
    control_group: str = "dcod"


@dataclass(frozen=True)
class AlertConfig:
    """Typed here; its values are checked by the alert backends that read them (dcod.supervisor.alert.check)."""

    name: str = "Noradle-DCO-EXTHUB-QUIT"
    backends: tuple[str, ...] = ("file",)
    dir: str = ""
    command: tuple[str, ...] = ()
    command_timeout: float = 10.0
    oracle_dsn: str = ""
    oracle_user: str = ""
    oracle_password_file: str = ""  # a path, or "credential:<name>" for $CREDENTIALS_DIRECTORY/<name>
    oracle_timeout: float = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # host:port of the Prometheus endpoint the supervisor serves; empty: none


@dataclass(frozen=True)
class ProxyConfig:
    id: int
    name: str = ""
    handler: str = ""  # built-in name or "package.module:function"
    handler_path: tuple[str, ...] = ()  # directories the handler's modules are imported from (absolute)
    address: str = ""  # an external worker proxy "host:port", not launched by dcod
    command: tuple[str, ...] = ()  # a worker in any language, launched with its socket
    instances: int = 1
    ordered: bool = False  # one session's requests always go to one instance
    concurrency: int = 64  # requests one instance handles at once

    @property
    def managed(self) -> bool:
        """Launched by dcod (a handler or a command), as opposed to external."""
        return not self.address


@dataclass(frozen=True)
class Config:
    hub: HubConfig = field(default_factory=HubConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    alert: AlertConfig = field(default_factory=AlertConfig)
    proxies: tuple[ProxyConfig, ...] = ()
    source: str = BUILTIN
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def proxy(self, proxy_id: int) -> ProxyConfig:
        for p in self.proxies:
            if p.id == proxy_id:
                return p
        raise KeyError(proxy_id)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.supervisor.runtime_dir or _default_dir("RUNTIME_DIRECTORY", _user_runtime()))

    @property
    def state_dir(self) -> Path:
        return Path(self.supervisor.state_dir or _default_dir("STATE_DIRECTORY", _user_state()))

    @property
    def alert_dir(self) -> Path:
        return Path(self.alert.dir) if self.alert.dir else self.runtime_dir / "alerts"

    @property
    def alert_file(self) -> Path:
        return self.alert_dir / self.alert.name

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    def worker_socket(self, proxy_id: int, instance: int) -> Path:
        return self.runtime_dir / f"worker-{proxy_id}-{instance}.sock"

    def worker_addresses(self, proxy: ProxyConfig) -> list[str]:
        """Where the hub connects for each instance of a proxy."""
        if proxy.address:
            return [proxy.address]
        return [str(self.worker_socket(proxy.id, i)) for i in range(proxy.instances)]


def _default_dir(systemd_var: str, user_dir: str) -> str:
    """The directory systemd made for the service (RuntimeDirectory=/StateDirectory=, which may
    list several, colon-separated), else one of the user's own: for root too, so that a `dcod run`
    in a terminal never takes the packaged service's /run/dcod and /var/lib/dcod."""
    if os.environ.get(systemd_var):
        return os.environ[systemd_var].split(":")[0]
    return user_dir


ALERT_MESSAGE_MAX = 30  # bytes: Noradle's PL/SQL (k_ext_call) keeps the quit alert's message in a VARCHAR2(30)


def _user_runtime() -> str:
    # Without $XDG_RUNTIME_DIR (sudo, su, a container): under the state directory, never a
    # predictable name in a directory that others may write to, such as /tmp.
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "dcod")
    return os.path.join(_user_state(), "run")


def _user_state() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "dcod")


# ---------------------------------------------------------------- loading


def config_path(explicit: str | None = None) -> Path | None:
    """--config FILE, else $DCOD_CONFIG, else /etc/dcod/dcod.toml when it exists, else None (built-in)."""
    if explicit:
        return Path(explicit)
    if os.environ.get("DCOD_CONFIG"):
        return Path(os.environ["DCOD_CONFIG"])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def default_text() -> str:
    return resources.files("dcod").joinpath("default.toml").read_text()


def load(path: str | Path | None = None) -> Config:
    """Load and validate a config file (None: the built-in default). Raises ConfigError."""
    if path is None:
        return parse(default_text(), BUILTIN)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: str, source: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return _Validator(source).config(data)


def dump(config: Config) -> str:
    """The config as TOML (defaults made explicit): what `dcod config` prints."""
    sections: dict[str, Any] = {
        "hub": dataclasses.asdict(config.hub),
        "supervisor": {
            **dataclasses.asdict(config.supervisor),
            "runtime_dir": str(config.runtime_dir),
            "state_dir": str(config.state_dir),
        },
        "alert": {**dataclasses.asdict(config.alert), "dir": str(config.alert_dir)},
        "metrics": dataclasses.asdict(config.metrics),
    }
    # Proxies as [[proxy]] tables, as people write them (tomli-w would inline the array).
    proxies = [{k: v for k, v in dataclasses.asdict(p).items() if v not in ("", ())} for p in config.proxies]
    return tomli_w.dumps(sections) + "".join(f"\n[[proxy]]\n{tomli_w.dumps(p)}" for p in proxies)


class _Validator:
    """Turns parsed TOML into a Config, naming file and key in every error, and reporting them all.

    A value that fails is noted (note(), or fail() raised inside collecting()) and validation
    goes on without it; the ConfigError at the end lists every one.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {reason}")

    def note(self, key: str, reason: str) -> None:
        self.errors.append(str(self.fail(key, reason)))

    @contextlib.contextmanager
    def collecting(self):
        """A fail() raised in the block is noted; validation goes on after the block."""
        try:
            yield
        except ConfigError as e:
            self.errors.append(str(e))

    def config(self, data: dict[str, Any]) -> Config:
        if not data:
            self.note("proxy", "missing: the file has no settings (without a file, dcod runs its built-in default)")
        self.unknown(data, "", {"hub", "supervisor", "alert", "metrics", "proxy"})
        hub = self.section(data, "hub", HubConfig)
        supervisor = self.section(data, "supervisor", SupervisorConfig)
        alert = self.section(data, "alert", AlertConfig)
        raw_proxies = data.get("proxy", [])
        if not isinstance(raw_proxies, list):
            self.note("proxy", "must be an array of tables ([[proxy]])")
            raw_proxies = []
        proxies = {i: p for i, table in enumerate(raw_proxies) if (p := self.proxy(i, table)) is not None}
        self.check(hub, supervisor, proxies)
        metrics = self.metrics(data)
        if self.errors:
            raise ConfigError("\n".join(self.errors))
        return Config(hub, supervisor, alert, tuple(proxies.values()), self.source, metrics)

    def unknown(self, table: dict[str, Any], prefix: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                self.note(prefix + key, f"unknown key (known: {', '.join(sorted(known))})")

    def section(self, data: dict[str, Any], name: str, cls: type) -> Any:
        table = data.get(name, {})
        if not isinstance(table, dict):
            self.note(name, "must be a table")
            table = {}
        return cls(**self.values(cls, table, name + "."))

    def values(self, cls: type, table: dict[str, Any], prefix: str) -> dict[str, Any]:
        """The table's valid values for the fields of ``cls``; the others are noted and left out."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        self.unknown(table, prefix, set(fields))
        values = {}
        for name in fields:
            if name in table:
                with self.collecting():
                    values[name] = self.typed(prefix + name, table[name], fields[name].type)
        return values

    def typed(self, key: str, value: Any, annotation: str) -> Any:
        """Check a value against the field's annotation (a string, with postponed annotations)."""
        if annotation == "bool":
            if not isinstance(value, bool):
                raise self.fail(key, f"must be true or false, not {value!r}")
            return value
        if annotation == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, f"must be an integer, not {value!r}")
            return value
        if annotation == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(key, f"must be a number, not {value!r}")
            return float(value)
        if annotation == "str":
            if not isinstance(value, str):
                raise self.fail(key, f"must be a string, not {value!r}")
            return value
        if annotation == "tuple[str, ...]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(key, f"must be a list of strings, not {value!r}")
            return tuple(value)
        raise AssertionError(f"no validation for {annotation}")

    def proxy(self, index: int, table: Any) -> ProxyConfig | None:
        prefix = f"proxy[{index}]."
        if not isinstance(table, dict):
            self.note(prefix[:-1], "must be a table")
            return None
        if "id" not in table:
            self.note(prefix + "id", "missing")
        values = self.values(ProxyConfig, table, prefix)
        if "id" not in values:
            return None
        proxy = ProxyConfig(**values)
        if proxy.id < 1:
            self.note(prefix + "id", f"must be >= 1, not {proxy.id}")
        kinds = [k for k in ("handler", "address", "command") if getattr(proxy, k)]
        if len(kinds) != 1:
            self.note(prefix[:-1], f"needs exactly one of handler, address, command (has {kinds or 'none'})")
        if proxy.instances < 1:
            self.note(prefix + "instances", f"must be >= 1, not {proxy.instances}")
        if proxy.address and proxy.instances != 1:
            self.note(prefix + "instances", "an external proxy (address) is one instance; list it once per address")
        if proxy.address:
            self.address(prefix + "address", proxy.address)
        if proxy.handler_path and not proxy.handler:
            self.note(prefix + "handler_path", "is for a handler; this proxy has none")
        for directory in proxy.handler_path:
            if not os.path.isabs(directory):
                self.note(
                    prefix + "handler_path",
                    f"must be absolute paths (the workers run in no particular directory), not {directory!r}",
                )
        if proxy.concurrency < 1:
            self.note(prefix + "concurrency", f"must be >= 1, not {proxy.concurrency}")
        return proxy if proxy.name else dataclasses.replace(proxy, name=proxy.handler or f"proxy{proxy.id}")

    def metrics(self, data: dict[str, Any]) -> MetricsConfig:
        metrics = self.section(data, "metrics", MetricsConfig)
        if metrics.listen:
            self.address("metrics.listen", metrics.listen)
            if "/" in metrics.listen:  # a Unix socket path to dcod.net.sockets; Prometheus scrapes TCP
                self.note("metrics.listen", f"must be host:port, not {metrics.listen!r}")
        return metrics

    def address(self, key: str, value: str) -> None:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.note(key, f"must be host:port, not {value!r}")

    def check(self, hub: HubConfig, sup: SupervisorConfig, proxies: dict[int, ProxyConfig]) -> None:
        """What involves several keys, or checks a value beyond its type; ``proxies`` by their index in the file."""
        self.address("hub.listen", hub.listen)
        self.address("hub.advertise", hub.advertise)
        if len(hub.advertise.encode()) > ALERT_MESSAGE_MAX:
            self.note(
                "hub.advertise",
                f"must be at most {ALERT_MESSAGE_MAX} bytes, not "
                f"{len(hub.advertise.encode())} ({hub.advertise!r}): Noradle's PL/SQL keeps the quit "
                f"alert's message in a VARCHAR2({ALERT_MESSAGE_MAX}) and fails on a longer one",
            )
        for net in hub.allow:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                self.note("hub.allow", f"{net!r} is not a network (like 10.0.0.0/8)")
        if hub.poison_after < 2:
            self.note("hub.poison_after", f"must be >= 2 (the last delivery goes alone), not {hub.poison_after}")
        if hub.max_pdu < 12:
            self.note("hub.max_pdu", f"must be >= 12, not {hub.max_pdu}")
        for key in ("reply_timeout", "spool_fsync_interval"):
            if getattr(hub, key) < 0:
                self.note(f"hub.{key}", "must not be negative")
        for key in ("max_connections", "max_inflight_per_session", "stall_timeout"):
            if getattr(hub, key) <= 0:
                self.note(f"hub.{key}", f"must be > 0, not {getattr(hub, key)}")
        for key in (
            "heartbeat_interval",
            "heartbeat_timeout",
            "drain_timeout",
            "stop_timeout",
            "restart_max",
            "restart_window",
            "ready_timeout",
        ):
            if getattr(sup, key) <= 0:
                self.note(f"supervisor.{key}", "must be > 0")
        if sup.heartbeat_timeout <= sup.heartbeat_interval:
            self.note("supervisor.heartbeat_timeout", "must be longer than heartbeat_interval")
        seen: dict[int, int] = {}
        for i, p in proxies.items():
            if p.id in seen:
                self.note(f"proxy[{i}].id", f"{p.id} is already proxy[{seen[p.id]}]")
            seen.setdefault(p.id, i)
