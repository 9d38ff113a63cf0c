"""Errors the CLI reports as one clear line (the cause chain, never a traceback)."""


class OutboxError(Exception):
    """Base for errors with a message meant for the operator."""


class ConfigurationError(OutboxError):
    """A setting or argument is invalid."""


class SchemaError(OutboxError):
    """The database is not migrated, or holds something that contradicts the product's rules."""


class ConsumerBusyError(OutboxError):
    """Another worker holds the partition and this command will not wait for it."""


class PartitionMissingError(SchemaError):
    """A partition number at or beyond the database's partition count (README: "Scaling out")."""

    def __init__(self, partition: int) -> None:
        super().__init__(
            f"partition {partition} does not exist (no checkpoint): partitions are numbered from 0 to the "
            "count that `outbox repartition` set, see `outbox backlog`"
        )
        self.partition = partition
