"""The documentation: a short README front page whose links resolve, and a MkDocs site that builds with --strict
(no broken link or anchor, every page in the nav)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 20_000


@pytest.fixture
def mkdocs_installed() -> None:
    """The site's tests need mkdocs, which scripts/setup.sh installs: without it they fail, saying so (a skip would
    let a broken site pass unnoticed)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: run scripts/setup.sh (or pip install -e '.[docs]').", pytrace=False)


def _without_fences(text: str) -> str:
    return re.sub(r"(?ms)^\s*```.*?^\s*```[^\n]*$", "", text)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where a bracket is not a link."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def _links(text: str) -> list[str]:
    """Targets of inline links and images: [text](target) and ![alt](target), titles dropped."""
    return [m.group(1).split()[0] for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+(?:\s+\"[^\"]*\")?)\)", _prose(text))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*_]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", _without_fences(path.read_text(encoding="utf-8")))
    return {_slug(h) for h in headings}


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def _build(config_dir: Path, site: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the package, for a copy
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=config_dir,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8"))
    assert n <= README_LIMIT, f"README.md has {n} characters; move details to a page in docs/ (limit {README_LIMIT})."


def test_readme_links_and_images_resolve():
    text = README.read_text(encoding="utf-8")
    targets = _links(text)
    assert any(t.startswith("docs/") for t in targets), "the README links to no docs page"
    broken = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (README.parent / path) if path else README
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading in {file.name})")
    assert not broken, "README.md links to: " + ", ".join(broken)


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = set(_nav_pages(config.get("nav")))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages, "docs/ holds no pages"
    assert not pages - nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert not nav - pages, f"nav entries without a page: {sorted(nav - pages)}"


@pytest.mark.usefixtures("mkdocs_installed")
def test_site_builds_strict(tmp_path):
    r = _build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8").count("doc-object") > 10


@pytest.mark.usefixtures("mkdocs_installed")
def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The site's settings really catch a broken link (a copy of the site with one added)."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a", encoding="utf-8") as f:
        f.write("\nSee [a page that is not there](no-such-page.md).\n")
    r = _build(tmp_path, tmp_path / "site")
    assert r.returncode != 0
    assert "no-such-page.md" in r.stdout + r.stderr
