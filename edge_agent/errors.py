"""Error types whose message is meant for a person: one readable line, no traceback.

Every failure the user can cause (a bad file, a bad config key, a model of the wrong kind, a
runtime that is not installed) raises an ``EdgeAgentError`` subclass; the CLI prints ``str(err)``
and exits non-zero, the daemon logs it and keeps serving what it can.
"""


class EdgeAgentError(Exception):
    """Base class: ``str(err)`` is a complete, single-line explanation."""

    exit_code = 2


class ModelError(EdgeAgentError):
    """The model file is missing, corrupt, of the wrong kind, or cannot run here."""


class RuntimeNotAvailable(EdgeAgentError):
    """The requested TFLite runtime (or delegate) is not installed or cannot be loaded."""


class InferenceError(EdgeAgentError):
    """``invoke()`` failed or timed out."""


class ConfigError(EdgeAgentError):
    """A config key is unknown or its value has the wrong type or range.

    ``errors``: every problem found in one pass, one line each naming its key (``config check``
    prints them all at once instead of one per run); ``str(err)`` joins them with newlines.
    """

    def __init__(self, message: str = "", errors: "tuple[str, ...] | list[str]" = ()) -> None:
        self.errors = list(errors) or [message]
        super().__init__("\n".join(self.errors))


class SourceError(EdgeAgentError):
    """A frame source cannot be opened or stopped delivering frames."""
