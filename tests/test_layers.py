"""The import graph: each module imports only its own layer or those below it. The drivers under
`stages/` install as `tec_pipeline.stages`; the library (the rest of `tec_pipeline.*`) never imports
a stage (outside `cli.py`'s command bodies); single-stage drivers never import a composition of
stages (`tec_pipeline.stages.demo`, `tec_pipeline.stages.ablate`); nothing under `tec_pipeline/` or
`stages/` imports the studies (`experiments`, not installed), not even lazily; and enhancement
(`targets`) never imports a model."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a module's layer is that of the longest prefix naming it.
LAYERS = [
    ("tec_pipeline.errors", "tec_pipeline.config", "tec_pipeline.direct_io", "tec_pipeline.files", "tec_pipeline"),
    ("tec_pipeline.views", "tec_pipeline.targets", "tec_pipeline.losses", "tec_pipeline.pixels"),
    ("tec_pipeline.models",),
    ("tec_pipeline.base_targets", "tec_pipeline.step", "tec_pipeline.data", "tec_pipeline.render",
     "tec_pipeline.render_dali"),
    ("tec_pipeline.cache",),
    ("tec_pipeline.cache_targets", "tec_pipeline.train", "tec_pipeline.evaluate", "tec_pipeline.viz", "tec_pipeline.finetune",
     "tec_pipeline.export"),  # export writes the encoder from a checkpoint that `train.checkpoint` reads
    ("tec_pipeline.demo",),  # the demo's data and report: built on evaluation, below every command
    ("tec_pipeline.cli", "tec_pipeline.__main__"),
    # Single-stage drivers (stages/*.py); "tec_pipeline.stages" (the package, and any driver not named
    # here) ranks lowest of the stages.
    ("tec_pipeline.stages", "tec_pipeline.stages.cache_targets", "tec_pipeline.stages.dry_run",
     "tec_pipeline.stages.verify", "tec_pipeline.stages.train", "tec_pipeline.stages.finetune"),
    ("tec_pipeline.stages.demo", "tec_pipeline.stages.ablate"),  # compositions of stages
    ("experiments",),  # the studies: never imported by the library or the stages
]
TOP_LEVEL = ("tec_pipeline", "stages", "experiments")


def layer_of(module: str) -> int:
    best, rank = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, rank = name, i
    if rank is None:
        raise AssertionError(f"{module}: not in any layer of LAYERS; add it")
    return rank


def module_name(path: Path, root: Path = ROOT) -> str:
    """The module `path` is imported as: the stages/ folder installs as `tec_pipeline.stages`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "stages":
        parts = ["tec_pipeline", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool, root: Path = ROOT) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in `path`; with `top_level_only`, those outside functions."""
    tree = ast.parse(path.read_text())
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.append((name, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] in TOP_LEVEL]


PRODUCT = sorted([*ROOT.glob("tec_pipeline/**/*.py"), *ROOT.glob("stages/*.py")])
SOURCES = sorted([*PRODUCT, *ROOT.glob("experiments/*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_it(path):
    me = module_name(path)
    # cli.py starts the stages from its command bodies: only its module-level imports count there
    for name, line in imports(path, top_level_only=me == "tec_pipeline.cli"):
        assert layer_of(name) <= layer_of(me), f"{path.name}:{line}: {me} (layer {layer_of(me)}) imports {name} " \
                                               f"(layer {layer_of(name)})"


def studies_imported(path: Path, root: Path = ROOT) -> list[str]:
    """Every import of `experiments` in `path`, inside functions too."""
    return [f"{path.relative_to(root)}:{line}: imports {name}" for name, line in imports(path, False, root)
            if name.split(".")[0] == "experiments"]


def test_the_product_never_imports_the_studies():
    """`experiments` is not installed: an import of it from the library or a stage works only from
    a checkout's root, so none may exist, lazy ones in `cli.py`'s command bodies included."""
    assert not [hit for path in PRODUCT for hit in studies_imported(path)]


def test_the_sources_include_the_studies():
    assert {"experiments.__main__", "experiments.demo_seeds", "experiments.caching_costs"} <= \
        {module_name(p) for p in SOURCES}


def test_enhancement_never_imports_a_model():
    assert not [n for n, _ in imports(ROOT / "tec_pipeline" / "targets.py", False) if n.startswith("tec_pipeline.models")]


def test_the_check_finds_an_upward_import(tmp_path):
    """The check itself: a relative import of a model from `targets` and a library import of a stage."""
    (tmp_path / "tec_pipeline" / "train").mkdir(parents=True)
    bad = tmp_path / "tec_pipeline" / "targets.py"
    bad.write_text("from .models.base import base_forward\n")
    found = imports(bad, False, root=tmp_path)
    assert found == [("tec_pipeline.models.base", 1)] and layer_of(found[0][0]) > layer_of("tec_pipeline.targets")
    lazy = tmp_path / "tec_pipeline" / "train" / "batches.py"
    lazy.write_text("def f():\n    from tec_pipeline.stages.train import run_train\n")
    assert imports(lazy, False, root=tmp_path) == [("tec_pipeline.stages.train", 2)] \
        and not imports(lazy, True, root=tmp_path)
    assert layer_of("tec_pipeline.stages.train") > layer_of("tec_pipeline.train.batches")


def test_the_check_finds_an_import_of_the_studies(tmp_path):
    """The check itself: a lazy import of a study in the library's CLI and a top-level one in a stage."""
    (tmp_path / "tec_pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    cli = tmp_path / "tec_pipeline" / "cli.py"
    cli.write_text("def seeds():\n    from experiments.demo_seeds import run_demo_seeds\n")
    stage = tmp_path / "stages" / "demo.py"
    stage.write_text("import json\nfrom experiments import costs_report\n")
    assert studies_imported(cli, tmp_path) == ["tec_pipeline/cli.py:2: imports experiments.demo_seeds"]
    assert studies_imported(stage, tmp_path) == ["stages/demo.py:2: imports experiments"]
    assert layer_of("experiments.demo_seeds") > layer_of("tec_pipeline.stages.demo") \
        > layer_of("tec_pipeline.stages.train") \
        > layer_of("tec_pipeline.cli") > layer_of("tec_pipeline.demo.report")
