"""The docs say what the code does: their commands exist, their links and section citations resolve.

- Every line of a ```sh/```bash block of README.md and docs/*.md names a real command: `outbox ...`
  is parsed against the CLI (command and options, not run), `python3 dev.py TASK` against dev.py's
  tasks, a script of the repository must exist (with the options given); other programs come from
  a short list. bench/README.md's blocks are checked the same way.
- A block of a language the tests cannot run carries a marker (tests/markdown_blocks.py); a block
  "tested by" a file names one that exists and reads that document.
- Every relative link of those documents (and bench/HISTORY.md) points at a file, and at a heading
  when it has an anchor; every citation of a section elsewhere in the repository (`README:
  "Scaling out"`, `bench/README.md, "Writer path"`) names a heading of that file.
- docs/operations.md lists every command of the CLI; CI runs the README's test command.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.markdown_blocks import DOCUMENTS, ROOT, Block, anchor, blocks, headings
from tests.unit.test_compose import assert_runs_in_the_cli, cli_commands

BENCH_DOCUMENTS = (ROOT / "bench" / "README.md", ROOT / "bench" / "HISTORY.md")
SHELL = {"sh", "bash"}
RUN_BY_TESTS = SHELL | {"python"}
# Programs that are not the project's, named in the docs as a reader would type them.
OTHER_PROGRAMS = {"pip", "export", "cp", "docker", "git", "make", "psql", "promtool", "cd", "opentelemetry-instrument"}
PYTHONS = {"python", "python3", ".venv/bin/python"}


def every_block(documents: tuple[Path, ...] = DOCUMENTS) -> list[Block]:
    return [block for path in documents if path.exists() for block in blocks(path)]


def dev_tasks() -> set[str]:
    """The tasks dev.py accepts (its `argv[0] not in {...}` check)."""
    match = re.search(r"argv\[0\] not in \{([^}]*)\}", (ROOT / "dev.py").read_text())
    assert match, "dev.py's task check moved: update this test"
    return set(re.findall(r'"(\w+)"', match.group(1)))


def assert_command_exists(argv: list[str], where: str) -> None:
    """``argv`` (one line of a shell block, comments and leading VAR=value removed) is a real command."""
    program, rest = argv[0], argv[1:]
    if program == "outbox":
        assert_runs_in_the_cli(argv)
    elif program in PYTHONS and rest[:1] == ["dev.py"]:
        assert rest[1:2] and rest[1] in dev_tasks(), f"{where}: {shlex.join(argv)}: no such dev.py task"
    elif program in PYTHONS and rest[:1] == ["-m"]:
        assert importlib.util.find_spec(rest[1]) is not None, f"{where}: no module {rest[1]}"
    elif program in PYTHONS or program == "bash":
        assert_script_exists(rest, where)
    else:
        assert program in OTHER_PROGRAMS, (
            f"{where}: {shlex.join(argv)}: {program} is neither a command of the project nor a known program; "
            "mark the block <!-- not tested: reason --> if it is not meant to be run"
        )


def assert_script_exists(argv: list[str], where: str) -> None:
    """A script of the repository, run with options its source mentions."""
    script = ROOT / argv[0]
    assert script.is_file(), f"{where}: {argv[0]} does not exist"
    source = script.read_text()
    for option in (token.split("=", 1)[0] for token in argv[1:] if token.startswith("--")):
        assert f'"{option}"' in source, f"{where}: {argv[0]} has no option {option}"


def shell_commands(block: Block) -> list[list[str]]:
    """The command lines of a shell block, without comments and leading VAR=value assignments."""
    found = []
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
            words = words[1:]
        if words:
            found.append(words)
    return found


@pytest.mark.parametrize(
    "block",
    [b for b in every_block((*DOCUMENTS, *BENCH_DOCUMENTS)) if b.language in SHELL and b.marker is None],
    ids=lambda block: block.where,
)
def test_every_shell_command_in_the_docs_exists(block: Block) -> None:
    commands = shell_commands(block)
    assert commands, f"{block.where}: an empty block"
    for argv in commands:
        assert_command_exists(argv, block.where)


def test_a_block_the_tests_cannot_run_says_why_and_one_run_elsewhere_names_its_test() -> None:
    for block in every_block():
        if block.marker is None:
            assert block.language in RUN_BY_TESTS, (
                f"{block.where}: a ```{block.language or '(no language)'} block the tests cannot run: "
                "put <!-- not tested: reason --> (or <!-- tested by tests/...py -->) on the line before it"
            )
        elif block.marker == "not tested":
            assert block.marker_detail, f"{block.where}: say why the block is not tested"
        else:
            test = ROOT / block.marker_detail
            assert test.is_file(), f"{block.where}: {block.marker_detail} does not exist"
            assert block.path.name in test.read_text(), f"{block.where}: {block.marker_detail} does not read it"


def test_the_readme_shows_the_test_command_that_ci_runs() -> None:
    readme_commands = [
        argv for block in blocks(ROOT / "README.md") if block.language in SHELL for argv in shell_commands(block)
    ]
    assert ["python3", "dev.py", "test"] in readme_commands
    assert ["python3", "dev.py", "demo"] in readme_commands
    assert re.search(r"^python3 dev\.py test$", (ROOT / ".ci" / "run").read_text(), re.M), "CI runs another command"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "document", [p for p in (*DOCUMENTS, *BENCH_DOCUMENTS) if p.exists()], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_relative_link_points_at_a_file_and_its_heading(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, fragment = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        assert linked.exists(), f"{document.relative_to(ROOT)}: {target}: no such file"
        if fragment:
            anchors = {anchor(heading) for heading in headings(linked)}
            assert fragment in anchors, f"{document.relative_to(ROOT)}: {target}: no such heading"


# `README: "Ordering"`, `(README, "Tracing")`, `bench/README.md ("Scale-out")`, `docs/design.md: "Exactly once"`.
_CITATION = re.compile(
    r"\b(README(?:\.md)?|docs/[\w/-]+\.md|bench/(?:README|HISTORY)\.md)[`:,\s(]{0,4}\"([A-Z][^\"\n]{0,80})\""
)
_NOT_SCANNED = ("bench/runs/", "bench/results/")


def repository_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [
        ROOT / name
        for name in listed
        if not name.startswith(_NOT_SCANNED)
        and name != "tests/unit/test_docs.py"  # its docstring shows citations as examples
        and (ROOT / name).is_file()
        and (ROOT / name).suffix in {".py", ".sql", ".md", ".yml", ".yaml", ".json", ".toml", ".sh", ".example", ""}
    ]


def test_every_citation_of_a_docs_section_names_one_of_its_headings() -> None:
    problems = []
    for path in repository_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for match in _CITATION.finditer(text):
            name, section = match.group(1), match.group(2)
            cited = ROOT / ("README.md" if name == "README" else name)
            if name == "README.md" and path.parent != ROOT and (path.parent / "README.md").exists():
                cited = path.parent / "README.md"  # a README.md cited from its own folder
            titles = [title.lower() for title in headings(cited)] if cited.exists() else []
            if not any(title.startswith(section.lower()) for title in titles):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f'{path.relative_to(ROOT)}:{line}: {name} has no section "{section}"')
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "argv",
    [
        ["outbox", "rn"],
        ["outbox", "run", "--no-such-option"],
        ["outbox", "pipeline"],  # a group, not a command
        ["outbx", "run"],
        ["python3", "dev.py", "tset"],
        ["python", "bench/no_such_script.py"],
        ["python", "bench/scale.py", "--no-such-option"],
    ],
    ids=shlex.join,
)
def test_a_command_that_does_not_exist_is_refused(argv: list[str]) -> None:
    with pytest.raises(AssertionError):
        assert_command_exists(argv, "example")


def test_the_marker_is_read_from_the_line_before_the_fence(tmp_path: Path) -> None:
    document = tmp_path / "example.md"
    document.write_text(
        "Text.\n\n<!-- not tested: a fragment -->\n```python\nx = 1\n```\n\n"
        "<!-- tested by tests/integration/test_readme_lifespan.py -->\n  ```sh\n  outbox run\n  ```\n"
        "```python\ny = 2\n```\n"
    )
    found = [(b.language, b.marker, b.marker_detail, b.code) for b in blocks(document)]
    assert found == [
        ("python", "not tested", "a fragment", "x = 1\n"),
        ("sh", "tested by", "tests/integration/test_readme_lifespan.py", "outbox run\n"),
        ("python", None, "", "y = 2\n"),
    ]


def test_the_operations_guide_lists_every_command() -> None:
    lines = (ROOT / "docs" / "operations.md").read_text().splitlines()
    missing = []
    for path, command in cli_commands().items():
        if not path or hasattr(command, "commands"):
            continue  # the root and the groups: their commands are listed
        group, name = f"`outbox {path[0]}", path[-1]
        if not any(
            group in line and (len(path) == 1 or f"{group} {name}" in line or f"`{name}" in line) for line in lines
        ):
            missing.append(" ".join(path))
    assert not missing, f"docs/operations.md does not list: {missing}"
