"""Numbers in the book's prose come from cells: a static check of the pages' Markdown.

A number that a reader takes as a result (a ratio, a byte count, a time, an error) must be computed
by a cell and quoted with ``{glue:text}`name:fmt` `` (CONTRIBUTING.md, "Notebook conventions": numbers in the text come from cells), so the
text cannot drift from the code. This test reads every Markdown cell of the pages in GLUED_PAGES and
flags numbers typed by hand, in this scope:

- on the claims ledger and the book's introduction, every number of two or more digits;
- everywhere else, every number with three or more significant digits (``0.25`` and ``57`` are
  below the bar; ``0.125``, ``7168``, ``1.00`` and ``32,768`` are above it).

Not counted, because they are not results: text inside code spans and code fences (code, not
prose), inside math (``$...$``: equations state formulas and derivations; their numbers are the
configuration's widths, and the results they lead to are quoted, glued, in the prose next to
them), inside roles (``{cite}``, ``{numref}``, ``{doc}``, ``{glue:text}`` itself), link targets,
directive options (``:width: 90%``), HTML attributes, and years (1900 to 2099 as a plain integer).

Definitions are allowed without glue, by a rule, not by page:

- every integer value of a field or width property of the package's named model configurations
  (``MLAConfig`` and ``AttentionConfig`` presets): DeepSeek-V3's 7168, 128, 512, 1536, its query-key
  width 192 and cached width 576 are inputs quoted from the papers' configurations and fixed in
  ``mla_tutorial``, whose tests check them against those configurations;
- the datasheet figures of the package's accelerators (``mla_tutorial.roofline``: memory in GB,
  bandwidth in TB/s, peak TFLOP/s), inputs of the roofline model with their sources in the code;
- powers of two: sequence lengths, batch sizes and widths the book chooses (4096, 32,768);
- version numbers ("Python 3.10"), issue and pull-request numbers ("#848", "pull request 11446");
- SOURCE_FIGURES, a short, commented list of figures the sources state (quoted to be checked or
  used as inputs, not computed here).

GLUED_PAGES is every page of the table of contents; a page leaves it only by being listed in
NOT_YET_GLUED with a reason.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import pytest
from book_toc import toc_pages

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Pages not checked yet, each with the reason; remove a page from here once its numbers are glued.
NOT_YET_GLUED: dict[str, str] = {}
# Pages whose prose numbers are checked: every page of the book but those.
GLUED_PAGES = [p for p in toc_pages() if p not in NOT_YET_GLUED]
# Pages where every number of two or more digits counts (the book's headline claims).
CLAIM_PAGES = {"book/intro.md", "book/claims_ledger.ipynb"}

# Figures the sources state, quoted so that the book can check them or use them as inputs.
SOURCE_FIGURES = {
    "93.3", "5.76",      # DeepSeek-V2: KV cache reduced by 93.3%, maximum generation throughput 5.76x
    "2.25",              # DeepSeek-V2, Table 1: MLA's cache equals that of "GQA with only 2.25 groups"
    "236", "21", "67",   # DeepSeek-V2's 236B parameters, 21B active per token; DeepSeek 67B (a model's name)
    "671", "37",         # DeepSeek-V3's 671B parameters, 37B active
    "65,504",            # fp16's largest finite number (torch.finfo(torch.float16).max)
    "2,560",             # MiniCPM3-4B's hidden size, from its published config.json
    "132",               # an H100 SXM's streaming multiprocessors (NVIDIA's datasheet)
    "865",               # FlashMLA's write-up: an H800's practical bf16 peak under clock throttling, TFLOPS
    "656",               # FlashMLA's FP8 KV-cache row for DeepSeek-V3.2, bytes per token (its README and tests)
    "448",               # float8 e4m3's largest finite number (torch.finfo(torch.float8_e4m3fn).max)
}


def _config_integers() -> set[int]:
    """Integer fields and widths of the package's named configurations, and its accelerators'
    datasheet figures: inputs, not results."""
    from mla_tutorial import ATTENTION_PRESETS, MLAConfig, roofline

    configs = [MLAConfig.deepseek_v3(), MLAConfig.deepseek_v2(), MLAConfig.deepseek_v2_lite(),
               MLAConfig.kimi_k2(), MLAConfig.tiny(), *ATTENTION_PRESETS.values()]
    values: set[int] = set()
    for config in configs:
        values |= {v for v in dataclasses.asdict(config).values()
                   if isinstance(v, int) and not isinstance(v, bool) and v > 0}
        if isinstance(config, MLAConfig):
            values |= {config.qk_head_dim, config.latent_cache_dim}
    for chip in vars(roofline).values():
        if isinstance(chip, roofline.Accelerator):
            values |= {round(chip.memory_bytes / 1e9), round(chip.peak_flops_per_s / 1e12)}
    return values


def _datasheet_decimals() -> set[str]:
    from mla_tutorial import roofline

    return {f"{chip.bandwidth_bytes_per_s / 1e12:g}" for chip in vars(roofline).values()
            if isinstance(chip, roofline.Accelerator)}


_FENCE = re.compile(r"^(`{3,}|~{3,})(?!\{)[^\n]*\n.*?^\1[ \t]*$", flags=re.S | re.M)
_DIRECTIVE_HEAD = re.compile(r"^(`{3,}|~{3,})\{[^}]*\}[^\n]*$", flags=re.M)  # ```{figure} images/x.svg
_OPTION = re.compile(r"^[ \t]*:[\w-]+:[^\n]*$", flags=re.M)
_ROLE = re.compile(r"\{[\w:-]+\}`[^`]*`")
_CODE = re.compile(r"`[^`\n]+`")
_MATH = re.compile(r"\$\$.*?\$\$|(?<![\\$])\$[^$\n]+?\$", flags=re.S)
_LINK_TARGET = re.compile(r"\]\([^)]*\)|<[^>\n]+>|https?://\S+")
_NUMBER = re.compile(r"(?<![\w.,\-])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d|,\d{3}|\.\d)")
# "Section 4.2", "Fig. 6.1", "chapter 10", "Table 3", "Eq. (12)": references, not results.
_REFERENCE = re.compile(r"(section|sections|chapter|chapters|fig\.|figure|figures|table|eq\.|equation|"
                        r"part|step|exercise|§|#|pull request|issue|python|pytorch|torch|version)\s*\(?$",
                        flags=re.I)


def prose(markdown: str) -> str:
    """The text of a Markdown unit that a reader reads as prose (see the module docstring)."""
    for pattern in (_FENCE, _DIRECTIVE_HEAD, _OPTION, _ROLE, _CODE, _MATH, _LINK_TARGET):
        markdown = pattern.sub(" ", markdown)
    return markdown


def significant_digits(integer: str, fraction: str) -> int:
    digits = integer.replace(",", "").lstrip("0")
    if fraction:
        return len((digits + fraction[1:]).lstrip("0"))
    return len(digits.rstrip("0"))


def hand_typed_numbers(markdown: str, min_digits: int, allowed: set[int]) -> list[str]:
    found = []
    prose_text = prose(markdown)
    for match in _NUMBER.finditer(prose_text):
        integer, fraction = match.group(1), match.group(2) or ""
        if _REFERENCE.search(prose_text[max(0, match.start() - 20):match.start()]):
            continue
        text = integer + fraction
        value = int(integer.replace(",", ""))
        if not fraction and (1900 <= value <= 2099 and "," not in integer):
            continue  # a year
        if text in SOURCE_FIGURES or text in _datasheet_decimals():
            continue
        if not fraction and (value in allowed or (value >= 2 and value & (value - 1) == 0)):
            continue  # a configuration's value, or a power of two the book chose
        digits = significant_digits(integer, fraction)
        if min_digits == 2:
            digits = len((integer + fraction[1:]).replace(",", "").lstrip("0"))  # every digit counts
        if digits >= min_digits:
            found.append(text)
    return found


def _units(path: pathlib.Path) -> list[str]:
    if path.suffix == ".ipynb":
        return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                if c["cell_type"] == "markdown"]
    return [path.read_text()]


def test_pages_not_yet_glued_are_pages_of_the_book():
    stale = sorted(set(NOT_YET_GLUED) - set(toc_pages()))
    assert not stale, f"NOT_YET_GLUED names pages the table of contents does not list: {stale}"


def test_the_scanner_finds_hand_typed_results_and_skips_definitions():
    allowed = {7168, 128, 512}
    text = ("The cache shrinks 57.3x to 70,272 bytes, $2 \\times 7168 = 14336$, `x = 0.125`, "
            "width 7168, {cite}`deepseekv2`, {numref}`fig-04-spectrum`, 4096 tokens, in 2024, 0.25 s, 1.00.")
    assert hand_typed_numbers(text, 3, allowed) == ["57.3", "70,272", "1.00"]
    assert hand_typed_numbers("a 57x smaller cache, 0.25 s", 2, allowed) == ["57", "0.25"]


@pytest.mark.parametrize("rel", GLUED_PAGES)
def test_prose_numbers_come_from_cells(rel):
    path = ROOT / rel
    if not path.exists():
        pytest.skip(f"{rel} does not exist")
    allowed = _config_integers()
    min_digits = 2 if rel in CLAIM_PAGES else 3
    problems = [f"Markdown {'cell' if path.suffix == '.ipynb' else 'page'} {i}: {numbers}"
                for i, unit in enumerate(_units(path))
                if (numbers := hand_typed_numbers(unit, min_digits, allowed))]
    assert not problems, (f"{rel} types numbers by hand; compute each in a cell and quote it with "
                          "{glue:text}`name:fmt` (CONTRIBUTING.md):\n  " + "\n  ".join(problems))
