"""Typed configs: YAML + dotted overrides, and one clear line for every bad key or value."""
from pathlib import Path

import pytest

from tec_pipeline.config import Config, ConfigError, load_config, to_dict

SHIPPED = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
SCORING = ("finetune_", "linprobe_")  # configs of `tec-pipeline finetune` / `linprobe`, their own schema
CONFIGS = [p for p in SHIPPED if not p.name.startswith(SCORING)]


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nmodel:\n  arch:\n    depth: 6\ntargets:\n  k: 9\n")
    cfg = load_config(path, ["targets.k=5", "model.arch.embed_dim=128", "targets.tau=0.5"])
    assert isinstance(cfg, Config)
    assert (cfg.seed, cfg.model.arch.depth, cfg.targets.k, cfg.model.arch.embed_dim, cfg.targets.tau) == (3, 6, 5, 128, 0.5)
    assert cfg.targets.norm == "patch"  # schema default kept
    assert to_dict(cfg)["targets"]["k"] == 5


@pytest.mark.parametrize("override,expected", [
    ("model.dept=6", "'model.dept'"),
    ("model.arch.depth=six", "'model.arch.depth'"),
    ("targets.norm=batch", "'targets.norm'"),
    ("cache.feat_dtype=int4", "'cache.feat_dtype'"),
    ("nosuchsection.x=1", "'nosuchsection'"),
    ("seed", "not of the form key=value"),
])
def test_bad_override_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  blr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: bad config key 'optim.blr'"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("seed: !!python/object/apply:os.system ['true']\n")  # safe_load refuses tags
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name.startswith(SCORING)], ids=lambda p: p.name)
def test_shipped_scoring_configs_load(path):
    from tec_pipeline.finetune.config import load_finetune_config

    protocol = path.name.split("_")[0]
    assert load_finetune_config(path, protocol=protocol).protocol == protocol
