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
from book_toc import toc_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEDGER = ROOT / "book" / "claims_ledger.ipynb"

# The claimed figure each row must quote, as the sources state it.
HEADLINE_CLAIMS = ["57x", "71x", "~4 MB vs ~70 KB", "70.272 / 327.68 / 516.1 KB", "2.25 groups", "93.3%",
                   "over 6x", "5.76x", "~6x", "7.1x", "28.4x", "7.1x, 24.9x", "~242 vs 1 FLOP/byte"]
# "6x" is worded three ways; each wording gets its own verdict.
SIX_X_VERDICTS = {"over 6x": "Wrong as worded", "5.76x": "Plausible, not reproduced", "~6x": "Not supported"}


def _ledger_table() -> str:
    nb = json.loads(LEDGER.read_text())
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            html = "".join(output.get("data", {}).get("text/html", []))
            if re.search(r"<th[^>]*>Claimed</th>", html) and re.search(r"<th[^>]*>Verdict</th>", html):
                return html
    raise AssertionError("the ledger has no stored claims table; run scripts/run_notebooks.py book/claims_ledger.ipynb")


def _rows() -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", _ledger_table(), flags=re.S)[1:]  # skip the header
    return [re.findall(r"<td>(.*?)</td>", row, flags=re.S) for row in rows]


def test_ledger_table_lists_every_headline_claim():
    rows = _rows()
    claimed = [row[1] for row in rows]
    assert sorted(claimed) == sorted(HEADLINE_CLAIMS), claimed
    assert all(len(row) == 4 for row in rows), "every row has four columns: claim (source), claimed, ours (how), verdict"
    assert all("<small>" in row[0] and "<small>" in row[2] for row in rows), "each claim names its source, each figure how"


def test_each_wording_of_six_x_has_its_verdict_and_named_assumptions():
    verdicts = {row[1]: row[3] for row in _rows() if row[1] in SIX_X_VERDICTS}
    for claimed, start in SIX_X_VERDICTS.items():
        assert verdicts[claimed].startswith(start), (claimed, verdicts[claimed])
    for claimed in ("5.76x", "~6x"):   # the figures rest on the model's assumptions: the row names them
        text = verdicts[claimed]
        assert "Assumptions" in text and "FP8 weights for 67B" in text and "4,096-token contexts" in text, text
    assert "GQA-8" in verdicts["over 6x"] and "mixture of experts" in verdicts["over 6x"]


TARGET_WORDING = re.compile(r"\btargets?\b[^\n]*\b(?:met|not met)\b|targets? met", flags=re.I)


@pytest.mark.parametrize("page", [p for p in toc_files() if (ROOT / f"{p}.ipynb").exists()])
def test_readers_see_no_maintainers_targets(page):
    """What the book shows is measurements and their comparison with the roofline, never whether a
    maintainers' target was met (recorded runs may still carry such fields: they must not be printed)."""
    nb = json.loads((ROOT / f"{page}.ipynb").read_text())
    shown = []
    for cell in nb["cells"]:
        shown.append("".join(cell["source"]) if cell["cell_type"] == "markdown" else "")
        for output in cell.get("outputs", []):
            shown.append("".join(output.get("text", "")))
            shown += ["".join(v) if isinstance(v, list) else str(v) for k, v in output.get("data", {}).items()
                      if k.startswith("text/")]
    hits = [m.group(0) for text in shown for m in TARGET_WORDING.finditer(text)]
    assert not hits, f"{page} shows maintainers' targets to readers: {hits}"


def test_pytest_collects_the_book_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "book" in options["testpaths"] and "book" not in options["norecursedirs"], \
        "the ledger in book/ must be validated by nbval like the chapters"


def test_part_iii_in_the_table_of_contents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = {part["caption"]: [c["file"] for c in part["chapters"]] for part in toc["parts"]}
    assert parts["Part III — The claims, checked"] == ["notebooks/07_deepseek_v3_layer",
                                                      "notebooks/08_six_times_faster"]
    assert list(parts).index("Part III — The claims, checked") > list(parts).index("Getting started")


def test_the_ledger_follows_the_numbered_parts_and_chapter_numbers_match_notebooks():
    """The ledger sums up every part, so it comes after the last one, unnumbered; the
    numbered chapters are the notebooks 01, 02, ... in order, so "chapter 9" is 09_*.ipynb."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    numbered = [c["file"] for part in toc["parts"] if part.get("numbered") for c in part["chapters"]]
    assert [f.split("/")[-1][:2] for f in numbered] == [f"{k:02d}" for k in range(1, len(numbered) + 1)], numbered
    assert all(f.startswith("notebooks/") for f in numbered), numbered
    captions = [part["caption"] for part in toc["parts"]]
    ledger = next(i for i, part in enumerate(toc["parts"]) if "book/claims_ledger" in
                  [c["file"] for c in part["chapters"]])
    assert not toc["parts"][ledger].get("numbered"), "the ledger is not a numbered chapter"
    last_part = max(i for i, caption in enumerate(captions) if caption.startswith("Part "))
    assert ledger == last_part + 1, captions
