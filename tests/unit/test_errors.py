"""One root for the product's errors (outbox.errors): every error it defines descends from
``OutboxError``, and each one that callers caught as a builtin or a driver error still is one."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import uuid

import psycopg
import pydantic
import pytest
import sqlalchemy

import outbox
import processor
from outbox.errors import OutboxError
from processor.database import DatabaseUrl, connect

# What each error was before the root existed (or is documented as): it must stay one.
STILL = {
    outbox.InvalidArgumentError: ValueError,
    outbox.InvalidEventError: pydantic.ValidationError,
    outbox.UnknownStepError: ValueError,
    outbox.ArgumentTypeError: TypeError,
    outbox.VariantNotFoundError: LookupError,
    outbox.SubscriptionNotFoundError: LookupError,
    outbox.FencedError: RuntimeError,
    outbox.SubscriberBusyError: RuntimeError,
    outbox.LifecycleError: RuntimeError,
    outbox.StillRunningError: TimeoutError,
    processor.DatabaseUnavailableError: psycopg.OperationalError,
    processor.WebhookError: RuntimeError,
    processor.errors.InvalidPipelineError: ValueError,
    processor.errors.UnfoldableJobError: ValueError,
    processor.errors.UnknownStepError: ValueError,
    processor.errors.FoldConfigChangedError: RuntimeError,
}


def _defined_errors() -> list[type[BaseException]]:
    """Every exception class defined in a module of ``outbox`` or ``processor`` (all of them imported)."""
    found = []
    for package in (outbox, processor):
        for module_info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(module_info.name)
            for _, value in inspect.getmembers(module, inspect.isclass):
                if issubclass(value, BaseException) and value.__module__ == module.__name__:
                    found.append(value)
    return found


def test_every_error_the_product_defines_descends_from_the_root():
    errors = _defined_errors()
    assert len(errors) >= len(STILL)  # the walk found them (not vacuously true)
    assert [e.__qualname__ for e in errors if not issubclass(e, OutboxError)] == []
    # They live in the two errors modules; the modules that raise them import them from there.
    assert {e.__module__ for e in errors} == {"outbox.errors", "processor.errors"}


def test_the_tree_in_the_docstring_names_every_error():
    tree = outbox.errors.__doc__ or ""
    assert [e.__name__ for e in _defined_errors() if f" {e.__name__} " not in tree.replace("\n", " \n")] == []


@pytest.mark.parametrize(("error", "builtin"), STILL.items(), ids=lambda v: getattr(v, "__name__", ""))
def test_an_error_callers_caught_as_a_builtin_or_driver_error_still_is_one(error, builtin):
    assert issubclass(error, OutboxError)
    assert issubclass(error, builtin)


# Caught inside the processor, or a bug of the worker's: never raised to a caller, so not exported.
INTERNAL = {
    processor.errors.FoldConfigChangedError, processor.errors.InvalidPipelineError,
    processor.errors.UnfoldableJobError, processor.errors.UnknownStepError, processor.errors.TransitionError,
}  # fmt: skip


def test_the_public_errors_are_exported_by_both_packages():
    assert processor.OutboxError is outbox.OutboxError
    defined = _defined_errors()
    for package in (outbox, processor):
        exported = {getattr(package, name) for name in package.__all__}
        own = {error for error in defined if error.__module__ == f"{package.__name__}.errors"}
        assert own - INTERNAL - exported == set()


def test_old_import_paths_name_the_same_classes():
    from outbox.subscription import FencedError, SubscriberBusyError, SubscriptionNotFoundError
    from outbox.writer import UnknownStepError, VariantNotFoundError
    from processor.batch import FencedError as BatchFencedError
    from processor.fold import UnfoldableJobError
    from processor.worker import PartitionCountError

    assert (FencedError, SubscriberBusyError, SubscriptionNotFoundError) == (
        outbox.FencedError, outbox.SubscriberBusyError, outbox.SubscriptionNotFoundError,
    )  # fmt: skip
    assert (UnknownStepError, VariantNotFoundError) == (outbox.UnknownStepError, outbox.VariantNotFoundError)
    assert BatchFencedError is outbox.FencedError
    assert UnfoldableJobError is processor.errors.UnfoldableJobError
    assert PartitionCountError is processor.PartitionCountError


def test_except_outbox_error_catches_the_write_apis_refusals():
    # A real connection (SQLite in memory): each call is refused before its first statement.
    engine = sqlalchemy.create_engine("sqlite://")
    refusals = {
        "bad status": lambda c: outbox.update_variant(c, uuid.uuid4(), status="paused"),
        "bad hold status": lambda c: outbox.hold_job(c, uuid.uuid4(), status="paused", reason="support"),
        "no variants": lambda c: outbox.create_job(c, variants=0),
        "not a UUID": lambda c: outbox.update_variant(c, "not-a-uuid", status="running"),
        "wrong kind of connection": lambda c: outbox.create_job(engine),
    }
    caught = {}
    for what, call in refusals.items():
        with engine.begin() as conn:
            try:
                call(conn)
            except outbox.OutboxError as exc:
                caught[what] = exc
    assert {what: type(exc).__name__ for what, exc in caught.items()} == {
        "bad status": "InvalidEventError",
        "bad hold status": "InvalidArgumentError",
        "no variants": "InvalidArgumentError",
        "not a UUID": "InvalidArgumentError",
        "wrong kind of connection": "ArgumentTypeError",
    }
    # Worded as before the root: pydantic's own message for the event model, the enum's for a hold.
    bad_status = caught["bad status"]
    assert isinstance(bad_status, pydantic.ValidationError)
    assert bad_status.errors()[0]["loc"] == ("status",)
    assert "Input should be 'queued', 'running', 'done' or 'failed'" in str(bad_status)
    assert str(caught["bad hold status"]) == "'paused' is not a valid VariantStatus"
    assert str(caught["no variants"]) == "a job needs at least one variant (got 0)"


def test_the_event_models_refusal_keeps_pydantics_errors_and_message():
    step = "x" * 70_000
    with pytest.raises(pydantic.ValidationError) as plain:
        outbox.VariantChanged.model_validate({"status": "running", "step": step})
    with sqlalchemy.create_engine("sqlite://").begin() as conn, pytest.raises(outbox.InvalidEventError) as ours:
        outbox.update_variant(conn, uuid.uuid4(), status="running", step=step)
    assert str(ours.value) == str(plain.value)
    assert ours.value.errors() == plain.value.errors()


def test_except_outbox_error_catches_the_processors_refusals():
    with pytest.raises(outbox.OutboxError) as bad_settings:
        processor.WorkerService(database_url="postgresql://app:secret@127.0.0.1:1/app", batch_size=0)
    assert isinstance(bad_settings.value, processor.ConfigurationError)
    assert "OUTBOX_BATCH_SIZE" not in str(bad_settings.value) and "batch_size=" in str(bad_settings.value)
    with pytest.raises(outbox.OutboxError) as unknown:
        processor.WorkerService(database_url="postgresql://app:secret@127.0.0.1:1/app", batchsize=10)
    assert isinstance(unknown.value, TypeError)
    assert str(unknown.value) == "WorkerService() got unknown settings: batchsize (see processor.settings)"


def test_an_unreachable_database_is_an_outbox_error_and_still_an_operational_error():
    db = DatabaseUrl.parse("postgresql://app:s3cr3t-pw@127.0.0.1:1/app")  # nothing listens on port 1
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(db, application_name="test-errors", connect_timeout=2)
    assert isinstance(refused.value, processor.DatabaseUnavailableError)
    assert isinstance(refused.value, outbox.OutboxError)
    assert "s3cr3t-pw" not in str(refused.value)
    assert "connection failed" in str(refused.value)
