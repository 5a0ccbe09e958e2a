"""Freeze the book's prose into the text corpus that chapters 09 and 10 train on.

    python scripts/build_corpus.py              # writes mla_tutorial/corpus/book_prose.txt (+ .json)
    python scripts/build_corpus.py --check      # exit 1 if the snapshot differs from what would be built

The corpus is the Markdown of every page in `book/` (`*.md`) and the Markdown cells of every
notebook (`notebooks/*.ipynb`, `book/*.ipynb`), in sorted path order, each document introduced by
a line `<!-- path -->`. Nothing else (no code, no outputs). The output is deterministic: the same
sources give the same bytes.

The file is a frozen snapshot, shipped with the package so that a pip-installed package (Colab)
can train on it. The book's prose keeps changing; the recorded runs in `mla_tutorial/results/lm/`
were trained on the snapshot whose SHA-256 they record, so rebuild it only together with new runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "mla_tutorial" / "corpus" / "book_prose.txt"


def sources(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    files = [*root.glob("book/*.md"), *root.glob("book/*.ipynb"), *root.glob("notebooks/*.ipynb")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def document(path: pathlib.Path) -> str:
    """A page's Markdown: the file itself, or a notebook's Markdown cells separated by blank lines."""
    if path.suffix == ".md":
        text = path.read_text(encoding="utf-8")
    else:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                 for c in nb["cells"] if c["cell_type"] == "markdown"]
        text = "\n\n".join(c.strip("\n") for c in cells)
    return text.strip("\n") + "\n"


def build(root: pathlib.Path = ROOT) -> tuple[bytes, list[dict]]:
    parts, listing = [], []
    for path in sources(root):
        rel = path.relative_to(root).as_posix()
        doc = document(path)
        parts.append(f"<!-- {rel} -->\n{doc}")
        listing.append({"path": rel, "bytes": len(doc.encode("utf-8"))})
    return "\n".join(parts).encode("utf-8"), listing


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the committed snapshot; write nothing")
    p.add_argument("--out", default=str(OUT), help="output path (default: the package's snapshot)")
    args = p.parse_args(argv)
    data, listing = build()
    out = pathlib.Path(args.out)
    if args.check:
        same = out.is_file() and out.read_bytes() == data
        print(f"{out}: {'matches' if same else 'differs from'} the current prose ({len(data):,} bytes)")
        return 0 if same else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    manifest = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "sources": listing,
                "built_by": "scripts/build_corpus.py"}
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: {len(data):,} bytes from "
          f"{len(listing)} documents, sha256 {manifest['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
