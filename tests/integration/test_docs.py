"""The documentation site: it builds with ``mkdocs build --strict`` and prints no warning,
every page of its navigation renders what its Markdown holds (headings, code blocks,
tables, the benchmark plots, the API reference with signatures and docstrings), every
Python block on every page runs against a real database (SQLite, and Postgres), with the
block runner of ``_blocks``, and every command line its pages show matches the real
command-line tools.
"""

from __future__ import annotations

import html
import inspect
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import writeturn
from writeturn import Outcome, WriteHandle, WriteSerializer
from writeturn.alembic_env import include_name, include_object

from ._blocks import (
    DOCS,
    PAGES,
    ROOT,
    balance_of,
    blocks,
    guarantee_names,
    reader_namespace,
    run_blocks,
)

PUBLIC_MODULES = ("asgi", "testing", "metrics", "migrations", "alembic_env")


class Page(HTMLParser):
    """What one built page's article holds: headings, tags counted, images, ids, text."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.depth = 0  # > 0 inside <article>
        self.headings: dict[str, list[str]] = {"h1": [], "h2": [], "h3": []}
        self.tags: dict[str, int] = {}
        self.images: list[str] = []
        self.glued: list[str] = []  # paragraph lines that start like a list item
        self._paragraph = 0
        self.ids: set[str] = set()
        self._heading: str | None = None
        self._text: list[str] = []
        self._heading_text: list[str] = []
        self.feed(path.read_text())
        self.text = " ".join(" ".join(self._text).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "article":
            self.depth += 1
        if not self.depth:
            return
        self.tags[tag] = self.tags.get(tag, 0) + 1
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        if tag == "img":
            self.images.append(str(found["src"]))
        if tag in self.headings:
            self._heading, self._heading_text = tag, []
        if tag == "p":
            self._paragraph += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self.depth -= 1
        if tag == "p" and self._paragraph:
            self._paragraph -= 1
        if tag == self._heading:
            self.headings[tag].append(" ".join("".join(self._heading_text).split()).strip("¶ "))
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self.depth:
            self._text.append(data)
            if self._paragraph:
                self.glued += re.findall(r"\n *(?:[-*+]|\d+\.) .{0,40}", data)
            if self._heading:
                self._heading_text.append(data)


def words(text: str) -> str:
    """Only the words: Markdown, reST and HTML render the same sentence differently. A role
    (``:class:`~writeturn.TurnTimeout```) shows as the name alone in the reference."""
    text = re.sub(r":(?:py:)?\w+:`~(?:[\w.]*\.)?(\w+)`", r"\1", html.unescape(text))
    text = re.sub(r":(?:py:)?\w+:`", "`", text)
    return " ".join(re.findall(r"\w+", text))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    return out


def built(site: Path, page: str) -> Path:
    name = page.removesuffix(".md")
    return site / ("index.html" if name == "index" else f"{name}/index.html")


def test_every_page_in_docs_is_in_the_navigation() -> None:
    assert sorted(PAGES) == sorted(p.name for p in DOCS.glob("*.md"))


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(site: Path, page: str) -> None:
    source = (DOCS / page).read_text()
    rendered = Page(built(site, page))
    title = re.search(r"^# (.+)$", source, re.M)
    assert title is not None, page
    assert [words(h) for h in rendered.headings["h1"]] == [words(title.group(1))], page
    sections = [words(h) for h in re.findall(r"^## (.+)$", source, re.M)]
    assert [words(h) for h in rendered.headings["h2"]][: len(sections)] == sections
    fences = sum(1 for lang in ("python", "sh") for _ in blocks(DOCS / page, lang))
    assert rendered.tags.get("pre", 0) >= fences, page
    tables = len(re.findall(r"^\|[-|: ]+\|$", source, re.M))
    assert rendered.tags.get("table", 0) >= tables, page
    # Nothing left as raw Markdown: a fence, a link, a list item glued to a paragraph.
    assert "```" not in rendered.text, page
    assert not re.search(r"\]\((?!\s)[^)]*\.md", rendered.text), page
    assert not rendered.glued, (page, rendered.glued)


def test_the_short_guarantees_are_the_guarantees_page_in_order() -> None:
    """The Home page (and the README, its copy) lists the guarantees in one line each:
    the same ones, numbered as the page that states them in full."""
    full = guarantee_names(DOCS / "guarantees.md")
    assert len(full) == 8, full
    assert guarantee_names(DOCS / "index.md") == full
    home = (DOCS / "index.md").read_text()
    assert "](guarantees.md)" in home


def test_the_benchmark_plots_are_shown(site: Path) -> None:
    page = built(site, "benchmarks.md")
    rendered = Page(page)
    shown = {Path(src).name: (page.parent / src).resolve() for src in rendered.images}
    assert set(shown) >= {"bench.png", "bench-latency.png"}, rendered.images
    for name in ("bench.png", "bench-latency.png"):
        assert shown[name].read_bytes() == (DOCS / name).read_bytes()
        assert shown[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_api_reference_has_every_public_name(site: Path) -> None:
    rendered = Page(built(site, "api.md"))
    names = [f"writeturn.{n}" for n in writeturn.__all__]
    for module in PUBLIC_MODULES:
        mod = __import__(f"writeturn.{module}", fromlist=["__all__"])
        names += [f"writeturn.{module}.{n}" for n in mod.__all__]
    missing = [n for n in names if n not in rendered.ids]
    assert not missing, missing
    assert not re.search(r":(class|meth|func|mod|exc|attr):", rendered.text)  # roles as code
    text = words(rendered.text)
    for name in writeturn.__all__:  # each one's docstring, its first paragraph at least
        doc = inspect.getdoc(getattr(writeturn, name))
        assert doc, name
        assert words(doc.split("\n\n")[0]) in text, name


def test_the_api_reference_shows_signatures_and_docstrings(site: Path) -> None:
    source = built(site, "api.md").read_text()
    text = words(Page(built(site, "api.md")).text)
    start = source.index('id="writeturn.WriteSerializer.submit"')
    end = re.compile(r'<h\d id="writeturn\.').search(source, start + 1)
    assert end is not None
    submit = words(re.sub(r"<[^>]+>", "", source[start : end.start()]))
    for part in ("submit", "fn", "args", "key str None None", "timeout float None None"):
        assert part in submit, part
    for obj in (WriteSerializer.submit, WriteHandle, WriteHandle.cancel, WriteSerializer.run):
        doc = inspect.getdoc(obj)
        assert doc
        assert words(doc.split("\n\n")[0]) in text, obj


PYTHON_PAGES = [page for page in PAGES if blocks(DOCS / page, "python")]


@pytest.mark.parametrize("page", PYTHON_PAGES)
async def test_every_python_block_runs(
    db_url: str, page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may name sqlite:///app.db
    if page == "metrics.md":  # its last block sets the global MeterProvider: only for this test
        import opentelemetry.metrics._internal as otel
        from opentelemetry.util._once import Once

        monkeypatch.setattr(otel, "_METER_PROVIDER", None)
        monkeypatch.setattr(otel, "_METER_PROVIDER_SET_ONCE", Once())
    found = blocks(DOCS / page, "python")
    async with reader_namespace(db_url, page.removesuffix(".md")) as ns:
        ran = await run_blocks(found, ns, f"docs/{page}")
        assert len(ran) == len(found)
        await CHECKS.get(page, no_check)(ns)


async def no_check(ns: dict[str, Any]) -> None:
    pass


async def check_usage(ns: dict[str, Any]) -> None:
    assert ns["result"] == 10  # run(fn, *args)
    assert ns["handle"].outcome is Outcome.COMMITTED
    assert await balance_of(ns) == 100 + 10 + 10 - 1  # submit, run, the transaction block


async def check_journal(ns: dict[str, Any]) -> None:
    handle = ns["handle"]
    assert handle.outcome is Outcome.COMMITTED and handle.seq == 1 and not handle.duplicate
    assert await balance_of(ns) == 107  # the charge of order 7


async def check_migrations(ns: dict[str, Any]) -> None:
    env = ns["context"]
    assert env.configured["include_name"] is include_name
    assert env.configured["include_object"] is include_object
    async with ns["engine"].connect() as conn:  # the migration lock snippet, for real
        await conn.run_sync(ns["do_run_migrations"])
        await conn.rollback()
    assert env.migrations_run == 1


async def check_metrics(ns: dict[str, Any]) -> None:
    assert await balance_of(ns) == 120  # a deposit in each of the first two examples


CHECKS = {
    "usage.md": check_usage,
    "journal.md": check_journal,
    "migrations.md": check_migrations,
    "metrics.md": check_metrics,
}


@pytest.mark.postgres
def test_the_testing_page_is_a_working_conftest(
    pytester: pytest.Pytester, pg_admin_url: object
) -> None:
    """Its conftest (the writeturn_migrate override) and its test, run by pytest as a
    user's would be, on SQLite and on Postgres."""
    found = [code for _, code in blocks(DOCS / "testing.md", "python")]
    (conftest,) = [code for code in found if "def writeturn_migrate" in code]
    (tests,) = [code for code in found if "def test_" in code]
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_user=tests)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)


