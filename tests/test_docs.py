"""The docs a reader is sent to exist in the repository (issue 14 item 6): no citation of ``../shared/spec``, and
every ``spec §N`` / ``docs/architecture.md §N`` / ``training.md §N`` in code, tests and docs names a section (or a
numbered item of one) of ``docs/architecture.md`` / ``docs/conversion.md``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"(spec|architecture\.md|training\.md)((?:(?:,| and)? ?§\d+(?:\.\d+)*)+)")


def anchors(page: Path) -> set[str]:
    """Section numbers of ``page`` ("4", "4.1") and numbered items inside them ("10.16", "5.5.5")."""
    found: set[str] = set()
    section = None
    for line in page.read_text().splitlines():
        m = re.match(r"#{2,4} (\d+(?:\.\d+)*)\.? ", line)
        if m:
            section = m.group(1)
            found.add(section)
            continue
        m = re.match(r"(\d+)\. ", line)
        if m and section:
            found.add(f"{section}.{m.group(1)}")
    return found


def citations() -> list[tuple[str, str, str]]:
    """(file:line, page, number) for every citation in src/, tests/, docs/ and the README."""
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "src").rglob("*.toml"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    out = []
    for f in files:
        if f.name == Path(__file__).name:
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for m in CITE.finditer(line):
                page = "conversion" if m.group(1) == "training.md" else "architecture"
                out += [(f"{f.relative_to(ROOT)}:{i}", page, n) for n in re.findall(r"§(\d+(?:\.\d+)*)", m.group(2))]
    return out


def test_nothing_cites_files_outside_the_repository():
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    assert [str(f.relative_to(ROOT)) for f in files if "shared/spec" in f.read_text(errors="replace")] == []


def test_every_section_citation_resolves():
    pages = {name: anchors(ROOT / "docs" / f"{name}.md") for name in ("architecture", "conversion")}
    cited = citations()
    assert len(cited) > 50  # the pattern still finds the code's citations
    unresolved = [f"{where}: {page} §{n}" for where, page, n in cited if n not in pages[page]]
    assert unresolved == []


def test_the_anchor_reader_sees_items():
    assert {"10", "10.16", "5.5", "5.5.5", "3.1", "4.1"} <= anchors(ROOT / "docs" / "architecture.md")
