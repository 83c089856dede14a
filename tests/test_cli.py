"""The `tec-pipeline` command line: help of every command, one-line errors, `eval --groups`, and
`ablate` end to end; the studies' command line (`python -m experiments`) beside it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import TINY_BASE_ARGS, TINY_MODEL_ARGS, write_images

from experiments.__main__ import app as studies_app
from tec_pipeline.cli import app

# Wide enough that rich never wraps an option name in the help panels.
RUNNER = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})

# The options (or argument names) a user looks for in each command's --help.
KEY_OPTIONS = {
    "cache-targets": ["--config", "--overwrite", "--dry-run", "OVERRIDES"],
    "train": ["--config", "--resume", "OVERRIDES"],
    "export": ["RUN", "--out"],
    "inspect": ["CACHE"],
    "verify": ["CACHE", "--sample", "--seed"],
    "eval": ["--model", "--train-dir", "--test-dir", "--val", "--groups", "--arch", "--pool", "--out"],
    "demo": ["--out", "--seed", "--second-round", "--val"],
    "ablate": ["CONFIGS", "--cache", "--config", "--output"],
}
PRODUCT_COMMANDS = ["cache-targets", "inspect", "verify", "train", "ablate", "export", "finetune", "linprobe", "eval",
                    "demo"]
STUDY_OPTIONS = {
    "demo-seeds": ["--seed", "--out", "--val", "OVERRIDES"],
    "demo-base": ["--out", "OVERRIDES"],
    "demo-finetune": ["--run", "--seed", "--out", "--val", "OVERRIDES"],
    "caching-costs": ["--seed", "--out", "--only", "--val", "--set"],
    "reuse": ["--seed", "--out", "--only"],
}
ROOT = Path(__file__).resolve().parents[1]

TINY_BASE, TINY_MODEL = TINY_BASE_ARGS, TINY_MODEL_ARGS


def invoke(*args: str):
    return RUNNER.invoke(app, [str(a) for a in args])


def command_names(typer_app=app) -> list[str]:
    return [c.name or c.callback.__name__.replace("_", "-") for c in typer_app.registered_commands]


def listed_commands(help_text: str) -> list[str]:
    """The command names of a --help's Commands panel, in order."""
    panel = help_text[help_text.index("Commands"):]
    return re.findall(r"^│ ([a-z][a-z-]*)  ", panel, flags=re.MULTILINE)


# ----------------------------------------------------------------------------- help
def test_every_command_is_listed_in_the_top_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in command_names():
        assert name in result.stdout


