"""The README is the front page of the documentation site, and says nothing the site does
not: every fenced block in it is a block of a site page, every other line is said on the
site, every section heading is a heading there, and every link into the site resolves
to a page of its navigation (and a heading of that page). Its Python blocks run as
pasted; as blocks of site pages, ``test_docs`` runs them too, and checks the command
lines the site shows against the real tools.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import markdown
import pytest
import yaml

from ._blocks import DOCS, FENCE, PAGES, ROOT, blocks, guarantee_names

README = ROOT / "README.md"
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")


def readme_blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, dedented code) of every fenced block in ``lang``."""
    return blocks(README, lang)


def prose(text: str) -> str:
    """What a reader reads: a link as its text, no list marker, one space for any run."""
    text = LINK.sub(r"\1", text)
    text = re.sub(r"^\s*(?:[-*+]|\d+\.)\s+", "", text, flags=re.M)
    return " ".join(text.split())


def without_blocks(text: str) -> str:
    return FENCE.sub("", text)


def readme_lines() -> list[tuple[int, str]]:
    """(line number, line) of the README outside its fenced blocks, blank lines left out."""
    text = README.read_text()
    fenced: set[int] = set()
    for m in FENCE.finditer(text):
        first = text[: m.start()].count("\n") + 1
        fenced.update(range(first, first + m.group(0).count("\n") + 1))
    return [
        (number, line)
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and number not in fenced
    ]


@pytest.mark.parametrize(
    ("line", "code"), readme_blocks("python"), ids=[str(n) for n, _ in readme_blocks("python")]
)
def test_every_python_block_runs_as_pasted(tmp_path: Path, line: int, code: str) -> None:
    """A front page's examples stand alone. The first write runs twice on the same file."""
    script = tmp_path / "example.py"
    script.write_text(code)
    outputs = []
    for _ in range(2):  # once on a new file, once again on the same
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"README line {line}:\n{done.stderr}"
        outputs.append(done.stdout.strip())
    if (line, code) == readme_blocks("python")[0]:
        assert outputs == ["balance 10", "balance 20"]


def test_the_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first = FENCE.search(text)
    assert first is not None and first.group(2) == "sh"
    assert "\n## " not in text[: first.start()]  # before any section
    commands = [line.split("#")[0].strip() for line in first.group(3).splitlines()]
    assert commands == ["make demo", "make test"]


def test_every_block_of_the_readme_is_on_a_site_page() -> None:
    """So the site says it too, and test_docs runs it where it is a Python block."""
    site = {
        (m.group(2), textwrap.dedent(m.group(3)))
        for page in PAGES
        for m in FENCE.finditer((DOCS / page).read_text())
    }
    readme = [
        (README.read_text()[: m.start()].count("\n") + 1, m.group(2), textwrap.dedent(m.group(3)))
        for m in FENCE.finditer(README.read_text())
    ]
    assert readme
    missing = [line for line, lang, code in readme if (lang, code) not in site]
    assert not missing, f"README blocks at lines {missing} are on no page of the site"


def test_every_line_of_the_readme_is_said_on_the_site() -> None:
    """Each line outside the blocks, as a reader reads it (links as their text), is on a
    site page, and each heading is a heading there: the README holds nothing of its own."""
    pages = [without_blocks((DOCS / page).read_text()) for page in PAGES]
    said = " ".join(prose(line) for page in pages for line in page.splitlines())
    headings = {prose(h) for page in pages for h in re.findall(r"^#+ (.+)$", page, re.M)}
    missing = []
    for number, line in readme_lines():
        heading = re.match(r"^#+ (.+)$", line)
        if heading:
            if prose(heading.group(1)) not in headings:
                missing.append(f"line {number}, heading: {line}")
        elif prose(line) not in said:
            missing.append(f"line {number}: {line[:100]}")
    assert not missing, "\n".join(missing)


def test_the_readme_lists_the_guarantees_of_the_site() -> None:
    assert guarantee_names(README) == guarantee_names(DOCS / "guarantees.md")


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings, as the site's Markdown extensions make them."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    extensions: list[str] = []
    configs: dict[str, object] = {}
    for item in config["markdown_extensions"]:
        if isinstance(item, dict):
            ((name, options),) = item.items()
            extensions.append(name)
            configs[name] = options or {}
        else:
            extensions.append(item)
    rendered = markdown.markdown(page.read_text(), extensions=extensions, extension_configs=configs)
    return set(re.findall(r'<h\d id="([^"]+)"', rendered))


def test_the_readme_links_resolve() -> None:
    """A link into the site names a page of its navigation (and a heading of it); any
    other relative link names a file of the repository. Every page but the Home page,
    whose copy the README is, is linked."""
    text = without_blocks(README.read_text())
    broken = []
    linked = set()
    for _, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # not a file of the repository
        path, _, anchor = target.partition("#")
        if not path:
            broken.append(f"{target}: an anchor of the README, which has no site page")
            continue
        if not (ROOT / path).exists():
            broken.append(f"{target}: no such file")
            continue
        if path.startswith("docs/") and path.endswith(".md"):
            page = path.removeprefix("docs/")
            linked.add(page)
            if page not in PAGES:
                broken.append(f"{target}: not a page of the navigation")
            elif anchor and anchor not in anchors(DOCS / page):
                broken.append(f"{target}: no heading #{anchor} on {page}")
    assert not broken, broken
    unlinked = set(PAGES) - {"index.md"} - linked
    assert not unlinked, f"pages the README does not link: {sorted(unlinked)}"
