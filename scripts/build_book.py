"""Build the book into _build/html with warnings as errors (the `make book` target).

    python scripts/build_book.py          # the book, readable offline
    python scripts/build_book.py --cdn    # the same, loading MathJax and widget scripts from CDNs

The built pages must work with no network: equations (MathJax), figures and ipywidgets render
when `_build/html` is opened from disk. Jupyter Book loads MathJax, RequireJS and the ipywidgets
HTML manager from CDNs by default, so this script first fetches those JavaScript packages from
the npm registry with `npm pack` (exact versions, checked against the integrity hashes below),
unpacks the files the pages need into `_build/assets/static/` (ignored by git, nothing is copied
into the repository) and points Sphinx at the local copies (`mathjax_path`, `nb_ipywidgets_js`
and `html_static_path`), by building with a copy of `_config.yml` that adds those settings.
Node.js and npm are needed for this step (Node 18 or newer); `--cdn` builds without them.

On success it writes `_build/book.stamp`, which the browser test uses to tell whether the
built book is older than its sources.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
ASSETS = BUILD / "assets"
STATIC = ASSETS / "static"
STAMP = BUILD / "book.stamp"

# npm package -> (integrity of its tarball on the registry, {file or folder in the package:
# where it goes under _build/assets/static}). Update a version and its hash together
# (`npm view PACKAGE@VERSION dist.integrity`).
NPM_PACKAGES: dict[str, tuple[str, dict[str, str]]] = {
    "mathjax@3.2.2": (
        "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        {
            # The combined TeX + MathML input, CommonHTML output bundle Sphinx uses by default,
            # plus what it loads on demand: TeX extensions, fonts, the menu and accessibility.
            "es5/tex-mml-chtml.js": "mathjax/tex-mml-chtml.js",
            "es5/input": "mathjax/input",
            "es5/output/chtml": "mathjax/output/chtml",
            "es5/output/chtml.js": "mathjax/output/chtml.js",
            "es5/ui": "mathjax/ui",
            "es5/a11y": "mathjax/a11y",
            "es5/sre": "mathjax/sre",
            "es5/adaptors": "mathjax/adaptors",
            "LICENSE": "mathjax/LICENSE",
        },
    ),
    "requirejs@2.3.8": (
        "sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
        {"require.js": "widgets/require.js"},  # MIT licence header inside the file
    ),
    # ipywidgets 8 pairs with @jupyter-widgets/html-manager 1.x. embed-amd.js bundles the
    # standard controls (sliders, progress bars, ...) and loads its Font Awesome files from
    # its own folder.
    "@jupyter-widgets/html-manager@1.0.15": (
        "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
        {"dist": "widgets"},
    ),
}
# Files of a copied folder that pages never load.
SKIP_SUFFIXES = (".map", ".ts", ".md")
SKIP_NAMES = {"embed.js", "embed.js.LICENSE.txt", "libembed-amd.js"}

# Settings merged into _config.yml's `sphinx: config:` (paths are relative to _static/).
LOCAL_JS_CONFIG = {
    "html_static_path": [str(STATIC)],
    "mathjax_path": "mathjax/tex-mml-chtml.js",
    "nb_ipywidgets_js": {"widgets/require.js": {}, "widgets/book-widgets-setup.js": {},
                         "widgets/embed-amd.js": {}},
}

# Our own glue between the packages above, loaded after require.js and before embed-amd.js.
WIDGETS_SETUP_JS = """\
/* Written by scripts/build_book.py: glue between RequireJS, the ipywidgets HTML manager and MathJax 3. */
(function () {
  // The bundled modules find their fonts relative to the URL of their AMD module, which would
  // otherwise resolve next to the page. Map every module name so that it resolves to this folder.
  var here = document.currentScript.src.replace(/\\/[^\\/]*$/, "");
  window.require.config({paths: {"@jupyter-widgets": here, "@jupyter-widgets/html-manager/dist": here}});
  // The manager typesets math in widget labels with MathJax 2's MathJax.Hub.Queue; the book
  // loads MathJax 3, so route those calls to MathJax 3's typesetPromise.
  function shim() {
    var mj = window.MathJax;
    if (!mj || mj.Hub) return;
    mj.Hub = {Queue: function (command) {
      var element = Array.isArray(command) ? command[2] : undefined;
      if (!element || !mj.typesetPromise) return;
      var ready = mj.startup && mj.startup.promise ? mj.startup.promise : Promise.resolve();
      ready.then(function () { return mj.typesetPromise([element]); })
           .catch(function (err) { console.warn("MathJax could not typeset a widget label", err); });
    }};
  }
  shim();
  document.addEventListener("DOMContentLoaded", shim);  // MathJax (deferred) has run by then
})();
"""


def _sri(path: pathlib.Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=lambda _d, names: [
            n for n in names if n.endswith(SKIP_SUFFIXES) or n in SKIP_NAMES])
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _extract(tarball: pathlib.Path, dest: pathlib.Path) -> None:
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(dest, filter="data")
            return
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not (member.isfile() or member.isdir()) or dest.resolve() not in target.parents:
                raise RuntimeError(f"unexpected entry {member.name!r} in {tarball.name}")
        tar.extractall(dest)


def fetch_js_assets() -> None:
    """Unpack the pinned npm packages into _build/assets/static (skipped when already there)."""
    wanted = json.dumps(NPM_PACKAGES, sort_keys=True)
    marker = ASSETS / "packages.json"
    if marker.exists() and marker.read_text() == wanted and STATIC.is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("build_book.py: npm (Node.js 18 or newer) is needed to fetch MathJax and the "
                 "ipywidgets scripts for offline pages; install Node.js, or build with --cdn.")
    start = time.perf_counter()
    shutil.rmtree(ASSETS, ignore_errors=True)
    STATIC.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = pathlib.Path(tmp)
        out = subprocess.run([npm, "pack", "--json", "--silent", *NPM_PACKAGES], cwd=tmpdir,
                             check=True, capture_output=True, text=True).stdout
        packed = {f"{info['name']}@{info['version']}": info for info in json.loads(out)}
        for spec, (integrity, files) in NPM_PACKAGES.items():
            tarball = tmpdir / packed[spec]["filename"]
            if _sri(tarball) != integrity:
                sys.exit(f"build_book.py: {spec} does not match its pinned integrity hash")
            unpacked = tmpdir / tarball.name.removesuffix(".tgz")
            _extract(tarball, unpacked)
            for src, dst in files.items():
                _copy(unpacked / "package" / src, STATIC / dst)
    marker.write_text(wanted)
    print(f"build_book.py: unpacked {', '.join(NPM_PACKAGES)} into "
          f"{STATIC.relative_to(ROOT)} ({time.perf_counter() - start:.1f} s)", flush=True)


def offline_config() -> pathlib.Path:
    """_config.yml plus the local-asset settings, written to _build/assets/_config.yml."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    # Jupyter Book resolves local extension folders against the config file's folder.
    local = config.get("sphinx", {}).get("local_extensions") or {}
    for name, folder in local.items():
        local[name] = str((ROOT / folder).resolve())
    sphinx_config = config.setdefault("sphinx", {}).setdefault("config", {})
    for key, value in LOCAL_JS_CONFIG.items():
        if key == "html_static_path":
            value = list(sphinx_config.get(key, [])) + value
        sphinx_config[key] = value
    path = ASSETS / "_config.yml"
    path.write_text("# Generated by scripts/build_book.py from _config.yml; do not edit.\n"
                    + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cdn", action="store_true",
                        help="load MathJax and the widget scripts from CDNs (no npm needed; "
                             "the pages then need a network connection)")
    parser.add_argument("--all", action="store_true", help="rebuild every page")
    args = parser.parse_args(argv)

    jb = pathlib.Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(ROOT), "-W", "-n", "--keep-going"]
    if args.all:
        cmd.append("--all")
    if not args.cdn:
        fetch_js_assets()
        (STATIC / "widgets" / "book-widgets-setup.js").write_text(WIDGETS_SETUP_JS)
        cmd += ["--config", str(offline_config())]
    start = time.perf_counter()
    STAMP.unlink(missing_ok=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc == 0:
        STAMP.write_text("cdn\n" if args.cdn else "offline\n")
    print(f"build_book.py: jupyter-book build finished with exit code {rc} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
