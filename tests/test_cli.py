"""The `tec-pipeline` command line: help of every command, one-line errors, and `ablate` end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import TINY_BASE_ARGS, TINY_MODEL_ARGS, write_images

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
    "eval": ["--model", "--train-dir", "--test-dir", "--val", "--arch", "--pool", "--out"],
    "demo": ["--out", "--seed", "--second-round", "--val"],
    "demo-seeds": ["--seed", "--out", "--val"],
    "demo-base": ["--out"],
    "ablate": ["CONFIGS", "--cache", "--config", "--output"],
}

TINY_BASE, TINY_MODEL = TINY_BASE_ARGS, TINY_MODEL_ARGS


def invoke(*args: str):
    return RUNNER.invoke(app, [str(a) for a in args])


def command_names() -> list[str]:
    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


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


def test_eval_holds_out_whole_source_digits_on_a_demo_build_only(tmp_path, monkeypatch):
    """The command looks up each training image's source digit on a demo build and hands it to
    `run_eval`; a copy of the same folder outside the build has none."""
    import shutil

    from tec_pipeline.data.demo import build_demo_data, source_groups
    from tec_pipeline.evaluate import report
    from tec_pipeline.evaluate.features import labelled_folder

    seen = []
    monkeypatch.setattr(report, "run_eval", lambda *args, **kwargs: seen.append(kwargs["train_groups"]))
    build_demo_data(tmp_path / "demo", train_size=20, test_size=5)
    shutil.copytree(tmp_path / "demo" / "train", tmp_path / "plain")
    for train in (tmp_path / "demo" / "train", tmp_path / "plain"):
        result = invoke("eval", "--model", "a=b.pth", "--train-dir", train, "--val")
        assert result.exit_code == 0, result.output
    assert seen[0].tolist() == source_groups(labelled_folder(tmp_path / "demo" / "train")).tolist()
    assert len(seen[0]) == 20 and seen[1] is None


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
