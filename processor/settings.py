"""Settings, from OUTBOX_* environment variables or explicit values (the CLI's flags)."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from outbox.limits import PARTITIONS_MAX, PARTITIONS_MIN
from processor.database import DatabaseUrl
from processor.errors import ConfigurationError
from processor.fold import FailurePolicy, Pipeline

DEFAULT_PIPELINE_STEPS = ("ingest", "preprocess", "inference", "iou_eval")


class Wakeup(StrEnum):
    """How the worker learns that events were written (docs/design.md: "Waking up")."""

    POLL = "poll"  # it polls at its (adaptive) poll interval; writers pay nothing
    NOTIFY = "notify"  # it also LISTENs; writers NOTIFY once `outbox migrate --wakeup notify` ran


class Settings(BaseSettings):
    """Everything the processor, its CLI and the demo read from the environment."""

    model_config = SettingsConfigDict(env_prefix="OUTBOX_", extra="ignore", frozen=True)

    # None: use the embedded PostgreSQL (the `embedded` extra).
    database_url: SecretStr | None = None
    # The fold configuration lives in the database (processor/fold_config.py). Set here, it is what
    # `outbox migrate` installs the first time, and what every other command checks the database's
    # against (a mismatch stops the command with one line). None: the database's.
    # Comma-separated in OUTBOX_PIPELINE_STEPS; the last step is final.
    pipeline_steps: Annotated[tuple[str, ...] | None, NoDecode] = None
    failure_policy: FailurePolicy | None = None
    # Events per batch transaction: larger batches spread its fixed cost (about 3 ms: planning, the
    # round trips, the commit) over more events (bench/HISTORY.md, "Where the time goes").
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    # Adaptive polling: the worker polls at the minimum while events flow and doubles the wait up to
    # the maximum while idle.
    poll_interval_min: float = Field(default=0.005, gt=0, le=60)
    poll_interval_max: float = Field(default=0.25, gt=0, le=600)
    # notify: the worker also wakes up on the writers' NOTIFY (the poll interval stays the safety net).
    wakeup: Wakeup = Wakeup.POLL
    # How often a standby tries to take over the consumer lock.
    standby_interval: float = Field(default=1.0, gt=0, le=600)
    # The partition count the workers expect (docs/design.md: "Scaling out"); None: whatever the database
    # has (1 unless `outbox repartition` changed it). A worker whose count differs stops.
    partitions: int | None = Field(default=None, ge=PARTITIONS_MIN, le=PARTITIONS_MAX)
    # One partition only (the worker consumes just this one; operations act on just this one);
    # None: all of them (a worker takes its fair share).
    partition: int | None = Field(default=None, ge=0, le=PARTITIONS_MAX - 1)
    # Server-side limits on the worker's session: a statement running longer, or a session idle
    # (or idle in a transaction) longer, is ended by PostgreSQL. The idle limit is what lets a
    # standby take over from a worker that is stopped but whose connection stays up (a zombie).
    statement_timeout: float = Field(default=60, gt=0, le=86400)
    session_timeout: float = Field(default=30, gt=0, le=86400)
    # Set only behind a session-pooling proxy (PgBouncer pool_mode=session): the worker otherwise
    # refuses connections that do not reach the server directly (docs/design.md: "Connections and faults").
    allow_session_proxy: bool = False
    embedded_data_dir: Path | None = None
    # How long applied events and acknowledged job transitions are kept (90s, 30m, 12h, 7d, 2w): one
    # worker of the cluster removes older ones, by whole segments (processor/retention.py; `outbox
    # prune` does the same once). None ("off", or unset): they stay until `outbox prune`.
    retention: dt.timedelta | None = None

    @field_validator("retention", mode="before")
    @classmethod
    def _parse_retention(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() in ("", "off"):
                return None
            from processor.retention import parse_duration

            try:
                return parse_duration(value)
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("pipeline_steps", mode="before")
    @classmethod
    def _split_steps(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(step.strip() for step in value.split(","))
        return value

    @field_validator("pipeline_steps")
    @classmethod
    def _valid_pipeline(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            Pipeline(value)  # raises ValueError with the reason
        return value

    @field_validator("database_url")
    @classmethod
    def _valid_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            try:
                DatabaseUrl.parse(value.get_secret_value())
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
            return value
        return None

    @model_validator(mode="after")
    def _poll_bounds(self) -> Settings:
        if self.poll_interval_min > self.poll_interval_max:
            raise ValueError(
                f"OUTBOX_POLL_INTERVAL_MIN ({self.poll_interval_min:g}) must not exceed "
                f"OUTBOX_POLL_INTERVAL_MAX ({self.poll_interval_max:g})"
            )
        # The server ends a session idle longer than session_timeout: waits must stay well below it.
        for name in ("poll_interval_max", "standby_interval"):
            if getattr(self, name) >= self.session_timeout / 2:
                raise ValueError(
                    f"OUTBOX_{name.upper()} ({getattr(self, name):g}) must be less than half of "
                    f"OUTBOX_SESSION_TIMEOUT ({self.session_timeout:g} s)"
                )
        return self

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline this process was given (None: it takes the database's)."""
        return Pipeline(self.pipeline_steps) if self.pipeline_steps is not None else None

    def database(self) -> DatabaseUrl:
        """The configured database, or the embedded one (started on first use; needs the `embedded` extra)."""
        if self.database_url is not None:
            return DatabaseUrl.parse(self.database_url.get_secret_value())
        from processor.embedded import embedded_database_url

        return DatabaseUrl.parse(embedded_database_url(self.embedded_data_dir))


def load_settings(*, as_keywords: bool = False, **overrides: Any) -> Settings:
    """Settings from the environment, with explicit (non-None) overrides; errors as one line.

    ``as_keywords``: the overrides are a caller's keyword arguments (processor.WorkerService), and a
    problem with one of them is named ``name=``, not by its variable.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        keywords = set(given) if as_keywords else set()
        errors = exc.errors(include_url=False, include_input=False)
        problems = "; ".join(_problem(err, keywords) for err in errors)
        raise ConfigurationError(f"invalid settings: {problems}") from None


def _problem(err: Any, keywords: set[str]) -> str:
    """One setting's problem, named by its variable or keyword (a check across settings names them in its message)."""
    name = "_".join(str(part) for part in err["loc"])
    if not name:
        return _message(err)
    return f"{name}=: {_message(err)}" if name in keywords else f"OUTBOX_{name.upper()}: {_message(err)}"


def _message(err: Any) -> str:
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")
