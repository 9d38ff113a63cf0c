"""docker-compose.yml stays consistent with the CLI and the settings (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from typer.main import get_command

from processor.cli import app
from processor.settings import Settings

ROOT = Path(__file__).parents[2]
CLI_ENV = {"OUTBOX_LOG_LEVEL"}  # read by the CLI itself, not by Settings


def compose() -> dict:
    """The file as docker compose reads it with nothing set in the shell (``${X:-default}`` gives the default)."""
    text = (ROOT / "docker-compose.yml").read_text()
    return yaml.safe_load(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text))


def test_every_outbox_variable_is_a_setting_and_the_values_validate():
    settings_env = {f"OUTBOX_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        env = service.get("environment", {})
        outbox_env = {key: value for key, value in env.items() if key.startswith("OUTBOX_")}
        if name == "postgres":
            continue
        assert outbox_env, name
        assert set(outbox_env) <= settings_env | CLI_ENV, set(outbox_env) - settings_env - CLI_ENV
        values = {key.removeprefix("OUTBOX_").lower(): value for key, value in outbox_env.items() if key not in CLI_ENV}
        Settings(**values)  # raises if a value does not validate


def test_the_commands_exist_and_the_database_url_points_at_the_postgres_service():
    commands = get_command(app).commands  # type: ignore[attr-defined]
    services = compose()["services"]
    for name in ("migrate", "worker"):
        argv = services[name]["command"]
        argv = shlex.split(argv) if isinstance(argv, str) else argv
        assert argv[0] == "outbox" and argv[1] in commands, argv
    url = services["worker"]["environment"]["OUTBOX_DATABASE_URL"]
    postgres = services["postgres"]["environment"]
    assert url == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_image_installs_the_schema_with_the_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("outbox", "processor", "schema"):
        assert f"COPY {folder} ./{folder}" in dockerfile
