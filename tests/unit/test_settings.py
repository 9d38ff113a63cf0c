"""Settings and URLs: clear errors for bad values, passwords never echoed."""

from __future__ import annotations

import pytest

from processor.database import DatabaseUrl, redact
from processor.errors import ConfigurationError
from processor.settings import load_settings


def test_pipeline_steps_are_comma_separated(monkeypatch):
    monkeypatch.setenv("OUTBOX_PIPELINE_STEPS", " a, b ,iou_eval")
    assert load_settings().pipeline_steps == ("a", "b", "iou_eval")


@pytest.mark.parametrize(("raw", "message"), [("", "non-empty"), ("a,b,a", "repeated: a"), ("a,,b", "non-empty")])
def test_bad_pipelines_are_one_clear_error(monkeypatch, raw, message):
    monkeypatch.setenv("OUTBOX_PIPELINE_STEPS", raw)
    with pytest.raises(ConfigurationError, match=f"OUTBOX_PIPELINE_STEPS: .*{message}"):
        load_settings()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "OUTBOX_BATCH_SIZE"),
        ({"poll_interval_min": -1}, "OUTBOX_POLL_INTERVAL_MIN"),
        ({"failure_policy": "sometimes"}, "OUTBOX_FAILURE_POLICY"),
        ({"database_url": "mysql://u:secret@h/db"}, "scheme 'mysql' is not supported"),
    ],
)
def test_bad_settings_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        load_settings(**overrides)
    assert "secret" not in str(info.value)


def test_both_url_forms_are_accepted_and_the_password_is_hidden():
    plain = DatabaseUrl.parse("postgresql://app:p%40ss%23w%3Ad%2F@db.example:5433/jobs")
    driver = DatabaseUrl.parse("postgresql+psycopg://app:p%40ss%23w%3Ad%2F@db.example:5433/jobs")
    assert plain.connect_kwargs() == driver.connect_kwargs()
    assert plain.connect_kwargs()["password"] == "p@ss#w:d/"
    assert "p@ss" not in plain.redacted() and "p%40ss" not in plain.redacted()
    assert redact("auth failed for p@ss#w:d/ and p%40ss%23w%3Ad%2F", plain) == "auth failed for *** and ***"


@pytest.mark.parametrize("driver", ["", "+psycopg", "+psycopg_async", "+asyncpg", "+psycopg2", "+pg8000"])
def test_the_url_the_application_has_is_accepted_whatever_driver_it_names(driver):
    url = DatabaseUrl.parse(f"postgresql{driver}://app:secret@db.example:5433/jobs?connect_timeout=5")
    assert url.connect_kwargs() == {
        "host": "db.example", "port": 5433, "user": "app", "password": "secret", "dbname": "jobs",
        "connect_timeout": "5",
    }  # fmt: skip
    assert url.sqlalchemy().drivername == "postgresql+psycopg"  # the product's own connections


def test_another_drivers_parameters_are_translated_or_left_out_and_unknown_ones_refused():
    url = DatabaseUrl.parse("postgresql+asyncpg://app:secret@db/jobs?ssl=require&prepared_statement_cache_size=0")
    assert url.connect_kwargs()["sslmode"] == "require"
    assert "prepared_statement_cache_size" not in url.redacted()
    assert DatabaseUrl.parse("postgresql+asyncpg://db/jobs?ssl=true").connect_kwargs()["sslmode"] == "require"
    with pytest.raises(ConfigurationError, match="'sslmod' is not a libpq connection parameter") as info:
        DatabaseUrl.parse("postgresql://app:secret@db/jobs?sslmod=require")
    assert "secret" not in str(info.value)


def test_several_hosts_and_socket_directories_read_as_libpq_reads_them():
    several = DatabaseUrl.parse("postgresql+asyncpg://app:secret@/jobs?host=h1:5432&host=h2:5433&host=h3")
    assert (several.connect_kwargs()["host"], several.connect_kwargs()["port"]) == ("h1,h2,h3", "5432,5433,")
    encoded = DatabaseUrl.parse("postgresql://app:secret@%2Fvar%2Frun%2Fpostgresql/jobs")
    assert encoded.connect_kwargs()["host"] == "/var/run/postgresql"
    with pytest.raises(ConfigurationError, match=r"\?host=h1:5432&host=h2:5432"):
        DatabaseUrl.parse("postgresql://app:secret@h1:5432,h2:5433/jobs")


def test_an_unencoded_at_sign_in_the_password_is_refused_without_showing_any_of_it():
    with pytest.raises(ConfigurationError, match="percent-encode it") as info:
        DatabaseUrl.parse("postgresql://app:Pa@ssWord9@db/jobs")
    assert "ssWord9" not in str(info.value) and "Pa" not in str(info.value).replace("password", "")


def test_a_non_url_is_refused_without_echoing_it():
    with pytest.raises(ConfigurationError) as info:
        DatabaseUrl.parse("not a url with secret")
    assert "secret" not in str(info.value)


def test_an_empty_password_is_not_shown_as_a_hidden_one():
    assert DatabaseUrl.parse("postgresql://postgres:@/postgres?host=/tmp/pg").redacted() == (
        "postgresql+psycopg://postgres@/postgres?host=%2Ftmp%2Fpg"
    )


def test_a_password_given_as_a_query_parameter_is_hidden_too():
    url = DatabaseUrl.parse("postgresql://app@db:5432/jobs?password=TopS3cret&sslmode=require")
    assert url.password == "TopS3cret"
    assert "TopS3cret" not in url.redacted() and "sslmode=require" in url.redacted()
    assert redact("failed for TopS3cret", url) == "failed for ***"


def test_waits_must_stay_below_the_session_timeout():
    with pytest.raises(ConfigurationError) as info:
        load_settings(session_timeout=2, standby_interval=1.5)
    assert str(info.value) == (
        "invalid settings: OUTBOX_STANDBY_INTERVAL (1.5) must be less than half of OUTBOX_SESSION_TIMEOUT (2 s)"
    )
