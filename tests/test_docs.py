"""The documentation holds together: a short README, links and anchors that resolve, code
citations of ``docs/`` files and design sections that exist, and CI running the README's test
command.

Headings are matched by GitHub's anchor rule (lower case, punctuation other than ``-`` and
``_`` dropped, spaces to ``-``, ``-1``, ``-2`` ... for repeats), which is how the links are
followed when the files are read on GitHub.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 8 * 1024

# Markdown files whose links are checked: the README, docs/, the changelog, benchmarks' pages.
MARKDOWN = [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md")), *sorted(
    (ROOT / "benchmarks").glob("**/*.md"))]  # fmt: skip
# Where code, tests and scripts live; their citations of docs/ and benchmarks/ pages must resolve.
SOURCE_ROOTS = ["maskattn_deploy", "plugins", "export", "train", "scripts", "tests", ".ci"]
SOURCE_SUFFIXES = {".py", ".toml", ".md", ".txt", ""}
SKIP_DIRS = {"__pycache__", ".venv", ".cache", ".git", "build", "dist"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")
DOC_CITATION = re.compile(r"\b(docs|benchmarks)/([A-Za-z0-9_./-]+\.md)(#[A-Za-z0-9_-]+)?")
SECTION_CITATION = re.compile(r"docs/([A-Za-z0-9_-]+\.md) sections? (\d+(?:\.\d+)*)")
SECTION_NUMBER = re.compile(r"^(\d+(?:\.\d+)*)\.?\s")
# Built from parts so that this file does not match itself.
FORBIDDEN = [
    re.compile(r"\.\./" + "shared/"),
    re.compile("/work/" + "shared"),
    re.compile(r"\bDESIGN" + r" section"),
]


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a Markdown file outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def slug(title: str) -> str:
    """GitHub's anchor for a heading title."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link's text stays
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    return [m.group(2) for _, line in prose_lines(path) if (m := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for title in headings(path):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def section_numbers(path: Path) -> set[str]:
    return {m.group(1) for title in headings(path) if (m := SECTION_NUMBER.match(title))}


def links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in prose_lines(path):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def source_files() -> Iterator[Path]:
    for root in SOURCE_ROOTS:
        for path in sorted((ROOT / root).rglob("*")):
            if SKIP_DIRS & set(path.relative_to(ROOT).parts) or not path.is_file():
                continue
            if path.suffix in SOURCE_SUFFIXES and path != Path(__file__).resolve():
                yield path


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (limit {README_MAX_BYTES}); move details into docs/"
    )


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"line {number}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"line {number}: {target} (no heading with anchor #{anchor})")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    missing = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not missing, f"add a link to docs/{missing[0]} in README.md's Documentation list"


def test_code_citations_of_docs_resolve() -> None:
    """``docs/X.md``, ``docs/X.md#anchor``, ``benchmarks/.../X.md`` and ``docs/X.md section N``."""
    broken = []
    cited = 0
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(ROOT)
        for match in DOC_CITATION.finditer(text):
            cited += 1
            name = f"{match.group(1)}/{match.group(2)}"
            doc = ROOT / name
            anchor = (match.group(3) or "#")[1:]
            if not doc.is_file():
                broken.append(f"{where}: {name} does not exist")
            elif anchor and anchor not in anchors(doc):
                broken.append(f"{where}: {name} has no heading #{anchor}")
        for match in SECTION_CITATION.finditer(text):
            doc = DOCS / match.group(1)
            if doc.exists() and match.group(2) not in section_numbers(doc):
                broken.append(f"{where}: docs/{match.group(1)} has no section {match.group(2)}")
    assert cited > 0, "no docs/ citation found in the code: the scan is broken"
    assert not broken, "; ".join(broken)


def test_nothing_cites_files_outside_the_repository() -> None:
    paths = [*source_files(), *MARKDOWN]
    hits = [
        f"{p.relative_to(ROOT)}: {m.group(0)!r}"
        for p in paths
        for pattern in FORBIDDEN
        if (m := pattern.search(p.read_text(encoding="utf-8", errors="replace")))
    ]
    assert not hits, "cite docs/ in the repository instead: " + "; ".join(hits)


def readme_commands() -> list[str]:
    """The bash blocks of the README's quick start, one command each."""
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick_start, flags=re.S)]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_command() -> None:
    demo, tests = readme_commands()  # exactly two: the demo and the tests
    assert "\n" not in demo and demo.endswith("maskattn-deploy demo --out demo-out"), demo
    assert "\n" not in tests and tests.endswith(".venv/bin/pytest"), tests
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines, f".ci/run must run the README's test command verbatim: {tests}"


def test_slug_follows_github() -> None:
    # Expected anchors as GitHub renders these headings.
    assert slug("3.3 Test cases") == "33-test-cases"
    assert slug("Gate gradient (`train.gate_estimator`)") == "gate-gradient-traingate_estimator"
    assert slug("`maskattn-deploy parity EXPORT_DIR`") == "maskattn-deploy-parity-export_dir"
    assert slug("What CI verifies, and what needs a TensorRT machine") == (
        "what-ci-verifies-and-what-needs-a-tensorrt-machine"
    )
