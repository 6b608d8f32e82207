"""The README and docs/ point at things that exist: every relative link reaches a file
(and a heading, for a `#anchor`), and every `make TARGET` they name is in the Makefile."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```")


def prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """The lines outside fenced code blocks, and those inside them."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif inside:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def anchors(page: Path) -> set[str]:
    """The ids GitHub gives a page's headings: lower case, punctuation but `-` and `_`
    dropped, spaces as hyphens, a repeated id suffixed -1, -2, ..."""
    count: dict[str, int] = {}
    ids = set()
    for line in prose_and_code(page.read_text())[0]:
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = count.get(slug, 0)
        count[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), re.M))


def named_make_targets(text: str) -> set[str]:
    """`make X` in inline code and at the start of a line of a code block (after any
    VAR=value words)."""
    prose, code = prose_and_code(text)
    spans = re.findall(r"`([^`]+)`", "\n".join(prose))    # a span may wrap a line
    found = set()
    for s in spans + code:
        m = re.match(r"\s*(?:[A-Z_]+=\S+\s+)*make\s+([a-z][\w-]*)", s)
        if m:
            found.add(m.group(1))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in LINK.findall("\n".join(prose_and_code(page.read_text())[0])):
        if re.match(r"[a-z]+:", target):              # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_make_target_named_exists(page):
    assert named_make_targets(page.read_text()) - make_targets() == set()


def test_the_readme_names_the_test_command_ci_runs():
    """CI (.ci/run) runs the README's test command on a fresh clone."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    code = prose_and_code((ROOT / "README.md").read_text())[1]
    assert any(re.match(r"make test(\s|$)", line) for line in code)
