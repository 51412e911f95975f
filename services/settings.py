"""The settings of a process: every package's sections composed into one, read from the
environment here and nowhere else.

Each section is declared next to the components that use it (bus/config.py, bus/priorities.py,
kv_store/config.py, inference/config.py, edge/config.py, and `StackConfig` below for what only
the processes and commands use). Every field has exactly one environment variable, named after
it (`GROKSTACK_<FIELD>`; NATS_URL and REDIS_URL keep their conventional names), and one CLI
flag (`--<field>`). Field names are unique across sections, so a name alone says where a value
goes. Values are validated by pydantic at load: a bad enum or an out-of-range number stops the
process at once, naming the variable and what it allows (vLLM's own VLLM_* variables are derived
in inference/profiles.py, its logging ones in services/logs.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bus.config import BusConfig
from bus.priorities import PriorityConfig
from bus.section import Section
from edge.config import EdgeConfig
from inference.config import BUNDLED_MODEL_NAME, EngineConfig, ModelConfig, SpecConfig, WorkerConfig
from kv_store.config import KvConfig

__all__ = ["ENV", "Settings", "SettingsError", "StackConfig", "describe", "from_env"]


class StackConfig(Section):
    """What the processes and commands themselves use: where their data lives, how `grokstack up`
    serves, and how they log."""

    data_dir: Path = Path(".data")
    # How `grokstack up` serves: "disaggregated" runs a prefill and a decode worker, the KV
    # handed over through Redis (the design for separate GPU pools); "aggregated" runs one
    # worker whose engine does both (better when they would share the same cores).
    serving_mode: Literal["disaggregated", "aggregated"] = "disaggregated"
    redis_maxmemory: Annotated[str, Field(pattern=r"^[0-9]+[kmgKMG]?[bB]?$")] = "2gb"  # embedded server only
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "console"] = "json"
    # Where each process sends its spans (OTLP over HTTP, e.g. http://otel-collector:4318/v1/traces);
    # "" sends none, and tracing costs next to nothing (bus/tracing.py). vLLM's own spans: the
    # engine argument --otlp-traces-endpoint (GROKSTACK_ENGINE_ARGS).
    otlp_traces_endpoint: str = ""
    # `grokstack up` with several regions ("eu,us"): each its own JetStream domain, transit
    # server, Redis, edge and aggregated worker (services/regions.py); "" is one region.
    regions: Annotated[str, Field(pattern=r"^([A-Za-z0-9_-]{1,64}(,[A-Za-z0-9_-]{1,64})*)?$")] = ""
    wan_delay_ms: Annotated[float, Field(ge=0, le=10_000)] = 0.0  # added one way between those regions
    # Set by `grokstack up` for each process it runs: a JSON file where the process writes the
    # ports it bound (its metrics port: 0 lets it take a free one), so none is picked in advance.
    ports_file: str = ""

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value  # INFO, as logging spells it, too


SECTIONS: dict[str, type[Section]] = {
    "bus": BusConfig, "priorities": PriorityConfig, "kv": KvConfig, "served": ModelConfig,
    "engine": EngineConfig, "spec": SpecConfig, "worker": WorkerConfig, "edge": EdgeConfig,
    "stack": StackConfig,
}
# field name -> the section that holds it
SECTION_OF: dict[str, str] = {}
for _section, _kind in SECTIONS.items():
    for _field in _kind.model_fields:
        assert _field not in SECTION_OF, f"setting {_field!r} is declared in two sections"
        SECTION_OF[_field] = _section

# field name -> its environment variable
ENV: dict[str, str] = {
    name: {"nats_url": "NATS_URL", "redis_url": "REDIS_URL"}.get(name, f"GROKSTACK_{name.upper()}")
    for name in SECTION_OF
}


class SettingsError(ValueError):
    """A setting that does not validate; the message names its environment variable."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bus: BusConfig = BusConfig()
    priorities: PriorityConfig = PriorityConfig()
    kv: KvConfig = KvConfig()
    served: ModelConfig = ModelConfig()  # the model the stack serves
    engine: EngineConfig = EngineConfig()
    spec: SpecConfig = SpecConfig()
    worker: WorkerConfig = WorkerConfig()
    edge: EdgeConfig = EdgeConfig()
    stack: StackConfig = StackConfig()

    @model_validator(mode="before")
    @classmethod
    def _by_field_name(cls, data: Any) -> Any:
        """Flat keyword arguments (`Settings(edge_port=0)`) go to the section that holds them."""
        if not isinstance(data, dict):
            return data
        nested: dict[str, Any] = {}
        for key, value in data.items():
            if key in SECTIONS:
                nested.setdefault(key, {}).update(
                    value.model_dump() if isinstance(value, Section) else dict(value))
            elif key in SECTION_OF:
                nested.setdefault(SECTION_OF[key], {})[key] = value
            else:
                raise ValueError(f"unknown setting {key!r}")
        return nested

    @model_validator(mode="after")
    def _fill_in(self) -> "Settings":
        """Defaults that depend on other sections: the bundled model and the embedded server's
        logins live in the data directory."""
        if not self.served.model:
            bundled = str(bundled_model_dir(self.stack.data_dir))
            object.__setattr__(self, "served", self.served.replace(model=bundled))
        if not self.bus.secret_file:
            object.__setattr__(self, "bus", self.bus.replace(secret_file=str(secret_path(self.stack.data_dir))))
        embedded = embedded_logins(self.stack.data_dir)
        if not self.bus.nats_credentials and embedded.exists():
            object.__setattr__(self, "bus", self.bus.replace(nats_credentials=str(embedded)))
        return self

    def replace(self, **changes: Any) -> "Settings":
        """A copy with `changes` (field names or whole sections), validated; values that are
        None are ignored (unset CLI flags)."""
        merged = {name: section.model_dump() for name, section in self._sections()}
        for key, value in changes.items():
            if value is None:
                continue
            if key in SECTIONS:
                merged[key] = value.model_dump() if isinstance(value, Section) else dict(value)
            elif key in SECTION_OF:
                merged[SECTION_OF[key]][key] = value
            else:
                raise ValueError(f"unknown setting {key!r}")
        if changes.get("data_dir") is not None:  # what was filled in from the old one follows it
            if self.uses_bundled_model and changes.get("model") is None:
                merged["served"]["model"] = ""
            if (merged["bus"]["secret_file"] == str(secret_path(self.stack.data_dir))
                    and changes.get("secret_file") is None):
                merged["bus"]["secret_file"] = ""
            if (merged["bus"]["nats_credentials"] == str(embedded_logins(self.stack.data_dir))
                    and changes.get("nats_credentials") is None):
                merged["bus"]["nats_credentials"] = ""
        return Settings.model_validate(merged)

    def _sections(self) -> list[tuple[str, Section]]:
        return [(name, getattr(self, name)) for name in SECTIONS]

    @property
    def uses_bundled_model(self) -> bool:
        return Path(self.served.model) == bundled_model_dir(self.stack.data_dir)


