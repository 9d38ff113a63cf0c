"""The fold configuration (pipeline steps and failure policy), kept in the database.

Every worker and every operation folds with the configuration in ``outbox_fold_config``, so two
processes can never fold the same database two ways. ``outbox migrate`` sets it the first time;
``outbox pipeline set`` changes it, and in the same transaction (under every checkpoint's lock)
queues every job to be folded again and stamps the new version on every checkpoint, so that a
worker still holding the old one notices when it next locks its checkpoint
(processor.batch.FoldConfigChangedError) and reloads. A process whose own setting
(OUTBOX_PIPELINE_STEPS, OUTBOX_FAILURE_POLICY) disagrees with the database stops with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor import app_schema
from processor.errors import ConfigurationError, SchemaError
from processor.fold import FailurePolicy, Pipeline
from processor.store import Connection
from processor.store import migrations as schema_store
from processor.store.checkpoint import checkpoints_lock_all


@dataclass(frozen=True, slots=True)
class FoldConfig:
    pipeline: Pipeline
    policy: FailurePolicy
    version: int

    def describe(self) -> str:
        return f"pipeline {','.join(self.pipeline.steps)}, failure policy {self.policy.value}"


def load(conn: Connection) -> FoldConfig:
    """The database's fold configuration; a one-line error when `outbox migrate` has not set it."""
    row = schema_store.fold_config_get(conn)
    if row is None or row.pipeline_steps is None:
        raise SchemaError(
            "the database has no pipeline yet: run `outbox migrate` with OUTBOX_PIPELINE_STEPS set to your steps"
        )
    return FoldConfig(Pipeline(tuple(row.pipeline_steps)), FailurePolicy(row.failure_policy), row.version)


def check_setting(config: FoldConfig, steps: tuple[str, ...] | None, policy: FailurePolicy | None) -> None:
    """Refuse a process whose own setting differs from the database's (unset: the database's is used)."""
    if steps is not None and tuple(steps) != config.pipeline.steps:
        raise ConfigurationError(
            f"OUTBOX_PIPELINE_STEPS ({','.join(steps)}) differs from the database's pipeline "
            f"({','.join(config.pipeline.steps)}): change it with `outbox pipeline set {','.join(steps)}` "
            "(every job is folded again), or unset OUTBOX_PIPELINE_STEPS to use the database's"
        )
    if policy is not None and policy is not config.policy:
        raise ConfigurationError(
            f"OUTBOX_FAILURE_POLICY ({policy.value}) differs from the database's ({config.policy.value}): change it "
            f"with `outbox pipeline set --failure-policy {policy.value}` (every job is folded again), or unset "
            "OUTBOX_FAILURE_POLICY to use the database's"
        )


def steps_outside(conn: Connection, pipeline: Pipeline) -> list[tuple[str, int]]:
    """The steps jobs_variants uses that ``pipeline`` lacks, with how many variants use each."""
    return [(use.step, use.variants) for use in schema_store.variant_steps_used(conn) if use.step not in pipeline]


def describe_outside(outside: list[tuple[str, int]]) -> str:
    return ", ".join(f"{step!r} ({count} variant{'s' if count != 1 else ''})" for step, count in outside[:10])


def store_config(
    conn: Connection, pipeline: Pipeline, policy: FailurePolicy, *, refold: bool
) -> tuple[int | None, int]:
    """Write the configuration (the caller holds every checkpoint's lock); return (new version, jobs queued).

    The version is None when nothing changed. With ``refold``, every job is queued to be folded again.
    """
    written = schema_store.fold_config_set(conn, list(pipeline.steps), policy.value, refold=refold)
    return written.version, written.jobs_queued


@dataclass(frozen=True, slots=True)
class ConfigChange:
    before: FoldConfig
    after: FoldConfig
    jobs_queued: int  # to be folded again by the workers

    @property
    def changed(self) -> bool:
        return self.before.version != self.after.version


def change(conn: Connection, pipeline: Pipeline | None, policy: FailurePolicy | None) -> ConfigChange:
    """`outbox pipeline set`: change the configuration and queue every job to be folded again, atomically.

    Holds every checkpoint's lock (workers finish the batch in hand and wait; they notice the new
    version when they lock their checkpoint next). Refused, with nothing changed, when jobs_variants
    uses a step the new pipeline lacks: their jobs could not be folded.
    """
    with conn.transaction():
        checkpoints_lock_all(conn)
        before = load(conn)
        new_pipeline = pipeline or before.pipeline
        outside = steps_outside(conn, new_pipeline)
        if outside:
            raise ConfigurationError(
                f"jobs_variants uses steps that pipeline lacks: {describe_outside(outside)}; nothing was changed"
            )
        app_schema.check_values(conn, app_schema.columns(conn), new_pipeline)
        _, queued = store_config(conn, new_pipeline, policy or before.policy, refold=True)
        after = load(conn)
    return ConfigChange(before, after, queued)
