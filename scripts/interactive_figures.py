"""Figures that move in the static book, with no kernel (a Sphinx extension; see _config.yml).

A page embeds one with a directive (MyST Markdown, in a `.md` page or a notebook's Markdown cell):

    ```{interactive-figure} yarn-ramp
    ```

with, optionally, ``:name: fig-06-yarn-ramp`` (a label for ``{numref}``), ``:caption: ...`` (replaces
the default caption) and ``:preset: DeepSeek-V2`` (the model it opens on). The kinds:

- ``cache-explorer``: KV cache per token, the largest batch that fits and roofline throughput
  for any attention shape, dtype and hardware;
- ``yarn-ramp``: YaRN's per-pair frequency ramp and attention temperature;
- ``absorb-crossover``: when absorbed MLA costs fewer FLOPs than expanding the cache.

The directive writes an empty ``<div class="interactive-figure" data-figure="KIND">`` inside a
numbered figure; ``book/_static/interactive-figures.js`` (plain JavaScript and SVG, loaded only on
pages with a figure) draws the controls and the plot. Presets and constants come from the
``mla_tutorial`` package, written at build time into ``_static/interactive-figures-data.js``
(:func:`figure_data`), so nothing is retyped; ``tests/test_interactive_figures.py`` moves the
controls in a browser and checks the numbers shown against the package's functions.

Their styles are in ``book/_static/book.css`` (on every page, through _config.yml).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

ROOT = pathlib.Path(__file__).resolve().parents[1]
STATIC = ROOT / "book" / "_static"
DATA_JS = "interactive-figures-data.js"
FIGURES_JS = "interactive-figures.js"

#: kind -> default caption (a page may give its own with :caption:).
KINDS = {
    "cache-explorer": "KV cache, largest batch and decode throughput for an attention shape on given "
                      "hardware (roofline model; the hardware figures are datasheet assumptions). "
                      "Pick a preset, then change any field.",
    "yarn-ramp": "YaRN's frequency ramp: the RoPE pairs that rotate many times within the original "
                 "context keep their frequency, the slow ones are divided by the scale factor, and a "
                 "linear ramp blends the pairs in between.",
    "absorb-crossover": "Absorb or expand: FLOPs of one MLA layer for T new queries over S cached "
                        "tokens, on the absorbed path and on the path that expands the cache into "
                        "per-head keys and values.",
}


# --- the data the figures use, from the package ------------------------------------------------
def _mla_presets():
    """Every MLAConfig preset: its classmethods that take no arguments and return an MLAConfig."""
    from mla_tutorial import MLAConfig

    presets = []
    for name, member in vars(MLAConfig).items():
        if isinstance(member, classmethod) and not inspect.signature(getattr(MLAConfig, name)).parameters:
            config = getattr(MLAConfig, name)()
            if isinstance(config, MLAConfig):
                presets.append(config)
    return presets


def figure_data() -> dict:
    """Presets, hardware and dtype sizes for the figures, read from mla_tutorial (JSON-ready)."""
    import torch

    from mla_tutorial import ATTENTION_PRESETS, bytes_per_element
    from mla_tutorial import roofline as rf

    # Whole-model parameters for the presets the roofline module models (the rest have none).
    models = {"DeepSeek-67B": rf.deepseek_67b(), "DeepSeek-V2": rf.deepseek_v2(), "DeepSeek-V3": rf.deepseek_v3()}
    presets = []
    for config in _mla_presets():
        presets.append({
            "name": config.name, "kind": "mla", "layers": config.num_hidden_layers,
            "n_h": config.num_attention_heads, "d_c": config.kv_lora_rank, "d_h_R": config.qk_rope_head_dim,
            "d_h": config.qk_nope_head_dim, "d_v": config.v_head_dim, "rope_theta": config.rope_theta,
            "rope_scaling": config.rope_scaling, "softmax_scale": config.softmax_scale})
    for config in ATTENTION_PRESETS.values():
        presets.append({
            "name": config.name, "kind": "standard", "layers": config.num_hidden_layers,
            "n_h": config.num_attention_heads, "n_kv": config.num_key_value_heads, "d_h": config.head_dim})
    by_name = {p["name"]: p for p in presets}
    for name, model in models.items():
        preset = by_name[name]
        # the roofline's model must be the preset's shape, or the explorer would mix two models
        assert model.num_layers == preset["layers"], (name, model.num_layers)
        preset["model"] = {"total_params": model.total_params, "active_params": model.active_params,
                           "weight_bytes_per_param": model.weight_bytes_per_param,
                           "cache_bytes_per_element": model.cache_bytes_per_element, "source": model.source}
    node = rf.paper_node()
    return {
        "presets": presets,
        "accelerators": [dataclasses.asdict(a) for a in (rf.H800, rf.H100_SXM, rf.H200)],
        "node": {"accelerator": node.accelerator.name, "count": node.count,
                 "usable_memory_fraction": node.usable_memory_fraction},
        "dtypes": [{"name": "fp32", "bytes": bytes_per_element(torch.float32)},
                   {"name": "bf16", "bytes": bytes_per_element(torch.bfloat16)},
                   {"name": "fp8", "bytes": bytes_per_element(torch.float8_e4m3fn)},
                   {"name": "6-bit (DeepSeek-V2's quantized cache)", "bytes": bytes_per_element(0.75)}],
        "paper_context": rf.PAPER_CONTEXT,
    }


def data_js() -> str:
    return ("/* Written by scripts/interactive_figures.py from the mla_tutorial package; do not edit. */\n"
            f"window.MLA_BOOK_DATA = {json.dumps(figure_data(), indent=1, sort_keys=True)};\n")


# --- the directive -----------------------------------------------------------------------------
class interactive_figure(nodes.General, nodes.Element):
    """Where the JavaScript draws one figure."""


def visit_html(self, node):
    options = json.dumps({"preset": node["preset"]} if node.get("preset") else {})
    self.body.append(f'<div class="interactive-figure" data-figure="{node["kind"]}" '
                     f"data-options='{self.encode(options)}'>"
                     '<p class="interactive-figure-noscript">This figure needs JavaScript.</p></div>')
    raise nodes.SkipNode


def skip(self, node):  # other builders (LaTeX, text): the caption says what the figure shows
    raise nodes.SkipNode


class InteractiveFigure(SphinxDirective):
    required_arguments = 1
    option_spec = {"name": directives.unchanged, "caption": directives.unchanged,
                   "preset": directives.unchanged}

    def run(self):
        kind = self.arguments[0]
        if kind not in KINDS:
            raise self.error(f"unknown interactive figure {kind!r}; choose one of {sorted(KINDS)}")
        figure = nodes.figure(classes=["interactive-figure-box"])
        figure += interactive_figure(kind=kind, preset=self.options.get("preset", ""))
        caption_text = self.options.get("caption") or KINDS[kind]
        parsed, _ = self.state.inline_text(caption_text, self.lineno)
        figure += nodes.caption(caption_text, "", *parsed)
        self.add_name(figure)  # :name: -> a label {numref} can use
        return [figure]


# --- wiring ------------------------------------------------------------------------------------
def _write_if_changed(path: pathlib.Path, content: bytes) -> None:
    if not path.exists() or path.read_bytes() != content:
        path.write_bytes(content)


def _build_finished(app, exception):
    # Written here as well as through html_static_path: Sphinx copies static files only when a
    # page is rebuilt, and a change to these files (or to the package's presets) rebuilds none.
    if exception is not None or app.builder.format != "html":
        return
    static = pathlib.Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    for path in sorted(STATIC.iterdir()):
        if path.is_file():
            _write_if_changed(static / path.name, path.read_bytes())
    _write_if_changed(static / DATA_JS, data_js().encode())


def _page_context(app, pagename, templatename, context, doctree):
    if doctree is not None and any(True for _ in doctree.findall(interactive_figure)):
        app.add_js_file(DATA_JS)
        app.add_js_file(FIGURES_JS)


def setup(app):
    app.add_node(interactive_figure, html=(visit_html, None), latex=(skip, None), text=(skip, None),
                 man=(skip, None), texinfo=(skip, None))
    app.add_directive("interactive-figure", InteractiveFigure)
    app.connect("html-page-context", _page_context)
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
