"""The claims ledger (book/claims_ledger.ipynb) and Part III's place in the book.

nbval re-runs the ledger and compares its table with the stored one; these tests check what nbval
cannot: that the stored table still lists every headline claim, that the test suite collects the
ledger at all, and that the table of contents puts Part III's pages in order.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEDGER = ROOT / "book" / "claims_ledger.ipynb"

# The claimed figure each row must quote, as the sources state it.
HEADLINE_CLAIMS = ["57x", "71x", "~4 MB vs ~70 KB", "70.272 / 327.68 / 516.1 KB", "2.25 groups", "93.3%",
                   "5.76x", "7.1x", "28.4x", "7.1x, 24.9x", "~242 vs 1 FLOP/byte"]


def _ledger_table() -> str:
    nb = json.loads(LEDGER.read_text())
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            html = "".join(output.get("data", {}).get("text/html", []))
            if "<th>Claimed</th>" in html:
                return html
    raise AssertionError("the ledger has no stored claims table; run scripts/run_notebooks.py book/claims_ledger.ipynb")


def test_ledger_table_lists_every_headline_claim():
    rows = re.findall(r"<tr>(.*?)</tr>", _ledger_table(), flags=re.S)[1:]  # skip the header
    claimed = [re.findall(r"<td>(.*?)</td>", row, flags=re.S)[2] for row in rows]
    assert sorted(claimed) == sorted(HEADLINE_CLAIMS), claimed
    assert all(len(re.findall(r"<td>", row)) == 6 for row in rows), "every row has six columns"


def test_pytest_collects_the_book_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "book" in options["testpaths"] and "book" not in options["norecursedirs"], \
        "the ledger in book/ must be validated by nbval like the chapters"


def test_part_iii_in_the_table_of_contents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = {part["caption"]: [c["file"] for c in part["chapters"]] for part in toc["parts"]}
    files = parts["Part III — The claims, checked"]
    assert files[0] == "notebooks/07_deepseek_v3_layer" and files[-1] == "book/claims_ledger", files
    assert list(parts).index("Part III — The claims, checked") > list(parts).index("Getting started")
