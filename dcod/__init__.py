"""dcod: the Noradle DCO ext-hub, worker proxies and their supervisor, for systemd."""

__version__ = "0.1.0"