def bundled_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / BUNDLED_MODEL_NAME


def secret_path(data_dir: Path) -> Path:
    """The stack's signing secret when GROKSTACK_SECRET_FILE does not name one (bus/signing.py)."""
    return data_dir / "secret"


def embedded_logins(data_dir: Path) -> Path:
    """Where the embedded nats-server of `grokstack up` writes the role logins (services/embedded.py)."""
    return data_dir / "nats" / "credentials.json"


def _explain(exc: ValidationError, given: Mapping[str, object]) -> str:
    """One line per bad value, named by its environment variable (and flag)."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        name = next((part for part in reversed(loc) if part in SECTION_OF), None)
        if name is None:  # a check across fields of a section: name the variables it speaks of
            message = re.sub(r"\b[a-z_]+\b", lambda m: ENV.get(m.group(0), m.group(0)), error["msg"])
            lines.append(f"{' '.join(loc) or 'settings'}: {message}")
            continue
        shown = f" (got {given[name]!r})" if name in given else ""
        lines.append(f"{ENV[name]} (--{name.replace('_', '-')}): {error['msg']}{shown}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load(values: Mapping[str, object]) -> Settings:
    """Settings from flat field values (strings from the environment or typed CLI values)."""
    try:
        return Settings.model_validate(dict(values))
    except ValidationError as exc:
        raise SettingsError(_explain(exc, values)) from None


def env_values(environ: Mapping[str, str]) -> dict[str, str]:
    """The fields the environment sets (an empty variable counts as unset)."""
    return {name: environ[var] for name, var in ENV.items() if environ.get(var)}


def from_env(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """The process's settings: the environment, then `overrides` (CLI flags; None: not given)."""
    import os
    values: dict[str, object] = env_values(os.environ if environ is None else environ)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return load(values)


def describe() -> list[tuple[str, str, str]]:
    """(variable, field, default) rows for `grokstack settings` and the README."""
    rows = []
    for kind in SECTIONS.values():
        for name, field in kind.model_fields.items():
            rows.append((ENV[name], name, repr(field.default)))
    return rows


def environment_of(settings: Settings) -> dict[str, str]:
    """Every field as its environment variable: how a supervisor hands its effective settings
    down to the processes it starts (the one way processes read them)."""
    out = {}
    for _, section in settings._sections():
        for name, value in section.model_dump().items():
            out[ENV[name]] = str(value)
    return out
