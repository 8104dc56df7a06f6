"""What every quit-alert backend is: the Backend class, its failure, and how it refuses a setting."""

from __future__ import annotations

import trio

from dcod.config import Config, ConfigError


class AlertFailed(Exception):
    """A backend could not raise the alert; the message is the reason, for the log and `dcod status`."""


class Backend:
    """One way of raising the alert, registered in dcod.supervisor.alert.BACKENDS under ``kind``.

    ``send`` raises on failure; the Alerter logs and counts it. Each backend owns its settings
    (the ``alert.*`` keys it reads): ``check`` refuses what is wrong with them, ``from_config``
    builds the backend from a configuration that passed ``check``.
    """

    kind = ""

    @classmethod
    def check(cls, config: Config, listed: bool) -> None:
        """Raise ConfigError for an invalid value of one of its settings; if ``listed`` in
        alert.backends, also for what it needs to run and lacks."""

    @classmethod
    def from_config(cls, config: Config) -> Backend:
        raise NotImplementedError

    async def send(self, message: str) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def invalid(config: Config, key: str, reason: str) -> ConfigError:
    """A refusal of a setting that names file, key and reason, as dcod.config's own do."""
    return ConfigError(f"{config.source}: {key}: {reason}")
