"""The built book in a real browser, with no network: every page in _toc.yml renders.

Headless Chromium (Debian's `chromium` and `chromium-driver` packages, driven by Selenium through
/usr/bin/chromedriver; nothing is downloaded) opens each page of `_build/html`, served on
127.0.0.1, with every other host unreachable, and checks that

- the equations were typeset by MathJax and no raw `$$`, `\\(` or `\\[` is left in the text,
- every image loaded (natural width > 0),
- the ipywidgets stored in a notebook were rendered from their saved state,
- notebook pages have a well-formed Colab launch link and a working download link,
- the page logged no console errors and requested nothing outside 127.0.0.1.

The same checks (but the links) run again with each page opened from disk (file://).

Each page is also checked 390 px wide, as on a phone (nothing reaches past the right edge unless
it is inside its own scrolling box: no sideways scrolling of the page), and in dark mode (plot
images on a light box, interactive figures' text in contrast).

Full-page screenshots of each page are saved to test-artifacts/browser/ (ignored by git):
PAGE.png (1280 px), PAGE@390.jpg and PAGE@dark.jpg (1280 px).

The test builds the book first (`scripts/build_book.py`) when `_build/html` is missing or older
than its sources, so `make test` needs no prior `make book`. It is skipped, with the reason, when
Chromium or chromedriver is not installed (`apt-get install chromium chromium-driver`); the paths
can be set with the CHROMIUM and CHROMEDRIVER environment variables.
"""

from __future__ import annotations

import base64
import functools
import io
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from book_toc import toc_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
STAMP = ROOT / "_build" / "book.stamp"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PAGE_TIMEOUT_S = 60
SCREEN_WIDTH = 1280
NARROW_WIDTH = 390  # a phone
TILE = 4000  # px per capture
MAX_SCREENSHOT_HEIGHT = 40000  # px; longer pages are cut off in the screenshot only


def _find(env: str, *candidates: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if pathlib.Path(os.environ[env]).exists() else None
    for name in candidates:
        found = shutil.which(name) or (name if pathlib.Path(name).exists() else None)
        if found:
            return found
    return None


CHROMIUM = _find("CHROMIUM", "chromium", "/usr/bin/chromium", "chromium-browser")
CHROMEDRIVER = _find("CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("the browser test needs Chromium and chromedriver (Debian/Ubuntu: "
                "`apt-get install chromium chromium-driver`; .ci/run installs them); "
                f"found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium "
                                "(pip install -e '.[dev]')")


# --- the pages -----------------------------------------------------------------------------
PAGES = toc_files()
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def _source(page: str) -> pathlib.Path:
    for suffix in (".ipynb", ".md"):
        path = ROOT / f"{page}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"_toc.yml lists {page}, but there is no {page}.ipynb or {page}.md")


def _sources() -> list[pathlib.Path]:
    paths = [ROOT / name for name in ("_config.yml", "_toc.yml", "references.bib")]
    paths += [ROOT / "scripts" / "build_book.py"]
    paths += sorted((ROOT / "book").rglob("*.md")) + sorted((ROOT / "book").rglob("*.ipynb"))
    paths += sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "scripts" / "sphinx_book_fixes.py"]
    paths += [ROOT / "scripts" / "interactive_figures.py"] + sorted((ROOT / "book" / "_static").glob("*"))
    paths += sorted((ROOT / "mla_tutorial").glob("*.py"))  # the interactive figures' presets
    return [p for p in paths if p.exists()]


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def built_book() -> pathlib.Path:
    """_build/html, (re)built with scripts/build_book.py if missing or older than its sources."""
    newest = max(p.stat().st_mtime for p in _sources())
    fresh = (STAMP.exists() and STAMP.read_text().strip() == "offline"
             and STAMP.stat().st_mtime >= newest and (HTML / "index.html").exists())
    if not fresh:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_book.py")], cwd=ROOT,
                              capture_output=True, text=True)
        print(f"\nbuilt the book in {time.perf_counter() - start:.1f} s for the browser test")
        if proc.returncode:
            lines = [line for line in (proc.stdout + proc.stderr).splitlines()
                     if re.search(r"WARNING|ERROR|Error:|Exception", line)
                     and "ParserConfig(" not in line]
            lines = lines or (proc.stdout + proc.stderr).splitlines()
            pytest.fail("scripts/build_book.py failed (run `make book` to see the whole log):\n"
                        + "\n".join(lines[-40:]), pytrace=False)
    return HTML


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="session")
def server(built_book):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def driver():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions", f"--window-size={SCREEN_WIDTH},1000", "--hide-scrollbars",
                 # Networking off: no name resolves except 127.0.0.1, and any other
                 # connection (an IP literal, say) goes to a proxy that does not exist.
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not download anything
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_page_load_timeout(PAGE_TIMEOUT_S)
    browser.set_script_timeout(PAGE_TIMEOUT_S)
    yield browser
    browser.quit()


