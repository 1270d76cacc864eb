"""The project's domain exceptions, in one place.

Each names what was wrong so that a user can fix their input; none of them wraps a bug.
"""

from __future__ import annotations


class TreepoError(Exception):
    """Base class of every error this project raises on purpose."""


class MessageDecodeError(TreepoError, ValueError):
    """Bytes from the wire are not a valid message. ``field`` names the offending field;
    ``kind`` is the dead-letter reason (``decode``, or ``bad_token`` for a token id outside the
    vocabulary)."""

    def __init__(self, field: str, reason: str, kind: str = "decode") -> None:
        self.field = field
        self.reason = reason
        self.kind = kind
        super().__init__(f"{field}: {reason}")


class ConfigError(TreepoError, ValueError):
    """A setting (environment variable, config file or CLI flag) is invalid."""


class DatasetError(TreepoError, ValueError):
    """A dataset file or row is malformed; the message names file, row and field."""


class WeightVerificationError(TreepoError):
    """Downloaded weights do not match their manifest (size or sha256)."""


class WeightDownloadError(TreepoError):
    """Weights could not be fetched (server unreachable, timeout): worth retrying later, unlike a
    ``WeightVerificationError``."""


class TransportError(TreepoError):
    """Redis could not be reached after the bounded retries."""


class Stopping(TreepoError):
    """The process was asked to stop while waiting on Redis; raised instead of waiting on."""
