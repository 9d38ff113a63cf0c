"""docker-compose.yml, .env.example, the Dockerfile and the CLI stay consistent (no Docker engine needed)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from processor.cli import app
from processor.settings import Settings

ROOT = Path(__file__).parents[2]
# Compose's interpolation: $$ (a literal $), ${X}, ${X:-default}, ${X-default}, ${X:?error}, ${X?error}, $X.
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")
REQUIRED = {"POSTGRES_PASSWORD", "OUTBOX_PIPELINE_STEPS"}  # compose stops while one is unset or empty
GIVEN = {"POSTGRES_PASSWORD": "0123abcd", "OUTBOX_PIPELINE_STEPS": "ingest,preprocess,inference,iou_eval"}


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with variables replaced as docker compose does with ``env`` as the environment."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1) or match.group(4), match.group(2), match.group(3)
        given = env.get(name)
        unset = given is None or (given == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else str(given)
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        return given or ""

    return _VARIABLE.sub(value, text)


def variables(text: str) -> set[str]:
    return {m.group(1) or m.group(4) for m in _VARIABLE.finditer(text) if m.group(0) != "$$"}


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The file as docker compose reads it with ``env`` in the shell (default: only the required values)."""
    loaded: dict[str, Any] = yaml.safe_load(interpolate(_compose_text(), GIVEN if env is None else env))
    return loaded


def _compose_text() -> str:
    """The file without its comments (they show examples that compose does not interpolate)."""
    return "\n".join(
        line for line in (ROOT / "docker-compose.yml").read_text().splitlines() if not line.lstrip().startswith("#")
    )


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def cli_commands() -> dict[tuple[str, ...], Any]:
    """Every command of the CLI by its path (("migrate",), ("pipeline", "show"), ...); groups have .commands."""
    found: dict[tuple[str, ...], Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(get_command(app), ())
    return found


def cli_env() -> set[str]:
    names: set[str] = set()
    for command in cli_commands().values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
    return names


def assert_runs_in_the_cli(argv: list[str]) -> None:
    """``argv`` is `outbox COMMAND [SUB] [OPTIONS]` with a command and options that exist."""
    assert argv[0] == "outbox", argv
    commands = cli_commands()
    path: tuple[str, ...] = ()
    rest = argv[1:]
    while rest and (*path, rest[0]) in commands:
        path, rest = (*path, rest[0]), rest[1:]
    assert path and not hasattr(commands[path], "commands"), f"{argv}: no such command"
    options = {opt for param in commands[path].params for opt in param.opts}
    for token in rest:
        if token.startswith("-"):
            assert token.split("=", 1)[0] in options, f"{argv}: {token} is not an option of outbox {' '.join(path)}"


PROBE = ["python", "-m", "processor.probe"]  # the image's health probe: /health on OUTBOX_METRICS_PORT


def assert_runs(argv: list[str]) -> None:
    """An outbox command the CLI has, or the probe module (which takes no arguments)."""
    if argv[:3] == PROBE:
        assert argv == PROBE and importlib.util.find_spec("processor.probe") is not None, argv
    else:
        assert_runs_in_the_cli(argv)


def service_commands(service: dict[str, Any]) -> list[list[str]]:
    """The outbox commands a service runs: its command and its healthcheck's."""
    found = []
    command = service.get("command")
    if command:
        found.append(shlex.split(command) if isinstance(command, str) else command)
    test = service.get("healthcheck", {}).get("test")
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if test and test[0] == "CMD":
        found.append(test[1:])
    elif test and test[0] == "CMD-SHELL":
        found.append(shlex.split(test[1]))
    return [argv for argv in found if argv and (argv[0] == "outbox" or argv[:3] == PROBE)]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), " ".join(args.split())))
    return stages


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_compose_needs_the_password_and_the_pipeline_and_env_example_documents_every_variable():
    text = _compose_text()
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        compose({})
    for name in REQUIRED:
        with pytest.raises(MissingVariable, match=name):
            compose({**GIVEN, name: ""})
    compose(GIVEN)  # the required values are enough
    example = env_example()
    assert variables(text) <= set(example), variables(text) - set(example)
    assert example["POSTGRES_PASSWORD"] == ""  # chosen by whoever deploys, never shipped
    filled = compose({**example, "POSTGRES_PASSWORD": "0123abcd"})
    assert filled["services"]["migrate"]["environment"]["OUTBOX_LEGACY_TRIGGER"] == "refuse"


