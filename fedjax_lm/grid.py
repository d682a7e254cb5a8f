"""What every experiment driver shares about its config: the error a user can fix, and the
fields marked with `execution_field` (where, how or under what name a run executes, never what
it computes), which may differ when a run is resumed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_EXECUTION = "execution"  # the field-metadata key `execution_field` sets


class ConfigError(ValueError):
    """A config that cannot run: bad file, unknown key, wrong type or impossible value."""


def execution_field(default: Any, **kwargs: Any) -> Any:
    """A dataclass field that may differ between a run and its resumption: it says where, how
    or under what name the run executes, never what it computes."""
    return dataclasses.field(default=default, metadata={_EXECUTION: True}, **kwargs)


def execution_fields(cls: Any) -> frozenset[str]:
    """Names of the fields of dataclass `cls` (or of its instance) marked `execution_field`."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get(_EXECUTION))
