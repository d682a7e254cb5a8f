"""The one exception type the data layer raises for bad input.

Users meet the data layer first (a wrong path, a misnamed column, a typo in a partitioner name).
A single `DataError` with a message naming the file / column / value lets the CLI print one
clear line instead of a traceback, while still being a `ValueError` for callers that catch that.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing data, or an invalid data-layer parameter; the message says what to fix."""
