"""Errors the CLI reports as one clear line (the cause chain, never a traceback)."""


class OutboxError(Exception):
    """Base for errors with a message meant for the operator."""


class ConfigurationError(OutboxError):
    """A setting or argument is invalid."""


class SchemaError(OutboxError):
    """The database is not migrated, or holds something that contradicts the product's rules."""


class ConsumerBusyError(OutboxError):
    """Another worker holds the partition and this command will not wait for it."""