@pytest.mark.parametrize("name", command_names())
def test_help_of_every_command_mentions_its_key_options(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and name in result.stdout
    for option in KEY_OPTIONS.get(name, []):
        assert option.lower() in result.stdout.lower(), (name, option)


def test_every_documented_command_exists():
    assert set(KEY_OPTIONS) <= set(command_names())


def test_the_product_lists_exactly_its_commands():
    """The studies are not product commands: they run with `python -m experiments`."""
    result = invoke("--help")
    assert sorted(listed_commands(result.stdout)) == sorted(PRODUCT_COMMANDS), result.stdout
    assert sorted(command_names()) == sorted(PRODUCT_COMMANDS)


def test_python_m_experiments_lists_the_studies():
    """Run as the studies are run: from the repository root, where `experiments` is importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, "-m", "experiments", "--help"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "python -m experiments" in result.stdout
    assert listed_commands(result.stdout) == list(STUDY_OPTIONS)


@pytest.mark.parametrize("name", list(STUDY_OPTIONS))
def test_help_of_every_study_mentions_its_key_options(name):
    result = RUNNER.invoke(studies_app, [name, "--help"])
    assert result.exit_code == 0, result.output
    for option in STUDY_OPTIONS[name]:
        assert option.lower() in result.stdout.lower(), (name, option)


def test_a_study_reports_bad_input_as_the_product_does():
    result = RUNNER.invoke(studies_app, ["caching-costs", "--only", "tec-V3"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown variant 'tec-V3'"), result.stderr


def test_a_study_meeting_an_os_error_is_one_line_naming_the_path(tmp_path, monkeypatch):
    """The studies run under the product's guard: an OSError on a path the user gave is one line."""
    monkeypatch.delenv("TEC_DEBUG", raising=False)
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    result = RUNNER.invoke(studies_app, ["demo-seeds", "--seed", "0", "--out", str(taken)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(taken) in lines[0] and "demo-seeds" in lines[0], result.stderr


# ----------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("command", ["cache-targets", "train"])
@pytest.mark.parametrize("override, key", [("targets.kk=3", "targets.kk"), ("optim.epochs=many", "optim.epochs"),
                                           ("cache.feat_dtype=int4", "cache.feat_dtype")])
def test_bad_override_is_one_stderr_line_naming_the_key(command, override, key):
    result = invoke(command, override)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr
    assert result.stdout == ""


def test_ablate_checks_overrides_before_any_run(tmp_path):
    result = invoke("ablate", "configs/ablations", "--cache", tmp_path, "targets.kk=3")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "targets.kk" in lines[0]


@pytest.mark.parametrize("args, needle", [
    (["ablate", "no/such.yaml", "--cache", "."], "no/such.yaml"),
    (["ablate", "configs/ablations", "--cache", "no/such/cache.zarr"], "--cache"),
    (["ablate", "targets.k=3", "--cache", "."], "no ablation configs"),
])
def test_ablate_bad_paths_are_one_line(args, needle):
    result = invoke(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.mark.parametrize("model", ["foo", "=ckpt.pt", "name="])
def test_eval_malformed_model_exits_2(model, tmp_path):
    result = invoke("eval", "--model", model, "--train-dir", tmp_path, "--test-dir", tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NAME=CHECKPOINT" in lines[0] and model in lines[0]


@pytest.mark.parametrize("split", [[], ["--test-dir", "t", "--val"]])
def test_eval_needs_exactly_one_of_test_dir_and_val(split, tmp_path):
    result = invoke("eval", "--model", "a=b.pth", "--train-dir", tmp_path, *split)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--test-dir" in lines[0] and "--val" in lines[0]


def test_eval_groups_by_the_groups_file_given(tmp_path, monkeypatch):
    """`--groups` hands `run_eval` the group of each training image in the folder's order; on a demo
    build, its train_groups.csv gives each image's source digit as its manifest records it (image
    i of the split rendered source digit images.source[i]). Without --groups there are none."""
    import json

    from tec_pipeline.demo.data import build_demo_data
    from tec_pipeline.evaluate import report
    from tec_pipeline.evaluate.features import labelled_folder

    seen = []
    monkeypatch.setattr(report, "run_eval", lambda *args, **kwargs: seen.append(kwargs["train_groups"]))
    build_demo_data(tmp_path / "demo", train_size=20, test_size=5)
    train = tmp_path / "demo" / "train"
    for groups in (["--groups", tmp_path / "demo" / "train_groups.csv"], []):
        result = invoke("eval", "--model", "a=b.pth", "--train-dir", train, "--val", *groups)
        assert result.exit_code == 0, result.output
    sources = json.loads((tmp_path / "demo" / "manifest.json").read_text())["images"]["train"]["source"]
    digits = [sources[int(Path(f).stem)] for f in labelled_folder(train).files]
    assert seen[0].tolist() == digits and len(digits) == 20 and seen[1] is None


def test_eval_bad_groups_file_is_one_line(tmp_path):
    write_images(tmp_path / "train" / "a", 2)
    (tmp_path / "g.csv").write_text("image,group\nb/0.png,1\n")
    result = invoke("eval", "--model", "a=b.pth", "--train-dir", tmp_path / "train", "--val", "--groups", tmp_path / "g.csv")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "g.csv, row 2: image 'b/0.png' is not in" in lines[0], result.stderr


# ----------------------------------------------------------------------------- ablate end to end
@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """12 small pictures and a stage-one cache of them from a random-init tiny base, made by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    images = write_images(root / "images", 12, size=(40, 48))
    cache = root / "cache.zarr"
    result = invoke("cache-targets", *TINY_BASE, f"data.path={images}", "data.img_size=32", "data.views=1",
                    "data.batch_size=12", "data.num_workers=0", f"cache.path={cache}", "cache.k_max=3",
                    "cache.images_per_shard=4")
    assert result.exit_code == 0, result.output
    return {"images": images, "cache": cache, "root": root}


def _ablation_dir(root: Path) -> Path:
    folder = root / "ablations"
    folder.mkdir(exist_ok=True)
    (folder / "x1_full.yaml").write_text("# Tab. 6(a) tiny full TEC\ntargets: {norm: patch, attention: topk, k: 3}\n"
                                         "model: {input_adapter: true, encoder_adapter: true}\n")
    (folder / "x2_feature_only.yaml").write_text("# Tab. 6(a) tiny patch-norm feature only\n"
                                                 "targets: {norm: patch, attention: none}\n"
                                                 "model: {input_adapter: false, encoder_adapter: false}\n")
    (folder / "notes.txt").write_text("not an ablation")
    return folder


def test_ablate_directory_prints_a_table_with_both_rows(tiny_cache, tmp_path):
    folder = _ablation_dir(tmp_path)
    out = tmp_path / "runs"
    args = ["ablate", folder, "--cache", tiny_cache["cache"], "--output", out, *TINY_MODEL,
            f"data.path={tiny_cache['images']}", "data.num_workers=0"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("x")}
    assert list(rows) == ["x1_full", "x2_feature_only"]  # sorted, notes.txt ignored
    head = next(line for line in result.stdout.splitlines() if line.startswith("ablation"))
    assert all(col in head for col in ("steps", "loss", "L_fea", "L_att"))
    assert rows["x1_full"].split()[-4:-3] == ["3"]  # 12 images / batch 4, one epoch
    assert all(np.isfinite(float(v)) for v in rows["x1_full"].split()[-3:])
    assert rows["x2_feature_only"].split()[-1] == "-"  # no attention target
    assert (out / "x1_full" / "checkpoint.pt").exists() and (out / "x2_feature_only" / "checkpoint.pt").exists()

    # A row the cache cannot serve is refused, the finished one is read back, and the status says so.
    (folder / "x3_k_too_big.yaml").write_text("# Tab. 6(f) k beyond the cache\ntargets: {attention: topk, k: 8}\n")
    again = invoke("ablate", folder / "x1_full.yaml", folder / "x3_k_too_big.yaml", *args[2:])
    assert again.exit_code == 1, again.output
    lines = {line.split()[0]: line for line in again.stdout.splitlines() if line.startswith("x")}
    assert lines["x1_full"] == rows["x1_full"]
    assert "refused: targets.k=8 exceeds the cache's k_max=3" in lines["x3_k_too_big"]

    # A row whose settings equal an earlier row's (Tab. 6's a1 = c3 = f1) is that row, not trained again.
    (folder / "x4_same_as_x2.yaml").write_text("# Tab. 6(c) the reference again\ntargets: {attention: none}\n"
                                               "model: {encoder_adapter: false, input_adapter: false}\n")
    third = invoke("ablate", folder / "x2_feature_only.yaml", folder / "x4_same_as_x2.yaml", *args[2:])
    assert third.exit_code == 0, third.output
    lines = {line.split()[0]: line for line in third.stdout.splitlines() if line.startswith("x")}
    assert lines["x4_same_as_x2"].split()[1:3] == ["=", "x2"]
    assert lines["x4_same_as_x2"].split()[-4:] == rows["x2_feature_only"].split()[-4:]
    assert not (out / "x4_same_as_x2").exists()