def command_lines(program: str) -> list[tuple[str, str]]:
    """(page:line, command) of every command of the pages' ``sh`` blocks that runs
    ``program``. A command goes on over a line that ends with a backslash and over the
    indented lines after it, as in a usage synopsis."""
    found = []
    for page in PAGES:
        for start, code in blocks(DOCS / page, "sh"):
            lines = code.splitlines()
            i = 0
            while i < len(lines):
                first, line = i, lines[i]
                while i + 1 < len(lines) and (line.endswith("\\") or lines[i + 1].startswith(" ")):
                    i += 1
                    line = line.removesuffix("\\").rstrip() + " " + lines[i].strip()
                if line.startswith(f"{program} "):
                    found.append((f"{page}:{start + 1 + first}", line))
                i += 1
    return found


def _flags_of(line: str) -> list[str]:
    return re.findall(r"(--[a-z][a-z-]*)", line.split("#")[0])


def _help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "writeturn", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


COMMAND_LINES = command_lines("writeturn")


def test_the_pages_show_the_command_line() -> None:
    """The command line page shows every command; so the test below checks them all."""
    shown = {line.split()[1] for where, line in COMMAND_LINES if where.startswith("cli.md")}
    assert shown == {"demo", "migrate", "doctor", "bench", "--version"}, shown


@pytest.mark.parametrize(("where", "line"), COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_the_command_lines_match_the_tools(where: str, line: str) -> None:
    command = line.split("#")[0].split()[1]
    if command == "--version":
        assert re.fullmatch(r"writeturn \S+\n", _help(command)), where
        return
    if command == "migrate":  # its actions, then each action's flags
        actions = re.findall(r"\b(upgrade|downgrade|current|history)\b", line)
        assert actions, where
        for action in actions:
            usage = _help("migrate", action, "--help")
            for flag in _flags_of(line):
                assert flag in usage, (where, action, flag)
        return
    usage = _help(command, "--help")
    for flag in _flags_of(line):
        assert flag in usage, (where, flag)


def test_the_alembic_line_runs_from_the_repository_root(tmp_path: Path) -> None:
    (found,) = command_lines("alembic")
    where, line = found
    assert where.startswith("migrations.md"), where
    words = line.split("#")[0].split()
    db = tmp_path / "app.db"
    words = [w.replace("sqlite:///app.db", f"sqlite:///{db}") for w in words]
    alembic = Path(sys.executable).with_name("alembic")
    done = subprocess.run(
        [str(alembic), *words[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (where, done.stderr)
    assert db.exists()
