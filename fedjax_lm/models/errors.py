"""The one error type raised for unusable checkpoints and configs.

A `ValueError` subclass so callers that already catch bad input keep working, while tests and the
CLI can tell a loading problem (missing file, shape mismatch, ...) from a programming error.
"""


class ModelLoadError(ValueError):
    """A checkpoint or config cannot be turned into one of our encoders; the message says why."""
