"""The book's table of contents, as the page paths the tests check (shared by the book tests)."""

from __future__ import annotations

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def toc_files(toc: dict | None = None) -> list[str]:
    """Every page listed in `_toc.yml` (root first), as paths without a suffix, in reading order."""
    toc = toc or yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [str(pathlib.PurePosixPath(f).with_suffix("")) for f in files]


def toc_pages(toc: dict | None = None) -> list[str]:
    """The pages of :func:`toc_files` with their file suffix (``.ipynb`` or ``.md``), in reading order."""
    return [next(f"{p}{s}" for s in (".ipynb", ".md") if (ROOT / f"{p}{s}").exists()) for p in toc_files(toc)]


def chapter_notebooks(toc: dict | None = None) -> list[str]:
    """The chapters: the notebooks of ``notebooks/`` that the table of contents lists, in order."""
    return [p for p in toc_pages(toc) if p.startswith("notebooks/")]


def numbered_chapters(toc: dict | None = None) -> list[str]:
    """The notebooks of the numbered parts (chapter 1 onwards), in order."""
    toc = toc or yaml.safe_load((ROOT / "_toc.yml").read_text())
    numbered = {"parts": [part for part in toc.get("parts", []) if part.get("numbered")], "root": toc["root"]}
    return chapter_notebooks(numbered)
