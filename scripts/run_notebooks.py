"""Execute notebooks top to bottom in a fresh kernel and store their outputs (and widget state).

    python scripts/run_notebooks.py                 # every notebook in notebooks/ and book/
    python scripts/run_notebooks.py notebooks/02_kv_cache.ipynb

Run it after changing a notebook or the package code it uses, so stored outputs match the code.
"""

import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(path: pathlib.Path) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1200, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    paths = [pathlib.Path(a).resolve() for a in argv] or (sorted((ROOT / "notebooks").glob("*.ipynb"))
                                                          + sorted((ROOT / "book").glob("*.ipynb")))
    for path in paths:
        print(f"{path.relative_to(ROOT)}: {run(path):.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
