"""mailengine: a mail engine for Python whose hot path is C."""
from .config import Config, Limits, Listener, User
from .engine import Engine
from .errors import ConfigError, Error, QueueError, StartError
from .hooks import Accept, Envelope, ReceivedEvent, Reject, Session, TempFail
from .queue import Queue, QueuedMessage

__version__ = "0.1.0"

__all__ = [
    "Accept", "Config", "ConfigError", "Engine", "Envelope", "Error", "Limits", "Listener",
    "Queue", "QueueError", "QueuedMessage", "ReceivedEvent", "Reject", "Session", "StartError",
    "TempFail", "User",
]
