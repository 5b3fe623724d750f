"""mailengine: a mail engine for Python whose hot path is C."""
from .config import Config, DkimKey, Limits, Listener, Policy, Relay, User
from .delivery import DeliveryEvent, SendError
from .engine import Engine
from .errors import ConfigError, Error, QueueError, StartError
from .hooks import Accept, Envelope, ReceivedEvent, Reject, Session, TempFail
from .queue import Queue, QueuedMessage
from .storage import MemoryStore, QuotaExceeded, Store, StoredMessage

__version__ = "0.1.0"

__all__ = [
    "Accept", "Config", "ConfigError", "DeliveryEvent", "DkimKey", "Engine", "Envelope", "Error",
    "Limits", "Listener", "MemoryStore", "Policy", "Queue", "QueueError", "QueuedMessage",
    "QuotaExceeded", "ReceivedEvent", "Reject", "Relay", "SendError", "Session", "StartError",
    "Store", "StoredMessage", "TempFail", "User",
]
