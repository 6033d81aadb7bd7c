"""Every cross-reference resolves: the markdown links of README.md and docs/*.md, the sections they
cite by name (`see "Heading"`), and the pages and headings the code's messages send a reader to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Where a message, a comment or a block's documentation link may send a reader.
SOURCES = [*sorted(path for folder in ("dbmigrate", "blocks", "flows", "benchmarks")
                   for path in (REPO / folder).rglob("*.py")),
           *sorted((REPO / ".github" / "workflows").glob("*.yml")), REPO / "prefect.yaml", REPO / "Makefile"]
PROJECT_URL = "https://github.com/dbmigrate/dbmigrate"

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED_BY_NAME = re.compile(r'\bsee\s+"([^"]+)"')
CITED_IN_SOURCE = re.compile(r"(?:README\.md|README|docs/[A-Za-z_]+\.md)(?:#[\w-]+| '[^']+'| \"[^\"]+\")?")


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (a `#` there is a comment, not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (code spans and links as shown), lower case, without
    punctuation but `-` and `_`, spaces as hyphens."""
    shown = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", shown.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives ``page``'s headings; a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def headings(page: Path) -> set[str]:
    return {heading.strip() for heading in HEADING.findall(prose(page.read_text()))}


def unresolved(page: Path, reference: str) -> str | None:
    """Why ``reference`` (`FILE`, `FILE#anchor` or `#anchor`, relative to ``page``) leads nowhere, or None."""
    file, _, anchor = reference.partition("#")
    target = (page.parent / file).resolve() if file else page
    if not target.exists():
        return f"{reference}: no file {target.relative_to(REPO) if target.is_relative_to(REPO) else target}"
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return f"{reference}: {target.name} has no heading with the anchor #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_link_names_a_file_and_heading_that_exist(page):
    links = [href for href in LINK.findall(prose(page.read_text()))
             if not href.startswith(("http:", "https:", "mailto:"))]

    assert [why for href in links if (why := unresolved(page, href))] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_a_section_cited_by_name_is_a_heading_of_the_same_page(page):
    cited = {" ".join(name.split()) for name in CITED_BY_NAME.findall(prose(page.read_text()))}

    assert sorted(cited - headings(page)) == []


def source_citation(reference: str) -> str | None:
    """Why a page cited in the code (`README 'Heading'`, `docs/X.md#anchor`) leads nowhere, or None."""
    if reference.startswith("README"):
        name = reference.partition(" ")[2].strip("'\"")
        return None if not name or name in headings(REPO / "README.md") else f"{reference}: README has no such heading"
    return unresolved(REPO / "README.md", reference)


def test_the_pages_and_headings_the_code_cites_exist():
    cited = {f"{path.relative_to(REPO)}: {why}"
             for path in SOURCES for reference in CITED_IN_SOURCE.findall(path.read_text())
             if (why := source_citation(reference))}

    assert sorted(cited) == []


def test_the_blocks_documentation_link_leads_to_a_heading():
    """The page the Prefect UI links from the blocks (read from the source: the unit tests import no Prefect)."""
    [url] = re.findall(r'^DOCUMENTATION_URL = "([^"]+)"', (REPO / "blocks" / "__init__.py").read_text(), re.M)
    reference = url.removeprefix(f"{PROJECT_URL}/blob/main/").removeprefix(PROJECT_URL)

    assert not reference.startswith("http"), f"{url} is not a page of {PROJECT_URL}"
    assert unresolved(REPO / "README.md", reference or "README.md") is None, url
