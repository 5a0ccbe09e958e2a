"""The notebooks as Colab runs them: a fresh environment, no checkout, the install cell for real.

Colab opens one notebook from GitHub into an empty folder, in a runtime that already has PyTorch,
IPython and ipywidgets 7 installed, and the notebook's first cell installs the helper package
from the repository (`scripts/sync_install_cell.py`). This test builds that situation, outside
the repository:

- a new virtual environment with only what a Colab runtime brings that the book relies on:
  this machine's PyTorch (linked from the test environment, so nothing large is copied or
  downloaded), ipykernel, and ipywidgets 7.7.1 (Colab's version; the notebook server it requires,
  which Colab has, is stood in for by its package metadata); plus a stand-in `google.colab`
  module that the kernel imports at start, as Colab's does, so the install cell really runs its
  `%pip install`;
- chapters 00, 05 and 08, each copied alone into an empty folder and run top to bottom in that
  kernel, with the install cell pointed at this clone (`git+file://...@<HEAD>`) instead of GitHub;
- pip constrained to each dependency's declared floor (`numpy>=1.24` installs numpy 1.24.x, ...)
  and to the preinstalled PyTorch and ipywidgets, so that a floor too low for the code, or one that
  would make Colab replace its PyTorch or its widgets, fails here.

It fails on a path that only works inside the repository, an import the package does not
declare, or a wrong floor. It tests the package as committed (HEAD): uncommitted changes to the
package are not in it, and the test says so. It needs git and pip's package index (the machine's
registry or PyPI); it is skipped, with the reason, only when git or a git checkout is missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = ("00", "05", "08")
#: What a Colab runtime has installed that the book uses, and that this test brings along itself.
PREINSTALLED = ("torch", "ipykernel", "pip")
#: Colab's ipywidgets, installed without its dependencies; the notebook server they require, which
#: Colab has and nothing here runs, is stood in for by its package metadata alone (NOTEBOOK_STAND_IN).
COLAB_IPYWIDGETS = "7.7.1"
COLAB_WIDGET_PACKAGES = (f"ipywidgets=={COLAB_IPYWIDGETS}", "widgetsnbextension==3.6.*", "jupyterlab-widgets==1.*",
                         "ipython-genutils")
NOTEBOOK_STAND_IN = ("notebook", "6.5.5")
#: Preinstalled packages the install cell must keep as they are (torch: this environment's).
KEPT = ("torch", "ipywidgets")
CELL_TIMEOUT_S = 600


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _commit() -> str:
    if shutil.which("git") is None:
        pytest.skip("the Colab check installs the package from this clone with git, and git is not installed")
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    if inside.returncode and "not a git repository" in inside.stderr:
        pytest.skip(f"{ROOT} is not a git checkout: the Colab check installs the package from a git URL")
    assert inside.returncode == 0, f"git cannot read this checkout: {inside.stderr.strip()}"
    return _git("rev-parse", "HEAD")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _closure(names) -> dict[str, importlib.metadata.Distribution]:
    """Installed distributions of ``names`` and everything they require, from this environment."""
    from packaging.requirements import Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed here
        found[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def _preinstall(image: pathlib.Path) -> None:
    """Make this environment's PREINSTALLED packages (and what they need) importable from ``image``:
    one symbolic link per top-level module or folder, nothing copied. ``image`` is put on the new
    environment's path by a .pth file, outside its prefix, so pip counts these packages as
    installed but never uninstalls them (and never touches the files they link to)."""
    image.mkdir()
    for dist in _closure(PREINSTALLED).values():
        tops = {pathlib.PurePath(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        here = pathlib.Path(dist.locate_file(""))
        for top in sorted(tops):
            if not (image / top).exists() and (here / top).exists():
                (image / top).symlink_to(here / top)


def _floors() -> list[str]:
    """Each declared dependency pinned to its floor's release series: numpy>=1.24 -> numpy==1.24.*"""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("reading pyproject.toml needs Python 3.11+ (tomllib)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for spec in project["dependencies"] + [r for extra in ("hf",) for r in project["optional-dependencies"][extra]]:
        req = Requirement(spec)
        if _canonical(req.name) in PREINSTALLED + KEPT:
            continue
        floors = [s.version for s in req.specifier if s.operator == ">="]
        assert floors, f"{spec}: every dependency needs a floor (>=) for this check"
        parts = floors[0].split(".")
        pins.append(f"{req.name}=={'.'.join((parts + ['0'])[:max(2, len(parts))])}.*")
    return pins


