"""Write the Colab install cell, the first code cell of every notebook, from `_config.yml`.

    python scripts/sync_install_cell.py           # rewrite the cell where it differs
    python scripts/sync_install_cell.py --check   # exit 1 (listing them) if any notebook differs

The repository URL is set once, in `_config.yml` (`repository.url`); this script is the only
writer of the install cell, and `tests/test_book_static.py` checks that every notebook's cell is
what it would write. A notebook that needs optional dependencies names the package's extras in
its metadata, e.g. ``"mla_book": {"extras": ["hf"]}`` for `transformers`; the cell then installs
``mla_tutorial[hf]``. In Colab the cell installs with ``%pip`` (the running kernel's own pip) and,
on a runtime without a GPU, prints one hint about switching to one. Outside Colab it does nothing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "# Colab only: install the book's helper package (does nothing elsewhere)."


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")


def install_cell(extras: list[str] | tuple[str, ...] = ()) -> str:
    """The install cell's source for a notebook that needs ``extras`` of the package."""
    package = f"mla_tutorial[{','.join(extras)}]" if extras else "mla_tutorial"
    return "\n".join([
        MARKER,
        "import sys",
        'if "google.colab" in sys.modules:',
        f'    %pip -q install "{package} @ git+{repository_url()}"',
        "    import torch",
        "    if not torch.cuda.is_available():",
        '        print("No GPU in this runtime: the chapter runs at its small CPU sizes. For full sizes, "',
        '              "choose Runtime > Change runtime type > a GPU (e.g. T4), then run all cells again.")',
    ])


def notebook_extras(nb: nbformat.NotebookNode) -> list[str]:
    extras = nb.metadata.get("mla_book", {}).get("extras", [])
    if not isinstance(extras, list) or not all(isinstance(e, str) and e.isidentifier() for e in extras):
        raise ValueError(f"metadata mla_book.extras must be a list of extra names, got {extras!r}")
    return extras


def notebooks() -> list[pathlib.Path]:
    return sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.ipynb"))


def sync(path: pathlib.Path, check: bool) -> bool:
    """Make the notebook's first code cell the install cell; return whether it differed."""
    nb = nbformat.read(path, as_version=4)
    want = install_cell(notebook_extras(nb))
    code = [c for c in nb.cells if c.cell_type == "code"]
    if code and code[0].source.strip() == want and not code[0].outputs:
        return False
    if not check:
        if code and code[0].source.startswith(MARKER):
            code[0].source, code[0].outputs = want, []
        else:
            nb.cells.insert(next(i for i, c in enumerate(nb.cells) if c.cell_type == "code") if code else 1,
                            nbformat.v4.new_code_cell(want))
        nbformat.write(nb, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks whose cell differs")
    parser.add_argument("paths", nargs="*", type=pathlib.Path, help="notebooks (default: all)")
    args = parser.parse_args(argv)
    changed = [p for p in (args.paths or notebooks()) if sync(p.resolve(), args.check)]
    for p in changed:
        print(f"{'differs' if args.check else 'updated'}: {p.resolve().relative_to(ROOT)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
