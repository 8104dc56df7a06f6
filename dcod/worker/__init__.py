"""The worker runtime and its built-in handlers. Handler authors need only ``Request``."""

from dcod.worker.runtime import Request

__all__ = ["Request"]
