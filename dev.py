#!/usr/bin/env python3
"""Project tasks that need nothing but Python 3.11+ (each sets up .venv itself on first use).

python3 dev.py demo [ARGS]   the worker with the demo, on an embedded PostgreSQL unless
                             OUTBOX_DATABASE_URL is set
python3 dev.py test [ARGS]   the whole test suite (pytest); the database comes from
                             OUTBOX_TEST_DATABASE_URL, else Docker, else an embedded server
python3 dev.py run [ARGS]    the worker (`outbox run`)
python3 dev.py lint          ruff and mypy
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("OUTBOX_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_venv() -> None:
    """Create .venv and install the project with its test tools, again when pyproject.toml changes."""
    stamp = VENV / ".installed"
    pyproject = ROOT / "pyproject.toml"
    if stamp.exists() and stamp.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    print(f"setting up {VENV} ...", file=sys.stderr)
    venv.create(VENV, with_pip=True, clear=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test,dev]"], check=True)
    stamp.touch()


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script is what tells an older Python so
        print("Python 3.11 or newer is needed", file=sys.stderr)
        return 1
    if not argv or argv[0] not in {"demo", "test", "run", "lint", "bench"}:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    task, args = argv[0], argv[1:]
    os.chdir(ROOT)
    if task == "test":
        return subprocess.run([str(BIN / "pytest"), *args]).returncode
    if task == "bench":
        return subprocess.run([str(BIN / "python"), "bench/run.py", *args]).returncode
    if task == "lint":
        ruff = subprocess.run(
            [str(BIN / "ruff"), "check", "outbox", "processor", "tests", "bench", "dev.py"]
        ).returncode
        return ruff or subprocess.run([str(BIN / "mypy")]).returncode
    return subprocess.run([str(BIN / "outbox"), task, *args]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
