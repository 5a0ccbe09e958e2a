"""Draw the book's diagrams as SVG files in book/images/ (chapters 04 and 05 show them).

    python scripts/draw_diagrams.py           # write the SVGs
    python scripts/draw_diagrams.py --check   # exit 1 if a committed SVG differs from this source

Each diagram is plain SVG written from this file, with the sizes of DeepSeek-V3 read from the
package (`MLAConfig.deepseek_v3()`), so a changed preset changes the pictures and the test suite
(tests/test_diagrams.py) says they need redrawing. The output is deterministic text: no dates, no
random ids, text as <text> elements in the reader's sans-serif font. The drawings are sized for
a page column: about 480 px wide at full size, and every label is at least 12 px in the drawing's
own units, so it stays readable when a phone shows it 360 px wide. They have a white background;
in dark mode the book's theme shows images on a light card, like the notebooks' plots.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = ROOT / "book" / "images"
sys.path.insert(0, str(ROOT))
from mla_tutorial import MLAConfig  # noqa: E402  (the repository's package, also when not installed)

FONT = "'Helvetica Neue', Helvetica, Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif"
INK, MUTED = "#1a1a1a", "#4a4a4a"
# (fill, stroke) per kind of tensor
COLOURS = {
    "neutral": ("#f2f2f2", "#5a5a5a"),
    "query": ("#e3eefb", "#2b6cb0"),
    "latent": ("#fdebd8", "#c05621"),
    "rope": ("#efe7fb", "#6b46c1"),
    "attention": ("#fff5cc", "#a16207"),
    "cached": ("#e6f4ea", "#2f855a"),
}
CACHED_STROKE = COLOURS["cached"][1]
MIN_FONT = 12  # px in the drawing's units; the test checks every label against it


def _runs(markup: str) -> list[tuple[str, int]]:
    """Split ``c^{KV}_i`` style markup into (text, level) runs: level 1 superscript, -1 subscript."""
    runs, pos = [], 0
    for m in re.finditer(r"([\^_])(\{([^}]*)\}|(.))", markup):
        if m.start() > pos:
            runs.append((markup[pos:m.start()], 0))
        runs.append((m.group(3) if m.group(3) is not None else m.group(4), 1 if m.group(1) == "^" else -1))
        pos = m.end()
    if pos < len(markup):
        runs.append((markup[pos:], 0))
    return runs


@dataclass
class Svg:
    """A drawing in progress: a list of SVG elements on a white page of the given size."""

    width: int
    height: int
    title: str
    desc: str
    body: list[str] = field(default_factory=list)

    def rect(self, x, y, w, h, kind="neutral", dashed=False, rx=6, stroke_width=1.5):
        fill, stroke = COLOURS[kind]
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        self.body.append(f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" rx="{rx}" fill="{fill}" '
                         f'stroke="{stroke}" stroke-width="{stroke_width:g}"{dash}/>')

    def text(self, x, y, markup, size=14, anchor="middle", weight="normal", colour=INK):
        """One line of text with ^{sup} and _{sub} runs; (x, y) is the baseline's anchor point."""
        assert size >= MIN_FONT, f"{markup!r}: {size} px is below the {MIN_FONT} px minimum"
        small, shift = round(size * 0.72, 1), round(size * 0.38, 1)
        spans, offset = [], 0.0
        for text, level in _runs(markup):
            target = -shift * level
            attrs = f' dy="{target - offset:g}"' if target != offset else ""
            if level:
                attrs += f' font-size="{small:g}"'
            spans.append(f"<tspan{attrs}>{escape(text)}</tspan>")
            offset = target
        bold = ' font-weight="bold"' if weight == "bold" else ""
        self.body.append(f'<text x="{x:g}" y="{y:g}" font-size="{size}" text-anchor="{anchor}"{bold} '
                         f'fill="{colour}">{"".join(spans)}</text>')

    def box(self, x, y, w, h, lines, kind="neutral", dashed=False, sizes=None):
        """A rounded box with centred lines of text: the first in bold, the others smaller."""
        self.rect(x, y, w, h, kind, dashed=dashed, stroke_width=2.5 if dashed else 1.5)
        sizes = sizes or [16] + [14] * (len(lines) - 1)
        block = sum(sizes) + 5 * (len(lines) - 1)
        baseline = y + (h - block) / 2
        for i, (line, size) in enumerate(zip(lines, sizes)):
            baseline += size if i == 0 else size + 5
            self.text(x + w / 2, baseline - 2, line, size, weight="bold" if i == 0 else "normal")

    def arrow(self, x1, y1, x2, y2):
        self.body.append(f'<line x1="{x1:g}" y1="{y1:g}" x2="{x2:g}" y2="{y2:g}" stroke="{MUTED}" '
                         f'stroke-width="1.5" marker-end="url(#head)"/>')

    def render(self) -> str:
        return "\n".join([
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" '
            f'width="{self.width}" height="{self.height}" font-family="{FONT}" role="img">',
            f"<title>{escape(self.title)}</title>",
            f"<desc>{escape(self.desc)}</desc>",
            '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{MUTED}"/></marker></defs>',
            f'<rect width="{self.width}" height="{self.height}" fill="#ffffff"/>',
            *self.body,
            "</svg>",
            "",
        ])


