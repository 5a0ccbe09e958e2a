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