@pytest.mark.parametrize(
    "env", [GIVEN, {**GIVEN, "POSTGRES_USER": "u1", "POSTGRES_DB": "d1", "OUTBOX_PARTITIONS": "2"}]
)
def test_every_outbox_variable_is_a_setting_or_a_cli_variable_and_the_values_validate(env):
    settings_env = {f"OUTBOX_{name.upper()}" for name in Settings.model_fields}
    known = settings_env | cli_env()
    for name, service in compose(env)["services"].items():
        outbox_env = {key: value for key, value in service.get("environment", {}).items() if key.startswith("OUTBOX_")}
        if name == "postgres":
            assert not outbox_env
            continue
        assert outbox_env, name
        assert set(outbox_env) <= known, set(outbox_env) - known
        values = {
            key.removeprefix("OUTBOX_").lower(): value for key, value in outbox_env.items() if key in settings_env
        }
        Settings(**values)  # raises if a value does not validate


@pytest.mark.parametrize("env", [GIVEN, {**GIVEN, "POSTGRES_USER": "u1", "POSTGRES_DB": "d1"}])
def test_the_commands_exist_and_the_database_url_points_at_the_postgres_service(env):
    services = compose(env)["services"]
    ran = {name: service_commands(service) for name, service in services.items()}
    assert len(ran["migrate"]) == 1 and len(ran["worker"]) == 2, ran  # the worker's healthcheck too
    for argv in (argv for commands in ran.values() for argv in commands):
        assert_runs(argv)
    postgres = services["postgres"]["environment"]
    for name in ("migrate", "worker"):
        url = services[name]["environment"]["OUTBOX_DATABASE_URL"]
        assert url == (
            f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/"
            f"{postgres['POSTGRES_DB']}"
        )
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_database_publishes_no_port():
    for name, service in compose()["services"].items():
        assert "ports" not in service, f"{name} publishes {service['ports']}"


def test_migrate_prints_its_plan_and_refuses_to_drop_a_legacy_trigger_by_default():
    migrate = compose()["services"]["migrate"]
    assert "--show-plan" in migrate["command"]
    assert migrate["environment"]["OUTBOX_LEGACY_TRIGGER"] == "refuse"
    assert "OUTBOX_LEGACY_TRIGGER" in cli_env()


def test_the_worker_healthcheck_probes_the_metrics_port_the_image_exposes():
    worker = compose()["services"]["worker"]
    port = worker["environment"]["OUTBOX_METRICS_PORT"]
    (probe,) = [argv for argv in service_commands(worker) if argv != worker["command"]]
    assert probe == PROBE  # it reads OUTBOX_METRICS_PORT
    assert [str(p) for p in worker["expose"]] == [port]
    runtime = dockerfile_stages()[-1]
    assert ("EXPOSE", port) in runtime
    assert any(kind == "ENV" and f"OUTBOX_METRICS_PORT={port}" in args.split() for kind, args in runtime)


def test_the_image_installs_the_lock_then_the_project_and_runs_as_a_user_with_a_healthcheck():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    builder, runtime = stages[0], stages[-1]
    builder_runs = [args for kind, args in builder if kind == "RUN"]
    assert ("COPY", "requirements.lock ./") in builder
    (from_lock,) = [args for args in builder_runs if "-r requirements.lock" in args]
    assert "--no-deps" in from_lock  # nothing but the lock
    (project,) = [args for args in builder_runs if re.search(r"install --no-deps \.(\s|$)", args)]
    assert "check" in project  # pip check: the lock covers every dependency
    for folder in ("outbox", "processor", "schema"):
        assert ("COPY", f"{folder} ./{folder}") in builder
    assert any(kind == "COPY" and args.startswith("--from=") for kind, args in runtime)
    users = [args for kind, args in runtime if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [args for kind, args in runtime if kind == "HEALTHCHECK"]
    assert yaml.safe_load(healthcheck.split(" CMD ", 1)[1]) == PROBE
    # The image leaves the embedded server out: it is an extra, and neither the lock nor the Dockerfile names it.
    assert "embedded" not in " ".join(args for stage in stages for kind, args in stage if kind == "RUN")
    assert not {"pgserver", "platformdirs"} & set(locked())
