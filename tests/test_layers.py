"""The import graph: each module imports only its own layer or those below it. The drivers under
`stages/` install as `tec_pipeline.stages`, and nothing imports them as a top-level `stages`; the
library (everything under `tec_pipeline/`) never imports a stage, not even lazily, except
`cli.py`'s command bodies; single-stage drivers never import a composition of stages
(`tec_pipeline.stages.demo`, `tec_pipeline.stages.ablate`); nothing under `tec_pipeline/` or
`stages/` imports the studies (`experiments`, not installed), not even lazily; the studies and the
benchmarks take from the stages only their whole runs (`run_*`, `verify_*`), the pieces being the
library's; and enhancement (`targets`) never imports a model."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a module's layer is that of the longest prefix naming it.
LAYERS = [
    ("tec_pipeline.errors", "tec_pipeline.config", "tec_pipeline.direct_io", "tec_pipeline.files", "tec_pipeline"),
    ("tec_pipeline.views", "tec_pipeline.targets", "tec_pipeline.pixels"),
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
    ("experiments", "benchmarks"),  # the studies and benchmarks: never imported by the library or the stages
]
# "stages" is no module any more (stages/ installs as tec_pipeline.stages): an import of it is found and refused.
TOP_LEVEL = ("tec_pipeline", "stages", "experiments", "benchmarks")


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


def import_nodes(path: Path, top_level_only: bool, root: Path = ROOT) -> list[tuple[str, ast.stmt]]:
    """(absolute module, node) of every import statement in `path`, each name of a plain `import`
    on its own; with `top_level_only`, those outside functions."""
    tree = ast.parse(path.read_text())
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            found.append((".".join(base + ([node.module] if node.module else [])), node))
    return found


def imports(path: Path, top_level_only: bool, root: Path = ROOT) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in `path`; with `top_level_only`, those outside functions."""
    return [(name, node.lineno) for name, node in import_nodes(path, top_level_only, root)
            if name.split(".")[0] in TOP_LEVEL]


PRODUCT = sorted([*ROOT.glob("tec_pipeline/**/*.py"), *ROOT.glob("stages/*.py")])
LIBRARY = sorted(p for p in ROOT.glob("tec_pipeline/**/*.py") if p != ROOT / "tec_pipeline" / "cli.py")
USERS = sorted([*ROOT.glob("experiments/*.py"), *ROOT.glob("benchmarks/*.py")])  # the stages' callers outside the product
SOURCES = sorted([*PRODUCT, *USERS])


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


def test_the_sources_include_the_benchmarks_and_the_stages_as_installed():
    names = {module_name(p) for p in SOURCES}
    assert {"benchmarks.stage_one_ceiling", "benchmarks.cache_growth", "tec_pipeline.stages.train",
            "tec_pipeline.stages.demo", "tec_pipeline.stages"} <= names
    assert not [n for n in names if n.split(".")[0] == "stages"]


def stages_imported(path: Path, root: Path = ROOT) -> list[str]:
    """Every import of `tec_pipeline.stages` in `path`, inside functions too."""
    return [f"{path.relative_to(root)}:{line}: imports {name}" for name, line in imports(path, False, root)
            if name == "tec_pipeline.stages" or name.startswith("tec_pipeline.stages.")]


def test_the_library_never_imports_a_stage():
    """Only `cli.py` starts the stages (from its command bodies); the rest of `tec_pipeline/`
    imports none, lazily or not: a stage's helper another part needs is library code."""
    assert not [hit for path in LIBRARY for hit in stages_imported(path)]


def foreign_stage_names(path: Path, root: Path = ROOT) -> list[str]:
    """What `path` takes from `tec_pipeline.stages` other than a whole run (a name `run_*` or
    `verify_*`): another name, a stage module itself, or the module by a plain `import`."""
    found = []
    for name, node in import_nodes(path, False, root):
        if not (name == "tec_pipeline.stages" or name.startswith("tec_pipeline.stages.")):
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        if isinstance(node, ast.Import):
            found.append(f"{where}: imports the module {name}")
        else:
            found += [f"{where}: imports {alias.name} from {name}" for alias in node.names
                      if not alias.name.startswith(("run_", "verify_"))]
    return found