def dataflow(c: MLAConfig) -> str:
    """MLA's dataflow for one token (the DeepSeek-V2 paper's Figure 3), with DeepSeek-V3's widths."""
    n_h, d_h, d_R, d_v, d_c = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    W, m, gap = 480, 12, 8
    col = [82, 82, 82, 82, 96]                      # q^C, q^R, k^C, v^C, and the column k^R runs down
    xs = [m + sum(col[:i]) + gap * i for i in range(5)]
    mid = [x + w / 2 for x, w in zip(xs, col)]
    span = lambda i, j: (xs[i], xs[j] + col[j] - xs[i])  # noqa: E731  (x, width) over columns i..j
    s = Svg(W, 560, "Multi-Head Latent Attention, one token",
            f"The hidden state h of width {c.hidden_size} is projected to a query latent c^Q ({c.q_lora_rank}), "
            f"a key/value latent c^KV ({d_c}) and a RoPE key k^R ({d_R}). Only c^KV and k^R are cached: "
            f"{c.latent_cache_dim} values per token. Up-projections give per-head q^C, q^R, k^C and v^C for "
            f"{n_h} heads; attention per head; the output projection W^O returns width {c.hidden_size}.")
    s.box(m, 12, W - 2 * m, 50, ["h_t, the hidden state of token t", f"d_{{model}} = {c.hidden_size:,}"])
    # down-projections (row 1): what a token is compressed to
    y1, h1 = 100, 74
    (xq, wq), (xkv, wkv) = span(0, 1), span(2, 3)
    s.box(xq, y1, wq, h1, ["c^{Q}", "RMSNorm(W^{DQ} h)", f"d'_c = {c.q_lora_rank:,}"], "query")
    s.box(xkv, y1, wkv, h1, ["c^{KV}", "RMSNorm(W^{DKV} h)", f"d_c = {d_c}"], "latent", dashed=True)
    s.box(xs[4], y1, col[4], h1, ["k^{R}", "RoPE(W^{KR} h)", f"d_h^R = {d_R}"], "rope", dashed=True,
          sizes=[16, 13, 14])
    for x in (xq + wq / 2, xkv + wkv / 2, mid[4]):
        s.arrow(x, 62, x, y1 - 2)
    # up-projections (row 2): per-head queries, keys and values
    y2, h2 = 236, 54
    rows = [("q^{C}", ["W^{UQ}"], f"{n_h} × {d_h}", "query"), ("q^{R}", ["W^{QR},", "RoPE"], f"{n_h} × {d_R}", "rope"),
            ("k^{C}", ["W^{UK}"], f"{n_h} × {d_h}", "latent"), ("v^{C}", ["W^{UV}"], f"{n_h} × {d_v}", "latent")]
    for i, (name, weight, shape, kind) in enumerate(rows):
        s.box(xs[i], y2, col[i], h2, [name, shape], kind)
        s.arrow(mid[i], y1 + h1, mid[i], y2 - 2)
        for j, line in enumerate(weight):
            s.text(mid[i] + 5, y1 + h1 + 30 + 16 * j, line, 13, anchor="start", colour=MUTED)
    s.text(mid[4], y2 + 22, "one key,", 13, colour=MUTED)
    s.text(mid[4], y2 + 39, "all heads", 13, colour=MUTED)
    # attention (row 3) and the output (row 4)
    y3, h3 = 334, 78
    s.box(m, y3, W - 2 * m, h3, [f"attention in each of the {n_h} heads",
                                 "softmax(scale · [q^{C}; q^{R}] · [k^{C}; k^{R}]) · v^{C}",
                                 f"output o: {n_h} × {d_v}"], "attention")
    for i in range(4):
        s.arrow(mid[i], y2 + h2, mid[i], y3 - 2)
    s.arrow(mid[4], y1 + h1, mid[4], y3 - 2)
    y4, h4 = 450, 50
    s.box(m, y4, W - 2 * m, h4, ["u = W^{O} o", f"d_{{model}} = {c.hidden_size:,}"])
    s.arrow(W / 2, y3 + h3, W / 2, y4 - 2)
    # legend: what is cached
    s.rect(m, 518, 28, 22, "cached", dashed=True, rx=4, stroke_width=2.5)
    s.text(m + 38, 534, f"cached: c^{{KV}} and k^{{R}}, {d_c} + {d_R} = {c.latent_cache_dim} values per token",
           14, anchor="start")
    return s.render()