class ColabRuntime:
    def __init__(self, base: pathlib.Path, commit: str):
        self.base, self.commit = base, commit
        self.venv = base / "venv"
        self.python = self.venv / "bin" / "python"
        self.seconds: dict[str, float] = {}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True)
        self.site = pathlib.Path(subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip())
        _preinstall(base / "image")
        name, version = NOTEBOOK_STAND_IN
        info = base / "image" / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text("")
        self.torch_version = importlib.metadata.version("torch")
        # The stand-in for Colab's own module; the install cell only looks for it in sys.modules.
        fake = base / "colab-site" / "google" / "colab"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text('"""A stand-in for the google.colab module of a Colab runtime."""\n')
        (self.site / "colab_runtime.pth").write_text(f"{base / 'image'}\n{base / 'colab-site'}\n")
        # pip: the floors, and the preinstalled torch must stay (pip may not replace it)
        constraints = base / "constraints.txt"
        constraints.write_text("\n".join(_floors() + [f"torch=={self.torch_version}",
                                                      f"ipywidgets=={COLAB_IPYWIDGETS}"]) + "\n")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
        (base / "tmp").mkdir()
        self.env.update(PATH=f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(self.venv),
                        TMPDIR=str(base / "tmp"),
                        PIP_CONSTRAINT=str(constraints), PIP_DISABLE_PIP_VERSION_CHECK="1",
                        PYTHONNOUSERSITE="1")
        self.pip("install", "--quiet", "--no-deps", *COLAB_WIDGET_PACKAGES, constrained=False)
        # a kernel spec for the runtime; the kernel imports google.colab at start, like Colab's
        spec = base / "jupyter" / "kernels" / "colab"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [str(self.python), "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.exec_lines=__import__('google.colab')"],
            "display_name": "Colab stand-in", "language": "python",
            "env": {k: self.env[k] for k in ("PATH", "VIRTUAL_ENV", "PIP_CONSTRAINT", "PIP_DISABLE_PIP_VERSION_CHECK",
                                            "PYTHONNOUSERSITE", "TMPDIR")} | {"PYTHONPATH": ""}}))
        self.seconds["environment"] = time.perf_counter() - start

    def pip(self, *args: str, constrained: bool = True) -> str:
        env = dict(self.env)
        if not constrained:
            env.pop("PIP_CONSTRAINT")
        proc = subprocess.run([str(self.python), "-m", "pip", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    def run_notebook(self, source: pathlib.Path) -> None:
        """Copy the notebook alone into an empty folder and execute it there, as Colab would."""
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

        url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")
        nb = nbformat.read(source, as_version=4)
        cell = next(c for c in nb.cells if c.cell_type == "code")
        github, local = f"git+{url}\"", f"git+file://{ROOT}@{self.commit}\""
        assert cell.source.count(github) == 1 and "google.colab" in cell.source, (
            f"{source.name}: the first code cell is not the Colab install cell (scripts/sync_install_cell.py)")
        cell.source = cell.source.replace(github, local)
        folder = self.base / f"content-{source.stem}"
        folder.mkdir()
        copy = folder / source.name
        nbformat.write(nb, copy)
        start = time.perf_counter()
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="colab",
                                resources={"metadata": {"path": str(folder)}})
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = str(self.base / "jupyter")
        try:
            client.execute()
        except CellExecutionError as err:
            pytest.fail(f"{source.name} failed in the Colab stand-in (run in {folder}):\n{str(err)[-3000:]}",
                        pytrace=False)
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH")
            else:
                os.environ["JUPYTER_PATH"] = old
        self.seconds[source.stem] = time.perf_counter() - start
        nbformat.write(nb, copy)  # executed, with outputs and cell timings, for a look after a failure


def _available_memory() -> float:
    try:
        line = next(ln for ln in pathlib.Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 0.0
    return float(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    commit = _commit()
    dirty = _git("status", "--porcelain", "--", "mla_tutorial", "pyproject.toml")
    if dirty:
        warnings.warn(f"the Colab check installs the package as committed at {commit[:10]}; these "
                      f"uncommitted changes are not in it:\n{dirty}", stacklevel=1)
    # Tens of thousands of small files are written and deleted: in memory when there is room
    # (on a busy disk, deleting them alone took half a minute).
    shm = pathlib.Path("/dev/shm")
    in_memory = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4e9 \
        and _available_memory() > 4e9
    base = pathlib.Path(tempfile.mkdtemp(prefix="mla-colab-", dir=shm)) if in_memory else tmp_path_factory.mktemp("colab")
    assert ROOT not in base.parents, "the Colab stand-in must live outside the repository"
    try:
        runtime = ColabRuntime(base, commit)
        yield runtime
    finally:
        if in_memory:
            shutil.rmtree(base, ignore_errors=True)
        else:
            shutil.rmtree(base / "venv", ignore_errors=True)  # the executed notebooks stay for a look
    print("\nColab check, seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in runtime.seconds.items())
          + f"; total {sum(runtime.seconds.values()):.1f}")


def _chapter(number: str) -> pathlib.Path:
    found = sorted(ROOT.glob(f"notebooks/{number}_*.ipynb"))
    assert len(found) == 1, f"expected one notebooks/{number}_*.ipynb, found {found}"
    return found[0]


@pytest.mark.parametrize("number", CHAPTERS)
def test_chapter_runs_as_in_colab(colab, number):
    colab.run_notebook(_chapter(number))


def test_the_install_cell_installed_this_commit_and_kept_colabs_torch(colab):
    if not any(k != "environment" for k in colab.seconds):
        colab.run_notebook(_chapter(CHAPTERS[0]))
    report = json.loads(subprocess.run([str(colab.python), "-c", """
import importlib.metadata as m, json, mla_tutorial, torch
d = m.distribution("mla_tutorial")
print(json.dumps({"file": mla_tutorial.__file__, "torch": torch.__version__, "torch_file": torch.__file__,
                  "direct_url": json.loads(d.read_text("direct_url.json") or "{}"),
                  "versions": {n: m.version(n) for n in ("numpy", "matplotlib", "ipywidgets", "tqdm", "transformers")}}))
"""], env=colab.env, cwd=colab.base, check=True, capture_output=True, text=True).stdout)
    assert pathlib.Path(report["file"]).is_relative_to(colab.venv), (
        f"mla_tutorial was imported from {report['file']}, not from the Colab environment")
    vcs = report["direct_url"].get("vcs_info", {})
    assert vcs.get("commit_id") == colab.commit, f"installed from {report['direct_url']}, expected {colab.commit}"
    assert report["torch"] == colab.torch_version and pathlib.Path(report["torch_file"]).is_relative_to(
        colab.base / "image"), f"pip replaced the runtime's PyTorch: torch {report['torch']} at {report['torch_file']}"
    floors = {pin.split("==")[0]: pin.split("==")[1].rstrip("*") for pin in _floors()}
    floors["ipywidgets"] = COLAB_IPYWIDGETS  # Colab's, kept
    for name, version in report["versions"].items():
        assert version.startswith(floors[name]), f"{name} {version} installed, expected {floors[name]}*"
