"""Typed configs: YAML + dotted overrides, and one clear line for every bad key or value."""
from pathlib import Path

import pytest

from tec_pipeline.config import Config, ConfigError, flatten, load_config, to_dict

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
    ("targets.norm=batch", "targets.norm=batch: expected one of patch, channel, none"),
    ("cache.feat_dtype=int4", "cache.feat_dtype=int4: expected one of float32, float16, int8"),
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


# ----------------------------------------------------------------------------- files and domains
@pytest.mark.parametrize("content, needle", [
    ("data: {views: 2}\ndata: {views: 3}\n", "line 2: key 'data' appears twice"),
    ("model:\n  mask_ratio: 0.5\n  mask_ratio: 0.9\n", "line 3: key 'mask_ratio' appears twice"),
    ("", "the config file is empty"),
    ("# only a comment\n", "the config file is empty"),
    ("- a\n- b\n", "must hold a mapping, got list"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a text file"),
    (b"seed: 1\x00\n", "not a text file"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)) and needle in str(info.value) and "\n" not in str(info.value)


def test_a_directory_given_as_config_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match=r"a directory, not a config file$"):
        load_config(tmp_path)


def leaves(schema) -> set[str]:
    return set(flatten(to_dict(schema())))


def test_every_setting_has_a_declared_domain():
    from tec_pipeline.config import DOMAINS
    from tec_pipeline.finetune.config import DOMAINS as FT_DOMAINS, FinetuneConfig

    assert leaves(Config) - {"cache.storage_options"} == set(DOMAINS) - {"cache.storage_options"}
    assert "cache.storage_options" in DOMAINS  # a mapping: flatten() shows none of its (absent) keys
    assert leaves(FinetuneConfig) == set(FT_DOMAINS)


@pytest.mark.parametrize("override, allowed", [
    ("model.mask_ratio=1.5", "model.mask_ratio=1.5: expected a value in (0, 1)"),
    ("model.mask_ratio=-0.1", "model.mask_ratio=-0.1: expected a value in (0, 1)"),
    ("targets.tau=-1", "targets.tau=-1.0: expected a value > 0"),
    ("targets.tau=0", "targets.tau=0.0: expected a value > 0"),
    ("optim.blr=nan", "optim.blr=nan: expected a finite number, a value > 0"),
    ("optim.blr=inf", "optim.blr=inf: expected a finite number, a value > 0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0: expected a value >= 0"),
    ("data.batch_size=0", "data.batch_size=0: expected a value >= 1"),
    ("targets.k=-3", "targets.k=-3: expected a value >= 0"),
    ("seed=-1", "seed=-1: expected a value in [0, 4294967295]"),
    ("cache.zstd_level=23", "cache.zstd_level=23: expected a value in [-131072, 22]"),
    ("data.views=1000000000", "data.views=1000000000: expected a value in [1, 1024]"),
    ("train.max_steps=0", "train.max_steps=0: expected a value >= 1"),
])
def test_a_value_outside_its_domain_is_one_line_naming_the_key_and_range(override, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == allowed


def test_a_config_file_value_is_held_to_its_domain_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {mask_ratio: 1.5}\n")
    with pytest.raises(ConfigError, match=r"^model.mask_ratio=1.5: expected a value in \(0, 1\)$"):
        load_config(path)
    assert load_config(path, ["model.mask_ratio=0.9"]).model.mask_ratio == 0.9  # the last layer counts


@pytest.mark.parametrize("override, allowed", [
    ("optim.layer_decay=-1", "optim.layer_decay=-1.0: expected a value in (0, 1]"),
    ("optim.layer_decay=0", "optim.layer_decay=0.0: expected a value in (0, 1]"),
    ("data.batch_size=0", "data.batch_size=0: expected a value >= 1"),
    ("aug.smoothing=1", "aug.smoothing=1.0: expected a value in [0, 1)"),
])
def test_fine_tuning_settings_are_held_to_their_domains(override, allowed):
    from tec_pipeline.finetune.config import load_finetune_config

    with pytest.raises(ConfigError) as info:
        load_finetune_config(None, ["data.train=a", "data.val=b", override])
    assert str(info.value) == allowed


@pytest.mark.parametrize("spelling", ["no", "off", "false", "'no'"])
def test_mixed_precision_no_is_read_as_the_name_not_a_boolean(tmp_path, spelling):
    """YAML reads no, off and false as the boolean false: on the command line and in a file the
    setting whose allowed names include "no" still gets "no"."""
    from tec_pipeline.finetune.config import load_finetune_config

    assert load_config(None, [f"optim.mixed_precision={spelling}"]).optim.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text(f"optim: {{mixed_precision: {spelling}}}\n")
    assert load_config(path).optim.mixed_precision == "no"
    ft = load_finetune_config(None, [f"optim.mixed_precision={spelling}", "data.train=a", "data.val=b"])
    assert ft.optim.mixed_precision == "no"
    with pytest.raises(ConfigError, match="optim.mixed_precision"):
        load_config(None, ["optim.mixed_precision=yes"])
