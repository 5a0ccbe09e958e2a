"""Links between the book's pages work on the site, in Jupyter and in Colab.

A page links another page of the book with a relative Markdown link to its source file,
``[the next chapter](08_six_times_faster.ipynb)`` or ``[the ledger](../book/claims_ledger.ipynb)``.
On the site MyST turns such a link into a link to the built page (and `make book`, with warnings
as errors, fails on one it cannot resolve); in Jupyter it opens the notebook; in Colab it opens
the notebook next to the current one in the same repository. For that to hold everywhere, every
such link must name a file that exists, relative to the page, and that is in ``_toc.yml`` (a page
left out of the table of contents is not built), and no page may link a page of the book through
an absolute URL of the repository, GitHub or Colab (those bypass the site and repeat the
repository URL that ``_config.yml`` sets in one place). ``{doc}`` roles in Markdown pages must
name pages in the table of contents too.
"""

from __future__ import annotations

import json
import pathlib
import re
import urllib.parse

import pytest
import yaml
from book_toc import toc_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOC = set(toc_files())
REPO_URL = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")
REPO_PATH = urllib.parse.urlsplit(REPO_URL).path.strip("/")  # owner/name

MD_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_LINK = re.compile(r"<a\s[^>]*href=\"(?P<target>[^\"]+)\"")
DOC_ROLE = re.compile(r"\{doc\}`(?:[^`<]*<)?(?P<target>[^`>]+)>?`")
PAGE_SUFFIXES = (".ipynb", ".md")


def _pages() -> list[pathlib.Path]:
    out = []
    for page in sorted(TOC):
        for suffix in PAGE_SUFFIXES:
            path = ROOT / f"{page}{suffix}"
            if path.exists():
                out.append(path)
    return out


def _markdown(path: pathlib.Path) -> str:
    """A page's Markdown: the file itself, or a notebook's Markdown cells."""
    if path.suffix == ".md":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                       for c in cells if c["cell_type"] == "markdown")


def _links(text: str) -> list[str]:
    return [m.group("target") for pattern in (MD_LINK, HTML_LINK) for m in pattern.finditer(text)]


PAGES = _pages()
IDS = [str(p.relative_to(ROOT)) for p in PAGES]


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_relative_links_name_pages_of_the_book(path):
    bad = []
    for target in _links(_markdown(path)):
        parts = urllib.parse.urlsplit(target)
        if parts.scheme or parts.netloc or not parts.path:  # external, mailto:, or an anchor on this page
            continue
        file = (path.parent / urllib.parse.unquote(parts.path)).resolve()
        if not file.is_relative_to(ROOT):
            bad.append(f"{target}: points outside the repository")
        elif not file.exists():
            bad.append(f"{target}: no such file ({file.relative_to(ROOT)})")
        elif file.suffix in PAGE_SUFFIXES:
            page = str(file.relative_to(ROOT).with_suffix(""))
            if page not in TOC:
                bad.append(f"{target}: {page} is not in _toc.yml, so the site has no such page")
        else:
            bad.append(f"{target}: links a file that is not a page ({file.suffix}); the site does not copy it. "
                       "Link the file on GitHub instead, or the page that shows it")
    assert not bad, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_pages_link_each_other_relatively(path):
    absolute = []
    for target in _links(_markdown(path)):
        parts = urllib.parse.urlsplit(target)
        if not parts.netloc:
            continue
        own_repo = REPO_PATH.lower() in parts.path.lower()
        if own_repo and parts.path.endswith(PAGE_SUFFIXES):
            absolute.append(target)
    assert not absolute, (f"{path.relative_to(ROOT)} links pages of the book by absolute URL {absolute}; write a "
                          "relative link to the page's source file, e.g. [chapter 08](08_six_times_faster.ipynb), so "
                          "the site links its own page and the repository URL stays in _config.yml only")


@pytest.mark.parametrize("path", [p for p in PAGES if p.suffix == ".md"],
                         ids=[i for i, p in zip(IDS, PAGES) if p.suffix == ".md"])
def test_doc_roles_name_pages_in_the_toc(path):
    bad = []
    for m in DOC_ROLE.finditer(path.read_text()):
        target = m.group("target").strip()
        file = (path.parent / target).resolve() if not target.startswith("/") else ROOT / target.lstrip("/")
        page = str(file.relative_to(ROOT)) if file.is_relative_to(ROOT) else target
        if page not in TOC:
            bad.append(target)
    assert not bad, f"{path.relative_to(ROOT)}: {{doc}} roles name pages not in _toc.yml: {bad}"


def test_the_checks_find_links():
    """The patterns see the links chapter 07 and the ledger make (a check that finds none checks nothing)."""
    found = {str(p.relative_to(ROOT)): _links(_markdown(p)) for p in PAGES}
    assert "08_six_times_faster.ipynb" in found["notebooks/07_deepseek_v3_layer.ipynb"]
    assert "../book/claims_ledger.ipynb" in found["notebooks/07_deepseek_v3_layer.ipynb"]
    assert "../notebooks/08_six_times_faster.ipynb" in found["book/claims_ledger.ipynb"]
    assert [m.group("target") for m in DOC_ROLE.finditer("{doc}`../notebooks/00_setup` {doc}`the ledger <claims_ledger>`")] \
        == ["../notebooks/00_setup", "claims_ledger"]