# --- helpers -------------------------------------------------------------------------------
def _drain_logs(browser) -> tuple[list[dict], list[str]]:
    """(console entries, URLs requested) since the last call."""
    console = browser.get_log("browser")
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return console, urls


def _is_remote(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme not in ("data", "blob", "about", "chrome", "file", "") and parts.hostname != "127.0.0.1"


def _screenshot(browser, page: str, width: int = SCREEN_WIDTH, mobile: bool = False, suffix: str = "",
                fmt: str = "png", at_width=None) -> pathlib.Path:
    """A full-page screenshot, captured in tiles (Chromium caps one capture's height) and stitched.
    ``fmt="jpeg"`` is several times quicker for the extra views; ``at_width(browser)`` runs once
    the page is laid out at ``width``, before the capture."""
    from PIL import Image

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    metrics = {"width": width, "deviceScaleFactor": 1, "mobile": mobile}
    tiles = []
    try:
        if width != SCREEN_WIDTH or mobile:
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": 1000})
            _settle(browser)
        if at_width is not None:
            at_width(browser)
        height = min(int(browser.execute_script("return document.documentElement.scrollHeight")),
                     MAX_SCREENSHOT_HEIGHT)
        # A viewport as tall as the page, then tiles of it (clips inside the viewport are reliable).
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
        browser.execute_script("window.scrollTo(0, 0)")
        for top in range(0, height, TILE):
            clip = {"x": 0, "y": top, "width": width, "height": min(TILE, height - top), "scale": 1}
            options = {"format": fmt, "clip": clip, **({"quality": 85} if fmt == "jpeg" else {})}
            shot = browser.execute_cdp_cmd("Page.captureScreenshot", options)
            tiles.append(Image.open(io.BytesIO(base64.b64decode(shot["data"]))))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    full = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
    top = 0
    for tile in tiles:
        full.paste(tile, (0, top))
        top += tile.height
    path = ARTIFACTS / (page.replace("/", "__") + suffix + (".jpg" if fmt == "jpeg" else ".png"))
    full.save(path, **({"quality": 85} if fmt == "jpeg" else {}))  # (optimize=True: 5x the time for 2% less)
    return path


def _settle(browser) -> None:
    """Wait two animation frames, so that a resize or a theme change is laid out and drawn."""
    browser.execute_async_script("const done = arguments[arguments.length - 1];"
                                 "requestAnimationFrame(() => requestAnimationFrame(() => done()));")


# JavaScript run in the page --------------------------------------------------------------
WAIT_FOR_PAGE = """
const done = arguments[arguments.length - 1];
(async () => {
  if (document.readyState !== "complete")
    await new Promise(r => window.addEventListener("load", r, {once: true}));
  // Images: scroll through the page so lazy ones load, then wait for every one to settle.
  for (let y = 0; y < document.body.scrollHeight; y += 800) window.scrollTo(0, y);
  window.scrollTo(0, 0);
  await Promise.all([...document.images].map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); })));
  let mathjax = "absent";
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; mathjax = "ok"; } catch (e) { mathjax = "error: " + e; }
  } else if (document.querySelector('script[src*="mathjax"]')) {
    mathjax = "script present but MathJax did not start";
  }
  done(mathjax);
})();
"""

PAGE_FACTS = """
const math = document.querySelectorAll("span.math, div.math").length;
const typeset = document.querySelectorAll("mjx-container").length;
const skip = "PRE, CODE, SCRIPT, STYLE, TEXTAREA, MJX-CONTAINER";
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
  acceptNode: n => n.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
const raw = [];
const markers = ["$$", "\\\\(", "\\\\[", "\\\\begin{", "$\\\\"];
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  for (const m of markers) {
    const i = n.textContent.indexOf(m);
    if (i >= 0) raw.push(n.textContent.slice(Math.max(0, i - 40), i + 40));
  }
}
const images = [...document.images].map(img => ({
  src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0}));
const views = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')]
  .map(s => {
    const model = JSON.parse(s.textContent).model_id;
    const area = s.previousElementSibling;
    const rendered = !!(area && area.classList.contains("widget-subarea") &&
                        area.querySelector(".jupyter-widgets, .widget-inline-hbox, .lm-Widget"));
    const box = area ? area.getBoundingClientRect() : {width: 0, height: 0};
    return {model, rendered, width: box.width, height: box.height};
  });
const links = [...document.querySelectorAll("a[href]")].map(a => a.href);
return {math, typeset, raw, images, views, links,
        widgetState: !!document.querySelector('script[type="application/vnd.jupyter.widget-state+json"]')};
"""


def _notebook_widget_models(path: pathlib.Path) -> tuple[set[str], list[str]]:
    """(model ids with stored state, model ids of widget views in the outputs)."""
    nb = json.loads(path.read_text())
    state = set(nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {}))
    views = [out["data"][WIDGET_VIEW]["model_id"]
             for cell in nb["cells"] if cell["cell_type"] == "code"
             for out in cell.get("outputs", []) if WIDGET_VIEW in out.get("data", {})]
    return state, views


