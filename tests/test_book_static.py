"""Static checks of the book's sources: notebook conventions (CONTRIBUTING.md) and configuration.

These read the files only (no kernel, no build), so they run in a second:
- the table of contents and the pages it lists agree, and every notebook is in it;
- every notebook starts with the Colab install cell, installing from the repository URL in
  _config.yml, and that cell prints nothing;
- kernel python3; no stored error outputs; cells that assert are tagged, and cells whose output
  nbval compares (`nbval-check-output`) have output and no stderr;
- progress bars come from tqdm.auto and render in the static page (stored widget state);
- widgets in a notebook have their state stored, and pages with controls say that they only
  recompute in a live kernel.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
import re
import urllib.parse

import pytest
import yaml
from book_toc import chapter_notebooks, numbered_chapters, toc_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CHECK, IGNORE = "nbval-check-output", "nbval-ignore-output"
# Widget models a reader would try to move; the stored page cannot recompute them.
CONTROL_MODELS = re.compile(r"(Slider|Dropdown|Text|Checkbox|ToggleButtons|RadioButtons|Select|Button)"
                            r"(Model)?$")
MAX_NOTEBOOK_BYTES = 1_500_000
TOC_FILES = toc_files(TOC)
NOTEBOOKS = sorted({*ROOT.joinpath("notebooks").glob("*.ipynb"),
                    *(ROOT / f"{f}.ipynb" for f in TOC_FILES if (ROOT / f"{f}.ipynb").exists())})
NB_IDS = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _python(source: str) -> str:
    """Cell source with IPython magics and shell escapes blanked, so `ast` can parse it."""
    return "\n".join(line[:len(line) - len(line.lstrip())] + "pass"
                     if line.lstrip().startswith(("!", "%")) else line
                     for line in source.splitlines())


def _text(output: dict) -> str:
    text = output.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def _install_script():
    """scripts/sync_install_cell.py, the one writer of the install cell (imported by path)."""
    spec = importlib.util.spec_from_file_location("sync_install_cell", ROOT / "scripts" / "sync_install_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INSTALL = _install_script()


# --- configuration and table of contents ---------------------------------------------------
def test_repository_url_is_set_once_and_used_by_the_launch_buttons():
    repo = CONFIG["repository"]
    parts = urllib.parse.urlsplit(repo["url"])
    assert parts.scheme == "https" and parts.netloc == "github.com", repo["url"]
    assert len(parts.path.strip("/").split("/")) == 2, f"expected github.com/OWNER/REPO: {repo['url']}"
    assert repo.get("branch"), "_config.yml repository.branch is needed for the launch links"
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert CONFIG["html"]["use_download_button"] is True


def test_toc_pages_exist_and_every_notebook_is_listed():
    missing = [f for f in TOC_FILES
               if not any((ROOT / f"{f}{s}").exists() for s in (".md", ".ipynb"))]
    assert not missing, f"_toc.yml lists pages that do not exist: {missing}"
    assert len(TOC_FILES) == len(set(TOC_FILES)), "a page is listed twice in _toc.yml"
    unlisted = [str(p.relative_to(ROOT)) for p in ROOT.joinpath("notebooks").glob("*.ipynb")
                if str(p.relative_to(ROOT).with_suffix("")) not in TOC_FILES]
    assert not unlisted, f"notebooks missing from _toc.yml (they would not be in the book): {unlisted}"


def test_toc_parts_and_back_matter():
    captions = [part.get("caption") for part in TOC.get("parts", [])]
    assert captions[0] == "Getting started", captions
    for page in ("book/setup", "book/glossary"):
        assert page in TOC_FILES, f"{page} is missing from _toc.yml"
    assert captions[-1] == "Back matter", captions
    assert [c["file"] for c in TOC["parts"][-1]["chapters"]] == ["book/explorer", "book/find_the_bug", "book/references"]


def test_one_bibliography_on_the_references_page():
    pages = [p for p in ROOT.joinpath("book").rglob("*.md") if "{bibliography}" in p.read_text()]
    assert [str(p.relative_to(ROOT)) for p in pages] == ["book/references.md"]


def test_glossary_defines_every_symbol():
    text = (ROOT / "book" / "glossary.md").read_text()
    blocks = re.findall(r"```\{glossary\}\n(.*?)```", text, flags=re.S)
    terms = {line.strip() for block in blocks for line in block.splitlines()
             if line and not line.startswith(" ")}
    wanted = {"d_model", "n_h", "d_h", "d_h_R", "d_c", "d_c_q", "d_v", "c_KV", "c_Q", "k_R", "q_R",
              "W_DQ", "W_UQ", "W_QR", "W_DKV", "W_UK", "W_UV", "W_KR", "W_O"}
    assert wanted <= terms, f"glossary lacks {sorted(wanted - terms)}"


def test_glossary_values_match_the_package():
    from mla_tutorial import MLAConfig

    v3 = MLAConfig.deepseek_v3()
    text = (ROOT / "book" / "glossary.md").read_text()
    for field in ("hidden_size", "num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                  "kv_lora_rank", "q_lora_rank", "v_head_dim"):
        row = re.search(rf"^\|[^\n]*`{field}`[^\n]*\| (\d+) \|$", text, flags=re.M)
        assert row, f"no row for {field} in the glossary's table of sizes"
        assert int(row.group(1)) == getattr(v3, field), f"glossary: {field} = {row.group(1)}"


# --- notebooks ------------------------------------------------------------------------------
@pytest.fixture(params=NOTEBOOKS, ids=NB_IDS)
def notebook(request) -> tuple[pathlib.Path, dict]:
    return request.param, _load(request.param)


def test_first_code_cell_is_the_colab_cell(notebook):
    path, nb = notebook
    cells = _code_cells(nb)
    assert cells, f"{path.name} has no code cells"
    first = cells[0]
    want = INSTALL.install_cell(nb["metadata"].get("mla_book", {}).get("extras", []))
    assert _source(first).strip() == want, (
        f"{path.name}: the first code cell must be the Colab install cell; run "
        f"`python scripts/sync_install_cell.py`, which writes it from _config.yml:\n{want}")
    assert not first.get("outputs"), f"{path.name}: the Colab cell printed something outside Colab"


def test_install_cell_takes_the_repository_url_from_the_config_only():
    url = CONFIG["repository"]["url"].rstrip("/")
    cell = INSTALL.install_cell(["hf"])
    assert f'"mla_tutorial[hf] @ git+{url}"' in cell and "%pip" in cell, cell
    host = urllib.parse.urlsplit(url).path.strip("/").split("/")[0]
    hard_coded = [p.name for p in NOTEBOOKS for c in _code_cells(_load(p))[1:]
                  if f"github.com/{host}" in _source(c)]
    assert not hard_coded, f"notebooks hard-code the repository URL outside the install cell: {hard_coded}"


def test_notebooks_that_import_transformers_install_the_hf_extra(notebook):
    path, nb = notebook
    uses = any(re.search(r"^\s*(import transformers|from transformers)|\"hf\"", _source(c), re.M)
               for c in _code_cells(nb))
    extras = nb["metadata"].get("mla_book", {}).get("extras", [])
    if uses:
        assert "hf" in extras, f"{path.name} uses transformers: add \"hf\" to its metadata mla_book.extras"


def test_kernel_is_python3(notebook):
    path, nb = notebook
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", path.name


def test_notebook_is_executed_without_errors(notebook):
    path, nb = notebook
    code = _code_cells(nb)
    unexecuted = [i for i, c in enumerate(code) if _source(c).strip() and c.get("execution_count") is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} have no stored run (make notebooks)"
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(code)
              for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"{path.name}: stored error outputs {errors}"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, (
        f"{path.name} is {path.stat().st_size:,} bytes; keep notebooks under {MAX_NOTEBOOK_BYTES:,}")


def test_claim_cells_are_tagged_and_assert(notebook):
    path, nb = notebook
    problems = []
    for i, cell in enumerate(_code_cells(nb)):
        tags = set(cell.get("metadata", {}).get("tags", []))
        tree = ast.parse(_python(_source(cell)))
        asserts = [n for n in tree.body if isinstance(n, ast.Assert)]
        if {CHECK, IGNORE} <= tags:
            problems.append(f"code cell {i} has both {CHECK} and {IGNORE}")
        if asserts and not tags & {CHECK, IGNORE}:
            problems.append(f"code cell {i} asserts a claim but is tagged neither {CHECK} nor {IGNORE}")
        if CHECK in tags and cell.get("execution_count") is not None:
            outputs = cell.get("outputs", [])
            streams = [o for o in outputs if o["output_type"] == "stream"]
            if not (any(o["name"] == "stdout" and _text(o).strip() for o in streams)
                    or any(o["output_type"] in ("execute_result", "display_data") for o in outputs)):
                problems.append(f"claim cell {i} ({CHECK}) shows nothing for nbval to compare")
            if any(o["name"] == "stderr" for o in streams):
                problems.append(f"claim cell {i} writes to stderr (warnings differ between machines)")
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_progress_bars_use_tqdm_auto_and_render_statically(notebook):
    path, nb = notebook
    state = nb["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    problems = []
    for i, cell in enumerate(_code_cells(nb)):
        src = _source(cell)
        if re.search(r"^\s*(from tqdm import|import tqdm\b|from tqdm\.(notebook|std) import)", src, re.M):
            problems.append(f"code cell {i} imports tqdm directly; use `from tqdm.auto import tqdm`, "
                            "which draws a widget in notebooks and text elsewhere")
        for out in cell.get("outputs", []):
            text = _text(out) if out["output_type"] == "stream" else ""
            if re.search(r"\d+%\|.*\| *\d+/\d+ \[", text):
                problems.append(f"code cell {i} stored a text progress bar in its {out.get('name')} "
                                "output (it renders as a stack of partial bars)")
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view and view["model_id"] not in state:
                problems.append(f"code cell {i} shows a widget whose state is not stored; "
                                "execute with scripts/run_notebooks.py (store_widget_state)")
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_interactive_widgets_say_they_need_a_live_kernel(notebook):
    path, nb = notebook
    state = nb["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    controls = sorted({m["model_name"] for m in state.values()
                       if CONTROL_MODELS.search(m.get("model_name", ""))
                       and m.get("model_module") == "@jupyter-widgets/controls"})
    if not controls:
        pytest.skip(f"{path.name} has no interactive controls")
    prose = " ".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown").lower()
    assert "live kernel" in prose or "colab or jupyter" in prose, (
        f"{path.name} has {controls}; say in the text that they recompute only in a live kernel "
        "(Colab or Jupyter), since the web page shows their stored state")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {r for r in pip if not r.startswith("-")}  # options (index URL, -e .) are not requirements
    assert listed == wanted, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


# --- glossary links, figure captions, widget state ---------------------------------------------
# Every chapter links the glossary terms it uses and captions its figures (CONTRIBUTING.md,
# "Glossary links", "Figures"); so do the back-matter pages that use the terms.
GLOSSARY_LINKED_PAGES = [*chapter_notebooks(TOC), "book/explorer.md", "book/find_the_bug.ipynb"]
FIGURE_CAPTIONED_PAGES = chapter_notebooks(TOC)
GLOSSARY = ROOT / "book" / "glossary.md"
# How pages write each glossary term in LaTeX (a term's code name, e.g. `d_c`, counts as a use when
# it is a whole inline code span). Every term of book/glossary.md needs an entry.
_NB = r"(?<![A-Za-z0-9])"  # not inside a longer name
GLOSSARY_FORMS = {
    "d_model": r"d_\\text\{model\}|d_\{\\text\{model\}\}",
    "n_h": _NB + r"n_h(?![\w^])|" + _NB + r"n_\{h\}",
    "n_kv": _NB + r"n_\{kv\}|" + _NB + r"n_\\text\{kv\}",
    "n_layers": _NB + r"n_\\text\{layers\}|" + _NB + r"n_\{\\text\{layers\}\}",
    "d_h": _NB + r"d_h(?![\w^'])|" + _NB + r"d_\{h\}(?![\w^'])",
    "d_h_R": _NB + r"d_h\^\{?R\}?|" + _NB + r"d\^\{?R\}?_h|" + _NB + r"d_\{h\}\^\{?R\}?",
    "d_c": _NB + r"d_c(?![\w'^])|" + _NB + r"d_\{c\}(?![\w'^])",
    "d_c_q": _NB + r"d_c'|" + _NB + r"d_c\^\{?\\prime\}?|" + _NB + r"d'_c|" + _NB + r"d_\{c\}'",
    "d_v": _NB + r"d_v(?!\w)|" + _NB + r"d_\{v\}",
    "c_KV": _NB + r"c\^\{KV\}|" + _NB + r"c_\{KV\}",
    "c_Q": _NB + r"c\^\{?Q\}?(?![A-Za-z0-9])",
    "k_R": _NB + r"k\^\{?R\}?(?![A-Za-z0-9])",
    "q_R": _NB + r"q\^\{?R\}?(?![A-Za-z0-9])",
    "W_Q": _NB + r"W_\{?Q\}?(?![A-Za-z0-9])",
    "W_K": _NB + r"W_\{?K\}?(?![A-Za-z0-9])",
    "W_V": _NB + r"W_\{?V\}?(?![A-Za-z0-9])",
    "W_O": _NB + r"W[_^]\{?O\}?(?![A-Za-z0-9])",
    **{f"W_{m}": _NB + rf"W[_^]\{{{m}\}}" for m in ("DQ", "UQ", "QR", "DKV", "KR", "UK", "UV")},
}


def _glossary_entries() -> dict[str, str]:
    """Every name in the glossary's term lists -> the entry's first name (its canonical term)."""
    names: dict[str, str] = {}
    for block in re.findall(r"```\{glossary\}\n(.*?)```", GLOSSARY.read_text(), flags=re.S):
        entry = None
        for line in block.splitlines():
            if not line.strip():
                entry = None
            elif not line.startswith(" "):
                entry = entry or line.strip()
                names[line.strip()] = entry
    return names


def _markdown_units(path: pathlib.Path) -> list[str]:
    """The prose of a page, in reading order: a notebook's Markdown cells, a Markdown page's sections."""
    if path.suffix == ".ipynb":
        return [_source(c) for c in _load(path)["cells"] if c["cell_type"] == "markdown"]
    return re.split(r"\n(?=#{1,6} )", path.read_text())


_CODE_FENCE = re.compile(r"^(`{3,}|~{3,})(?!\{)[^\n]*\n.*?^\1\s*$", flags=re.S | re.M)  # not a directive
_ROLE = re.compile(r"(?<!`)\{[\w:-]+\}`[^`]*`")  # not `{term}` written as code
_TERM = re.compile(r"(?<!`)\{term\}`([^`]*)`")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")


def _term_uses(text: str, names: dict[str, str]) -> tuple[set[str], set[str], list[str]]:
    """(terms linked, terms used, unknown link targets) in one unit of prose."""
    text = _CODE_FENCE.sub("", text)
    linked, unknown = set(), []
    for target in _TERM.findall(text):
        target = re.sub(r"^.*<(.*)>$", r"\1", target.strip(), flags=re.S).strip()  # {term}`text <name>`
        if target in names:
            linked.add(names[target])
        else:
            unknown.append(target)
    text = _ROLE.sub(" ", text)
    used = {names[span] for span in _CODE_SPAN.findall(text) if span in names}
    text = _CODE_SPAN.sub(" ", text)
    used |= {term for term, form in GLOSSARY_FORMS.items() if re.search(form, text)}
    return linked, used | linked, unknown


def test_glossary_forms_cover_every_term():
    entries = set(_glossary_entries().values())
    assert set(GLOSSARY_FORMS) == entries, (
        f"GLOSSARY_FORMS lacks {sorted(entries - set(GLOSSARY_FORMS))}; "
        f"names no glossary term: {sorted(set(GLOSSARY_FORMS) - entries)}")


@pytest.mark.parametrize("page", [f for f in TOC_FILES if f != "book/glossary"])
def test_term_links_name_glossary_entries(page):
    path = next(p for p in (ROOT / f"{page}.ipynb", ROOT / f"{page}.md") if p.exists())
    names = _glossary_entries()
    unknown = [t for unit in _markdown_units(path) for t in _term_uses(unit, names)[2]]
    assert not unknown, f"{path.name} links {unknown}, which book/glossary.md does not define"


@pytest.mark.parametrize("page", [f for f in TOC_FILES if f != "book/glossary"])
def test_glossary_terms_are_linked_where_first_used(page):
    path = next(p for p in (ROOT / f"{page}.ipynb", ROOT / f"{page}.md") if p.exists())
    rel = str(path.relative_to(ROOT))
    if rel not in GLOSSARY_LINKED_PAGES:
        pytest.skip(f"{rel} is not in GLOSSARY_LINKED_PAGES yet")
    names = _glossary_entries()
    first_use, first_link = {}, {}
    for i, unit in enumerate(_markdown_units(path)):
        linked, used, _ = _term_uses(unit, names)
        for term in used:
            first_use.setdefault(term, i)
        for term in linked:
            first_link.setdefault(term, i)
    kind = "Markdown cell" if path.suffix == ".ipynb" else "section"
    problems = [f"{term}: first used in {kind} {i}, " + (f"first linked in {kind} {first_link[term]}"
                                                         if term in first_link else "never linked")
                for term, i in sorted(first_use.items()) if first_link.get(term) != i]
    assert not problems, (f"{rel}: link each glossary term with {{term}}`name` where the page first uses "
                          "it:\n  " + "\n  ".join(problems))


def _shows_image(cell: dict) -> bool:
    return any(k.startswith("image/") for o in cell.get("outputs", []) for k in o.get("data", {}))


@pytest.mark.parametrize("rel", FIGURE_CAPTIONED_PAGES)
def test_figures_are_numbered_and_captioned(rel):
    path = ROOT / rel
    nb = _load(path)
    number = path.name[:2]
    names, problems = [], []
    for i, cell in enumerate(_code_cells(nb)):
        figure = cell.get("metadata", {}).get("mystnb", {}).get("figure")
        if not _shows_image(cell):
            if figure:
                problems.append(f"code cell {i} has a figure caption but shows no image")
            continue
        if not (figure and figure.get("caption") and figure.get("name")):
            problems.append(f"code cell {i} shows a figure without metadata mystnb.figure caption and name")
            continue
        names.append(figure["name"])
        if not figure["name"].startswith(f"fig-{number}-"):
            problems.append(f"code cell {i}: figure name {figure['name']!r} should start with fig-{number}-")
        others = [o["output_type"] if o["output_type"] == "stream" else sorted(o.get("data", {}))
                  for o in cell["outputs"] if not any(k.startswith("image/") for k in o.get("data", {}))]
        if others:
            problems.append(f"code cell {i} shows {others} besides its figure; print in another cell")
    prose = " ".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    unreferenced = [n for n in names if f"{{numref}}`{n}`" not in prose]
    if unreferenced:
        problems.append(f"figures the text never refers to with {{numref}}: {unreferenced}")
    assert not problems, f"{rel}:\n  " + "\n  ".join(problems)


def test_stored_widget_state_is_ipywidgets_8s(notebook):
    # The book's pages draw stored widgets with @jupyter-widgets/html-manager 1.x, which reads the
    # state ipywidgets 8 writes (controls and base models 2.x); ipywidgets 7 writes 1.x models.
    path, nb = notebook
    state = nb["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    old = sorted({f"{m['model_module']} {m['model_module_version']}" for m in state.values()
                  if m.get("model_module") in ("@jupyter-widgets/controls", "@jupyter-widgets/base")
                  and not str(m.get("model_module_version", "")).startswith("2.")})
    assert not old, (f"{path.name} stores widget state from ipywidgets 7 ({old}); re-execute it "
                     "(make notebooks) in the dev environment, which installs ipywidgets 8")


# --- headings and exercises ---------------------------------------------------------------------
def _numbered_pages() -> list[str]:
    """Pages in the numbered parts of _toc.yml (their sections are numbered by the build)."""
    files = [c["file"] for part in TOC.get("parts", []) if part.get("numbered") for c in part["chapters"]]
    return [f"{f}{s}" for f in files for s in (".ipynb", ".md") if (ROOT / f"{f}{s}").exists()]


# Unnumbered pages whose headings are checked as well (the ledger's sections are referred to by name).
HEADING_CHECKED_PAGES = ["book/claims_ledger.ipynb"]
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.*)$", flags=re.M)
_HAND_NUMBER = re.compile(r"^(\d+(\.\d+)*\.?|[IVX]+\.)[ \t]")  # "1. ", "2.3 ", "IV. "


@pytest.mark.parametrize("rel", _numbered_pages() + HEADING_CHECKED_PAGES)
def test_headings_carry_no_hand_typed_numbers(rel):
    # The build numbers the sections of numbered parts ("6.2."); a typed number renders twice ("6.2. 2.").
    units = _markdown_units(ROOT / rel)
    found = [f"{kind} {i}: {m.group(0)!r}" for i, unit in enumerate(units)
             for kind in ["Markdown cell" if rel.endswith(".ipynb") else "section"]
             for m in _HEADING.finditer(_CODE_FENCE.sub("", unit)) if _HAND_NUMBER.match(m.group(2))]
    assert not found, (f"{rel}: headings with a typed number (the build numbers them; refer to a section "
                       "with a label and {numref}):\n  " + "\n  ".join(found))


# Every numbered chapter ends with exercises in sphinx-exercise's form (CONTRIBUTING.md, "Exercises").
EXERCISE_PAGES = numbered_chapters(TOC)
_EXERCISE = re.compile(r"^`{3,}\{exercise\}[^\n]*\n:label: (\S+)", flags=re.M)
_SOLUTION = re.compile(r"^`{3,}\{solution(?:-start)?\} (\S+)\n((?::[\w-]+:[^\n]*\n)*)", flags=re.M)


@pytest.mark.parametrize("rel", EXERCISE_PAGES)
def test_chapter_exercises_are_numbered_with_hidden_solutions(rel):
    path = ROOT / rel
    if not path.exists():
        pytest.skip(f"{rel} does not exist")
    text = "\n".join(_markdown_units(path))
    labels = _EXERCISE.findall(text)
    solutions = {label: options for label, options in _SOLUTION.findall(text)}
    number = path.name[:2]
    problems = [f"label {label!r} should be ex-{number}-<name>" for label in labels
                if not re.fullmatch(rf"ex-{number}-[a-z0-9-]+", label)]
    problems += [f"exercise {label} has no solution" for label in labels if label not in solutions]
    problems += [f"solution for {label}, which no exercise on the page has" for label in solutions
                 if label not in labels]
    problems += [f"the solution of {label} is not hidden (:class: dropdown)" for label, options
                 in solutions.items() if "dropdown" not in options]
    if re.search(r"\{admonition\} Solution", text):
        problems.append("a solution written as an admonition; use {solution} (CONTRIBUTING.md)")
    if not labels:
        problems.append("no {exercise}: the chapter should end with exercises")
    assert len(labels) == len(set(labels)), f"{rel}: an exercise label is used twice: {labels}"
    assert not problems, f"{rel}:\n  " + "\n  ".join(problems)
