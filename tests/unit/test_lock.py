"""requirements.lock: the tests run the locked versions, and the lock is the whole runtime closure."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[2]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), f"not name==version: {line!r}"
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(spec) for spec in project["dependencies"]]


def test_the_lock_says_how_it_is_produced():
    header = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line.startswith("#")]
    assert any("python3 dev.py lock" in line for line in header), header


def test_every_locked_package_is_installed_at_its_locked_version():
    pins = locked()
    installed = {}
    for name in pins:
        try:
            installed[name] = distribution(name).version
        except PackageNotFoundError:
            installed[name] = None
    wrong = {name: (version, installed[name]) for name, version in pins.items() if installed[name] != version}
    assert not wrong, f"locked vs installed (python3 dev.py test reinstalls .venv from the lock): {wrong}"


def test_every_runtime_dependency_is_locked_at_a_version_it_accepts():
    pins = locked()
    for requirement in runtime_requirements():
        name = canonical(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: run `python3 dev.py lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def test_the_lock_is_closed_and_holds_no_extra():
    """What each locked package requires here (no extras) is locked too; the embedded extra is not."""
    pins = locked()
    for name in [*pins, *(canonical(r.name) for r in runtime_requirements())]:
        for spec in distribution(name).requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                assert canonical(requirement.name) in pins, f"{name} needs {requirement}, which is not locked"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["optional-dependencies"]["embedded"]:
        assert canonical(Requirement(spec).name) not in pins, spec