def cache_modes(c: MLAConfig) -> str:
    """What each cache mode stores per token, and what each decoding step computes."""
    n_h, d_h, d_R, d_v, d_c = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    expanded = n_h * (d_h + d_R + d_v)
    W, m, gap = 480, 12, 10
    left_w = 172
    right_x = m + left_w + gap
    right_w = W - m - right_x
    row_h, top = 136, 52
    bar_w = left_w - 28
    s = Svg(W, top + 3 * row_h + 4, "The three cache modes of an MLA layer",
            f"expanded caches per-head K and V ({expanded:,} values per token) and computes attention over "
            f"them; latent caches [c^KV; k^R] ({c.latent_cache_dim} values) and re-expands every cached "
            f"token at every step; absorbed caches the same {c.latent_cache_dim} values and moves the query "
            "into latent space instead, expanding nothing.")
    s.text(m + left_w / 2, 24, "cached per token", 15, weight="bold")
    s.text(right_x + right_w / 2, 24, "each decoding step", 15, weight="bold")
    s.text(W / 2, 44, "(S tokens cached; every mode ends with u = W^{O} o)", 13, colour=MUTED)
    modes = [
        ("expanded", f"K: {n_h} × ({d_h} + {d_R})", f"V: {n_h} × {d_v}", expanded,
         ["K and V of the new token only", "scores q · K over S cached keys", "weighted sum of S cached V",
          "(what standard attention does)"]),
        ("latent", "[c^{KV}; k^{R}]", f"{d_c} + {d_R}", c.latent_cache_dim,
         ["re-expand all S cached tokens:", "K = [W^{UK} c^{KV}; k^{R}]", "V = W^{UV} c^{KV}, then attend",
          "(discarded after the step)"]),
        ("absorbed", "[c^{KV}; k^{R}]", f"{d_c} + {d_R}", c.latent_cache_dim,
         ["q̃ = W^{UK⊤} q^{C}, once per head", "scores q̃ · c^{KV} + q^{R} · k^{R}", "õ = Σ p c^{KV}; o = W^{UV} õ",
          "(nothing cached is expanded)"]),
    ]
    for r, (name, first, second, values, step) in enumerate(modes):
        y = top + r * row_h
        s.rect(m, y + 6, left_w, row_h - 14, "neutral" if name == "expanded" else "latent", dashed=True,
               stroke_width=2.5)
        s.text(m + 12, y + 28, f'"{name}"', 16, anchor="start", weight="bold")
        s.text(m + left_w / 2, y + 52, first, 14)
        s.text(m + left_w / 2, y + 71, second, 14)
        s.text(m + left_w / 2, y + 92, f"{values:,} values", 15, weight="bold")
        # a bar to scale: the expanded cache fills it
        s.body.append(f'<rect x="{m + 14}" y="{y + 102}" width="{bar_w}" height="12" fill="none" '
                      f'stroke="{MUTED}" stroke-width="1"/>')
        s.body.append(f'<rect x="{m + 14}" y="{y + 102}" width="{max(bar_w * values / expanded, 2):.1f}" '
                      f'height="12" fill="{COLOURS["latent"][1]}"/>')
        s.rect(right_x, y + 6, right_w, row_h - 14, "attention")
        for i, line in enumerate(step):
            s.text(right_x + 12, y + 34 + 23 * i, line, 14, anchor="start",
                   colour=MUTED if line.startswith("(") else INK)
    return s.render()


DIAGRAMS = {"mla_dataflow.svg": dataflow, "mla_cache_modes.svg": cache_modes}


def render_all() -> dict[str, str]:
    """{file name: SVG text} of every diagram, drawn for DeepSeek-V3's sizes."""
    v3 = MLAConfig.deepseek_v3()
    return {name: draw(v3) for name, draw in DIAGRAMS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with book/images/ instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, svg in render_all().items():
        path = IMAGES / name
        if args.check:
            if not path.exists() or path.read_text() != svg:
                stale.append(name)
        else:
            path.write_text(svg)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {stale}; run python scripts/draw_diagrams.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
