"""`pip install` without the embedded extra, as a server or the image gets it: a fresh venv, the locked
versions, and a clear line instead of an embedded server when no database is configured."""

from __future__ import annotations

import subprocess
import sys
import venv
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.fix_database import subprocess_env

ROOT = Path(__file__).parents[2]
NO_DATABASE = (
    "error: no database configured: set OUTBOX_DATABASE_URL (or --database-url), or install the embedded server: "
    "pip install 'pg-outbox-processor[embedded]'"
)


def run(*argv: str | Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_version_is_the_installed_distributions():
    shown = run(sys.executable, "-m", "processor.cli", "--version", env=subprocess_env(None), cwd=ROOT)
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, f"outbox {version('pg-outbox-processor')}\n", "")


@pytest.mark.slow
def test_installed_without_the_embedded_extra(empty_db, tmp_path):
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    env = subprocess_env(None)  # no OUTBOX_* variable, no database URL
    env.pop("PYTHONPATH", None)
    pip = (bin_dir / "python", "-m", "pip", "--disable-pip-version-check")
    installed = run(*pip, "install", "--quiet", "-c", ROOT / "requirements.lock", ROOT, env=env, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    # Exactly the lock: nothing more was needed, nothing else was chosen.
    frozen = run(*pip, "freeze", "--exclude", "pg-outbox-processor", env=env, cwd=tmp_path).stdout.splitlines()
    locked = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if not line.startswith("#")]
    assert sorted(frozen, key=str.lower) == sorted(locked, key=str.lower)
    assert run(bin_dir / "python", "-c", "import pgserver", env=env, cwd=tmp_path).returncode == 1

    outbox = bin_dir / "outbox"
    shown = run(outbox, "--version", env=env, cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.strip() == f"outbox {version('pg-outbox-processor')}", shown

    for command in (("migrate",), ("backlog",), ("run", "--until-idle"), ("check",)):
        refused = run(outbox, *command, env=env, cwd=tmp_path)
        assert (refused.returncode, refused.stderr.strip(), refused.stdout) == (1, NO_DATABASE, ""), command

    with_db = subprocess_env(empty_db)
    migrated = run(outbox, "migrate", env=with_db, cwd=tmp_path)
    assert migrated.returncode == 0 and "applied 0001_initial" in migrated.stdout, migrated.stderr
    backlog = run(outbox, "backlog", "--json", env=with_db, cwd=tmp_path)
    assert backlog.returncode == 0 and '"pending_events": 0' in backlog.stdout, backlog.stderr
