"""The base of every configuration section, in every package.

Each package declares the settings of its components next to them (`bus/config.py`,
`bus/priorities.py`, `kv_store/config.py`, `inference/config.py`, `edge/config.py`), as vLLM
composes `CacheConfig`, `SchedulerConfig`, ... into one `VllmConfig`. `services/settings.py`
composes them into the one `Settings` of a process, reads the environment once (one variable per
field, named after it) and validates everything at load, so a bad value stops the process at once
with the variable's name and the allowed values. Components receive only the sections they use.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

# A value that ends up inside subject names: no separators, no wildcards.
SubjectToken = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Seconds = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0: a free port, picked at start
Count = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]  # a part of a whole


def redact_url(url: str) -> str:
    """`redis://grokstack:secret@host:6379/0` -> `redis://grokstack:***@host:6379/0`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class Section(BaseModel):
    """One concern's settings: immutable, validated, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def replace(self, **changes: Any) -> "Section":
        """A copy with `changes`, validated like a fresh load."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def __repr_args__(self):  # passwords in URLs stay out of tracebacks and test reports
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name and name.endswith("_url") and isinstance(value, str) else value