# --- tests ---------------------------------------------------------------------------------
def test_network_is_off(server, driver):
    """The browser really cannot reach anything but 127.0.0.1, so the page checks mean offline."""
    driver.get(f"{server}/index.html")
    result = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const probe = url => fetch(url, {mode: "no-cors"}).then(() => "reached " + url, () => null);
        Promise.all([probe("https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"),
                     probe("http://1.1.1.1/"), probe(location.href)]).then(done);
    """)
    _drain_logs(driver)
    assert result[:2] == [None, None], f"the browser reached the network: {result}"
    assert result[2] is not None, "the local server was not reachable"


def _open_and_check(driver, url: str, page: str, screenshot: bool) -> tuple[list[str], dict, str]:
    """Load a page and check math, images, widgets, console and network; (problems, facts, note)."""
    source = _source(page)
    html_file = HTML / f"{page}.html"
    assert html_file.exists(), f"{html_file.relative_to(ROOT)} was not built"

    _drain_logs(driver)
    start = time.perf_counter()
    driver.get(url)
    mathjax = driver.execute_async_script(WAIT_FOR_PAGE)
    facts = driver.execute_script(PAGE_FACTS)
    state, views = ({}, [])
    if source.suffix == ".ipynb":
        state, views = _notebook_widget_models(source)
        expected = [m for m in views if m in state]
        if expected:  # the widget manager renders after load; give it a moment
            deadline = time.monotonic() + 20
            while (sum(v["rendered"] for v in facts["views"]) < len(expected)
                   and time.monotonic() < deadline):
                time.sleep(0.25)
                facts = driver.execute_script(PAGE_FACTS)
    console, requested = _drain_logs(driver)
    note = ""
    if screenshot:
        note = f"screenshot {_screenshot(driver, page).relative_to(ROOT)}"
    print(f"{page}: {time.perf_counter() - start:.1f} s, {facts['typeset']} equations, "
          f"{len(facts['images'])} images, {len(facts['views'])} widgets; {note}")

    problems = []
    # Math: MathJax ran and typeset every math element; no raw TeX delimiters in the text.
    if facts["math"]:
        if mathjax != "ok":
            problems.append(f"MathJax: {mathjax}")
        elif facts["typeset"] < facts["math"]:
            problems.append(f"MathJax typeset {facts['typeset']} of {facts['math']} math elements")
    problems += [f"raw TeX in the page text: ...{s}..." for s in facts["raw"]]
    # Figures.
    problems += [f"image did not load: {img['src']}" for img in facts["images"] if not img["ok"]]
    # Widgets: every view whose model state is stored in the notebook is drawn.
    drawn = {v["model"] for v in facts["views"] if v["rendered"] and v["width"] > 0 and v["height"] > 0}
    problems += [f"widget {m} (state stored in {source.name}) was not rendered"
                 for m in views if m in state and m not in drawn]
    # Console errors and network use.
    problems += [f"console {e['level']}: {e['message']}" for e in console if e["level"] == "SEVERE"]
    problems += [f"requested a remote URL: {u}" for u in sorted(set(filter(_is_remote, requested)))]
    return problems, facts, note


NARROW_FACTS = """
const W = document.documentElement.clientWidth;
const pageWidth = Math.max(document.documentElement.scrollWidth, document.body.scrollWidth);
// Content reaching past the right edge that is not inside a box of its own that scrolls or clips.
// Fixed-position elements (the off-canvas menus) never widen the page.
const main = document.querySelector("main") || document.body;
const offenders = [];
for (const el of main.querySelectorAll("*")) {
  const r = el.getBoundingClientRect();
  if (!r.width || r.right <= W + 1 || getComputedStyle(el).visibility === "hidden") continue;
  let boxed = false;
  for (let p = el; p && p !== main.parentElement; p = p.parentElement) {
    const style = getComputedStyle(p);
    if (style.position === "fixed") { boxed = true; break; }
    if (p !== el && style.overflowX !== "visible" && p.getBoundingClientRect().right <= W + 1) { boxed = true; break; }
  }
  if (!boxed) offenders.push(el.tagName.toLowerCase() + (el.className && el.className.baseVal === undefined
                             ? "." + String(el.className).trim().split(/\\s+/).join(".") : "")
                             + " reaches " + Math.round(r.right) + " px: " + (el.textContent || "").trim().slice(0, 50));
}
return {width: W, pageWidth, offenders: offenders.slice(0, 5), count: offenders.length};
"""

DARK_FACTS = """
// Figures in dark mode: every plot image in the page content sits on a light box, and the
// interactive figures' text contrasts with their background.
function rgb(c) { const m = c.match(/[\\d.]+/g); return m ? m.slice(0, 3).map(Number).concat(m.length > 3 ? [Number(m[3])] : [1]) : null; }
function luminance(c) { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
                        return 0.2126 * r + 0.7152 * g + 0.0722 * b; }
