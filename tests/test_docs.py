"""The documentation holds together: every relative link in the README and docs/ resolves, every `how-it-works
§N` cited in code, tests and docs is a section of docs/how-it-works.md, nothing cites a document outside the
repository, and the generated tables are the benchmark JSON's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"how-it-works(?:\.md)?\)? §(\d+)")
OUTSIDE = re.compile(
    r"\bspec §|LYNX_SPEC|TRACE_STATISTICS|DECISION_POINTS\.md|VLLM_PLUGIN\.md|turn2-findings"
)


def broken_links(path: Path) -> list[str]:
    """The relative links of a markdown file whose target does not exist (anchors are not checked)."""
    out = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        if not (path.parent / target.split("#", 1)[0]).exists():
            out.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {target}")
    return out


def sections() -> set[str]:
    text = (ROOT / "docs" / "how-it-works.md").read_text(encoding="utf-8")
    return set(re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE))


def sources() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("src", "tests", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_every_relative_link_resolves() -> None:
    markdown = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(markdown) >= 12
    assert [link for path in markdown for link in broken_links(path)] == []


def test_the_link_check_catches_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text(
        "[ok](there.md) [anchor](there.md#a) [web](https://example.com) [gone](missing.md) ![img](nope.png)"
    )
    assert [link.split(": ")[1] for link in broken_links(page)] == ["missing.md", "nope.png"]


def test_every_cited_section_exists_and_nothing_cites_outside_the_repo() -> None:
    known = sections()
    assert {str(n) for n in range(1, 10)} <= known
    cited, outside = {}, []
    for path in sources():
        if path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8")
        for number in CITATION.findall(text):
            cited.setdefault(number, path)
        if OUTSIDE.search(text):
            outside.append(str(path.relative_to(ROOT)))
    assert len(cited) >= 8  # the code does cite the sections
    assert {n: str(p) for n, p in cited.items() if n not in known} == {}
    assert outside == []


def test_generated_tables_are_up_to_date() -> None:
    """docs/results.md and the README's headline table are `benchmarks/readme_tables.py`'s output."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_documented_command_line_parses() -> None:
    """Each `lynx-exit ...` line of the README and docs/cli.md is a command the CLI accepts."""
    import shlex

    from lynx_exit.cli import build_parser

    parser = build_parser()
    commands = []
    for path in (ROOT / "README.md", ROOT / "docs" / "cli.md"):
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL)
        for block in blocks:
            lines = block.replace("\\\n", " ").splitlines()
            for line in lines:
                commands += [
                    part.strip()
                    for part in line.split("  #")[0].split("&&")
                    if part.strip().startswith("lynx-exit ")
                ]
    assert len(commands) >= 20
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(getattr(args, "func", None)), command
