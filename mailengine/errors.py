"""Exceptions raised by mailengine. Each message says what to change."""


class Error(Exception):
    """Base class of every mailengine error."""


class ConfigError(Error):
    """The configuration is invalid; `key` names the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class StartError(Error):
    """The engine could not start (a port in use, an unreadable data directory...)."""


class QueueError(Error):
    """A queue operation failed (no such message, unreadable spool)."""