function background(el) {
  for (let e = el; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c && c[3] > 0.5) return c; }
  return [255, 255, 255, 1];
}
const dark = document.documentElement.dataset.theme === "dark";
const images = [...document.querySelectorAll(".bd-content img")].filter(i => i.naturalWidth > 0)
  .filter(i => luminance(background(i)) < 0.7).map(i => i.currentSrc || i.src);
const figures = [...document.querySelectorAll(".interactive-figure")].map(f => {
  const text = rgb(getComputedStyle(f.querySelector("dd, text, label") || f).color);
  const bg = background(f);
  const [a, b] = [luminance(text), luminance(bg)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
});
return {dark, images, contrasts: figures};
"""


def _narrow_and_dark(driver, page: str) -> tuple[list[str], list[str]]:
    """390 px wide (a phone) and dark mode: no sideways scrolling, legible figures; (problems, shots)."""
    problems, shots, narrow = [], [], {}
    shots.append(_screenshot(driver, page, width=NARROW_WIDTH, mobile=True, suffix="@390", fmt="jpeg",
                             at_width=lambda browser: narrow.update(browser.execute_script(NARROW_FACTS))))
    if narrow["pageWidth"] > narrow["width"] + 1 or narrow["count"]:
        problems.append(f"at {NARROW_WIDTH} px the page is {narrow['pageWidth']} px wide; content past the edge "
                        f"({narrow['count']} elements): {narrow['offenders']}")
    driver.execute_script("document.documentElement.dataset.theme = 'dark'")
    try:
        _settle(driver)
        dark = driver.execute_script(DARK_FACTS)
        shots.append(_screenshot(driver, page, suffix="@dark", fmt="jpeg"))
    finally:
        driver.execute_script("document.documentElement.dataset.theme = 'light'")
    if not dark["dark"]:
        problems.append("could not switch the page to dark mode")
    problems += [f"dark mode: image on a dark background: {src}" for src in dark["images"]]
    problems += [f"dark mode: interactive figure text contrast {c:.1f}:1 (below 4.5:1)"
                 for c in dark["contrasts"] if c < 4.5]
    return problems, shots


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_offline(page, server, driver):
    """Served from 127.0.0.1 with the network off, as a reader's local web server would."""
    problems, facts, note = _open_and_check(driver, f"{server}/{page}.html", page, screenshot=True)
    more, shots = _narrow_and_dark(driver, page)
    problems += more
    note += ", " + ", ".join(str(p.relative_to(ROOT)) for p in shots)
    # Launch and download links (notebook pages).
    if _source(page).suffix == ".ipynb":
        repo = urllib.parse.urlsplit(CONFIG["repository"]["url"]).path.strip("/")
        branch = CONFIG["repository"].get("branch", "main")
        book_path = (CONFIG["repository"].get("path_to_book") or "").strip("/")
        nb_path = "/".join(p for p in (book_path, f"{page}.ipynb") if p)
        colab = f"{CONFIG['launch_buttons']['colab_url'].rstrip('/')}/github/{repo}/blob/{branch}/{nb_path}"
        colab_links = [u for u in facts["links"] if u.startswith("https://colab.research.google.com/")]
        if colab_links != [colab]:
            problems.append(f"Colab link: expected [{colab}], found {colab_links}")
        if not (ROOT / nb_path).exists():
            problems.append(f"the Colab link points at {nb_path}, which is not in the repository")
        downloads = [u for u in facts["links"] if u.startswith(server) and u.endswith(".ipynb")]
        if not downloads:
            problems.append("no download link to the .ipynb")
        for url in downloads:
            with urllib.request.urlopen(url) as response:
                if json.loads(response.read()).get("nbformat") != 4:
                    problems.append(f"the download link {url} is not a notebook")
    assert not problems, f"{page} ({note}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_from_disk(page, built_book, driver):
    """Opened as a file (file://, no server at all), as a reader double-clicking index.html would."""
    problems, _, _ = _open_and_check(driver, (built_book / f"{page}.html").as_uri(), page,
                                     screenshot=False)
    assert not problems, f"{page} opened from disk:\n  " + "\n  ".join(problems)
