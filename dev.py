#!/usr/bin/env python3
"""Project tasks that need nothing but Python 3.11+ (each sets up .venv itself on first use).

python3 dev.py demo [ARGS]   the worker with the demo, on an embedded PostgreSQL unless
                             OUTBOX_DATABASE_URL is set
python3 dev.py test [ARGS]   the whole test suite (pytest); the database comes from
                             OUTBOX_TEST_DATABASE_URL, else Docker, else an embedded server
python3 dev.py run [ARGS]    the worker (`outbox run`)
python3 dev.py lint          ruff and mypy
python3 dev.py lock          write requirements.lock: the runtime dependencies' versions, resolved afresh
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("OUTBOX_VENV", ROOT / ".venv"))
BIN_DIR = "Scripts" if os.name == "nt" else "bin"
BIN = VENV / BIN_DIR
LOCK = ROOT / "requirements.lock"
LOCK_HEADER = """\
# The runtime dependencies at the versions the tests pass with: the whole closure of `pip install .`
# (no extras), one `name==version` a line. Produced by `python3 dev.py lock` (a fresh venv, `pip
# install .`, `pip freeze --exclude pg-outbox-processor`); do not edit by hand, run the tests after it.
# dev.py's venv installs with `-c requirements.lock`, the Dockerfile with `-r requirements.lock`;
# tests/unit/test_lock.py checks that the venv and pyproject.toml agree with it.
"""


def ensure_venv() -> None:
    """Create .venv and install the project, the embedded server and the test tools at the locked versions;
    again when pyproject.toml or requirements.lock changes (the stamp holds a digest of both)."""
    stamp = VENV / ".installed"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in (ROOT / "pyproject.toml", LOCK) if p.exists())).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    print(f"setting up {VENV} ...", file=sys.stderr)
    venv.create(VENV, with_pip=True, clear=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # -c: the runtime dependencies at exactly the locked versions (the extras' own are not locked).
    constraints = ["-c", str(LOCK)] if LOCK.exists() else []
    subprocess.run([*pip, *constraints, "-e", f"{ROOT}[embedded,test,dev]"], check=True)
    stamp.write_text(digest + "\n")


def lock() -> int:
    """Write requirements.lock: the runtime closure of `pip install .`, resolved afresh in a new venv.

    pip itself rather than pip-tools or uv: the task then needs nothing but Python, as every task
    here, and the lock is what a real install of the project chose (frozen from it, not predicted).
    Its resolution is for this platform and Python: the runtime closure has no markers that differ
    between Linux and macOS CPython 3.11 and 3.12 (Windows adds colorama and tzdata), so one lock
    serves the image, CI and the dev venvs. Run the tests after it (`dev.py test` reinstalls .venv).
    """
    with tempfile.TemporaryDirectory(prefix="outbox-lock-") as tmp:
        venv.create(tmp, with_pip=True)
        pip = [str(Path(tmp) / BIN_DIR / "python"), "-m", "pip", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "install", "--quiet", str(ROOT)], check=True)
        frozen = subprocess.run(
            [*pip, "freeze", "--exclude", "pg-outbox-processor"], check=True, capture_output=True, text=True
        ).stdout
    pins = [line for line in frozen.splitlines() if line.strip()]  # pip freeze sorts them by name
    if not pins or any("==" not in pin for pin in pins):
        print(f"unexpected pip freeze output:\n{frozen}", file=sys.stderr)
        return 1
    LOCK.write_text(LOCK_HEADER + "".join(f"{pin}\n" for pin in pins))
    print(f"wrote {LOCK.name}: {len(pins)} packages", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script is what tells an older Python so
        print("Python 3.11 or newer is needed", file=sys.stderr)
        return 1
    if not argv or argv[0] not in {"demo", "test", "run", "lint", "bench", "lock"}:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "lock":
        return lock()
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
