"""The diagrams in book/images/ are drawn by scripts/draw_diagrams.py: committed files match it,
and each is a self-contained SVG (no external references, so it renders offline) with labels
large enough to read at a phone's width."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SVG_NS = "{http://www.w3.org/2000/svg}"


def _script():
    spec = importlib.util.spec_from_file_location("draw_diagrams", ROOT / "scripts" / "draw_diagrams.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


DRAW = _script()
RENDERED = DRAW.render_all()


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_committed_diagram_is_up_to_date_with_its_source(name):
    path = ROOT / "book" / "images" / name
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run python scripts/draw_diagrams.py"
    assert path.read_text() == RENDERED[name], (
        f"{path.relative_to(ROOT)} differs from scripts/draw_diagrams.py: run python scripts/draw_diagrams.py")


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_diagram_is_self_contained_and_readable(name):
    svg = RENDERED[name]
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    _, _, width, height = (float(v) for v in root.get("viewBox").split())
    assert 320 <= width <= 560 and height > 0, "sized for a page column (readable when a phone shrinks it)"
    assert root.find(f"{SVG_NS}title").text and root.find(f"{SVG_NS}desc").text, "title and description for screen readers"
    assert not re.search(r"(href|src)=\"(https?:|//)", svg) and "@import" not in svg, "nothing fetched from the network"
    texts = list(root.iter(f"{SVG_NS}text"))
    assert texts
    for text in texts:
        assert float(text.get("font-size")) >= DRAW.MIN_FONT, "".join(text.itertext())
        x = float(text.get("x"))
        assert 0 <= x <= width, f"label outside the drawing: {''.join(text.itertext())!r}"
    for rect in list(root.iter(f"{SVG_NS}rect"))[1:]:  # the first is the white page itself
        x, w = float(rect.get("x")), float(rect.get("width"))
        assert 0 < x and x + w < width, f"a box touches or crosses the edge: x={x}, width={w}"


def test_diagrams_show_the_package_sizes():
    from mla_tutorial import MLAConfig, kv_cache_elements

    v3 = MLAConfig.deepseek_v3()
    flow, modes = ("\n".join("".join(t.itertext()) for t in ET.fromstring(RENDERED[name]).iter(f"{SVG_NS}text"))
                   for name in ("mla_dataflow.svg", "mla_cache_modes.svg"))
    assert f"{v3.kv_lora_rank} + {v3.qk_rope_head_dim} = {kv_cache_elements(v3)} values per token" in flow
    assert f"{v3.hidden_size:,}" in flow and f"{v3.q_lora_rank:,}" in flow
    assert f"{kv_cache_elements(v3, 'expanded'):,} values" in modes
    assert modes.count(f"{kv_cache_elements(v3):,} values") == 2, "latent and absorbed cache the same latent"


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(DRAW, "IMAGES", tmp_path)
    assert DRAW.main(["--check"]) == 1, "missing files are stale"
    assert "out of date" in capsys.readouterr().err
    monkeypatch.setattr(DRAW, "ROOT", tmp_path)
    assert DRAW.main([]) == 0
    assert DRAW.main(["--check"]) == 0
