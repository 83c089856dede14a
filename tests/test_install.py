"""How the project installs: the drivers in the checkout's top-level `stages/` folder become
`tec_pipeline.stages`, in a regular wheel (no top-level `stages` package in site-packages) and in
the editable install the tests run against (`scripts/setup.sh`: `pip install -e .`).

Under pytest the checkout's root comes first on the path (pyproject's ``pythonpath``), so
`tec_pipeline` itself is the checkout's folder found there, which has no `stages/` inside; the
editable install's finder (a meta-path finder setuptools writes into site-packages, holding
``tec_pipeline.stages -> <checkout>/stages``) serves the sub-package once the path has no
`tec_pipeline/stages`.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a build of the wheel reads: the project's metadata, its readme and the two package folders.
BUILD_INPUTS = ("pyproject.toml", "README.md", "tec_pipeline", "stages")
MODULES = ("tec_pipeline.stages.train", "tec_pipeline.stages.cache_targets", "tec_pipeline.stages.demo",
           "tec_pipeline.cli")


def installed_path(source: Path) -> str:
    """Where a checkout's module lies in an install: stages/x.py is tec_pipeline/stages/x.py."""
    rel = source.relative_to(ROOT).as_posix()
    return "tec_pipeline/" + rel if rel.startswith("stages/") else rel


def run_python(code: str, cwd: Path, **env: str) -> dict:
    """`code` run by this venv's python from `cwd`, outside the checkout; its last line, read as JSON."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**clean, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


IMPORTS = """
import importlib, importlib.util, json, sys
mods = {name: importlib.import_module(name).__file__ for name in %r}
print(json.dumps({"files": mods, "tec_pipeline": sys.modules["tec_pipeline"].__file__,
                  "stages": importlib.util.find_spec("stages") is not None,
                  "stages_path": list(sys.modules["tec_pipeline.stages"].__path__)}))
""" % (MODULES,)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built, as `pip wheel` builds one, from a copy of the checkout's build inputs: a build
    in the checkout itself would write build/ and *.egg-info there, and files left in an old
    build/lib would slip into the wheel."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("tec_pipeline-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (`pip install --target`)."""
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_the_wheel_holds_the_stages_under_tec_pipeline_and_no_top_level_stages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tec_pipeline", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert not [n for n in names if n.startswith("stages/")]
    assert {"tec_pipeline/stages/__init__.py", "tec_pipeline/stages/train.py", "tec_pipeline/stages/cache_targets.py",
            "tec_pipeline/stages/demo.py", "tec_pipeline/cli.py"} <= set(names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["tec_pipeline"]


def test_the_wheel_holds_every_module_of_the_checkout(wheel):
    """pyproject lists the packages by hand (a mapped folder and package discovery do not mix):
    a package left off the list would be missing from every install but the editable one."""
    sources = [p for folder in ("tec_pipeline", "stages") for p in (ROOT / folder).rglob("*.py")
               if "__pycache__" not in p.parts]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sorted(installed_path(p) for p in sources if installed_path(p) not in names) == []
    assert len(sources) > 50


def test_the_installed_wheel_imports_the_stages_from_itself(installed, tmp_path):
    """From a folder outside the checkout, with only the installed copy on the path: the stages,
    the CLI and the library come from it, and no top-level `stages` is importable."""
    found = run_python(IMPORTS, tmp_path, PYTHONPATH=str(installed))
    for name, file in found["files"].items():
        assert Path(file).is_relative_to(installed), (name, file)
    assert Path(found["tec_pipeline"]).is_relative_to(installed)
    assert found["stages_path"] == [str(installed / "tec_pipeline" / "stages")]
    assert not found["stages"] and not (installed / "stages").exists()


def test_the_installed_wheels_command_line_starts(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in ([], ["train"]):
        done = subprocess.run([sys.executable, "-m", "tec_pipeline", *args, "--help"], cwd=tmp_path,
                              env={**env, "PYTHONPATH": str(installed)}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Usage:" in done.stdout, done.stderr[-3000:]


def test_the_editable_install_serves_the_stages_from_the_checkout():
    """The tests' own imports: `tec_pipeline` from the checkout's root on pytest's path, and
    `tec_pipeline.stages` from the checkout's stages/ folder through the editable install."""
    import tec_pipeline
    import tec_pipeline.stages
    import tec_pipeline.stages.train

    # the install's record, not the checkout's own tec_pipeline.egg-info, which pytest's path finds first
    urls = [json.loads(d.read_text("direct_url.json")) for d in importlib.metadata.distributions(name="tec-pipeline")
            if d.read_text("direct_url.json")]
    assert [u["url"] for u in urls if u.get("dir_info", {}).get("editable")] == [ROOT.as_uri()], \
        f"the tests run against the editable install of this checkout (scripts/setup.sh: pip install -e .): {urls}"
    assert Path(tec_pipeline.__file__) == ROOT / "tec_pipeline" / "__init__.py"
    assert list(tec_pipeline.stages.__path__) == [str(ROOT / "stages")]
    assert Path(tec_pipeline.stages.train.__file__) == ROOT / "stages" / "train.py"
    assert "stages" not in sys.modules


def test_the_editable_install_serves_the_stages_outside_the_checkout(tmp_path):
    """Outside the checkout (no root on the path) the editable install's finder serves both
    `tec_pipeline` and `tec_pipeline.stages`, from the checkout, and no top-level `stages`."""
    found = run_python(IMPORTS, tmp_path)
    assert found["files"]["tec_pipeline.stages.train"] == str(ROOT / "stages" / "train.py")
    assert found["files"]["tec_pipeline.cli"] == str(ROOT / "tec_pipeline" / "cli.py")
    assert found["stages_path"] == [str(ROOT / "stages")] and not found["stages"]