def test_studies_and_benchmarks_take_only_whole_runs_from_the_stages():
    """The studies and benchmarks call the stages' entry points (`run_train`, `verify_cache`, ...);
    the pieces they time or build on (`cache_targets.loop.compute_shards`, `demo.settings`, ...)
    they import from the library, so a driver's internals stay its own."""
    assert not [hit for path in USERS for hit in foreign_stage_names(path)]


def test_nothing_imports_a_top_level_stages():
    """pytest puts the checkout's root on the path, where `import stages.train` would still work
    (a second copy of the module beside `tec_pipeline.stages.train`); an install has no `stages`."""
    everywhere = [*SOURCES, *ROOT.glob("tests/*.py"), *ROOT.glob("examples/*.py")]
    assert not [f"{p.relative_to(ROOT)}:{line}: {name}" for p in everywhere
                for name, line in imports(p, False) if name.split(".")[0] == "stages"]


def test_enhancement_never_imports_a_model():
    assert not [n for n, _ in imports(ROOT / "tec_pipeline" / "targets.py", False) if n.startswith("tec_pipeline.models")]


def wing_imports(wing: str, other: str, root: Path = ROOT) -> list[str]:
    """Every import, lazy ones included, of the library wing `other` by a module of `wing`."""
    return [f"{p.relative_to(root)}:{line}: {name}" for p in sorted(root.glob(f"tec_pipeline/{wing}/*.py"))
            for name, line in imports(p, False, root) if name == f"tec_pipeline.{other}" or
            name.startswith(f"tec_pipeline.{other}.")]


def test_the_two_stages_wings_never_import_each_other():
    """Stage one's library wing (`cache_targets`) and stage two's (`train`, `finetune`) share only
    what lies below both (the cache, the models, the renderers): a stage-two module that reached
    into stage one (as `train/data.py` once took `check_renderer` from `cache_targets.drift`)
    would make the training road climb sideways into the other stage."""
    assert not [hit for two in ("train", "finetune") for hit in wing_imports(two, "cache_targets")]
    assert not [hit for two in ("train", "finetune") for hit in wing_imports("cache_targets", two)]


def test_the_wing_check_finds_a_sideways_import(tmp_path):
    """The check itself: stage two's data module taking a stage-one function is found."""
    (tmp_path / "tec_pipeline" / "train").mkdir(parents=True)
    (tmp_path / "tec_pipeline" / "train" / "data.py").write_text("from ..cache_targets.drift import check_renderer\n")
    assert wing_imports("train", "cache_targets", tmp_path) == [
        "tec_pipeline/train/data.py:1: tec_pipeline.cache_targets.drift"]


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


def test_the_check_finds_a_stage_import_in_the_library_and_a_drivers_piece_in_a_study(tmp_path):
    """The check itself: a lazy relative import of a stage in the library, and a study or a
    benchmark that takes a driver's helper, a stage module, or the module by a plain import."""
    for folder in ("tec_pipeline/train", "stages", "experiments", "benchmarks"):
        (tmp_path / folder).mkdir(parents=True)
    lazy = tmp_path / "tec_pipeline" / "train" / "loop.py"
    lazy.write_text("def f():\n    from ..stages.train import run_train\n")
    assert stages_imported(lazy, tmp_path) == ["tec_pipeline/train/loop.py:2: imports tec_pipeline.stages.train"]
    study = tmp_path / "experiments" / "seeds.py"
    study.write_text("from tec_pipeline.stages.demo import run_demo, demo_configs\n"
                     "from tec_pipeline.stages.verify import verify_cache\n"
                     "def f():\n    from tec_pipeline.stages import train\n")
    assert foreign_stage_names(study, tmp_path) == [
        "experiments/seeds.py:1: imports demo_configs from tec_pipeline.stages.demo",
        "experiments/seeds.py:4: imports train from tec_pipeline.stages"]
    bench = tmp_path / "benchmarks" / "loop.py"
    bench.write_text("import tec_pipeline.stages.cache_targets\n"
                     "from tec_pipeline.cache_targets.loop import compute_shards\n")
    assert foreign_stage_names(bench, tmp_path) == [
        "benchmarks/loop.py:1: imports the module tec_pipeline.stages.cache_targets"]
    driver = tmp_path / "stages" / "demo.py"
    driver.write_text("from .train import run_train\nfrom stages.verify import verify_cache\n")
    assert module_name(driver, tmp_path) == "tec_pipeline.stages.demo"
    assert imports(driver, True, tmp_path) == [("tec_pipeline.stages.train", 1), ("stages.verify", 2)]
