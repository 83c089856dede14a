"""Tab. 6 ablations from one cache: every row's YAML, the runner's table, and the settings it varies."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import TINY_BASE, TINY_MODEL_ARGS, build_memory_cache, write_images
from tec_pipeline.stages.ablate import run_ablations
from tec_pipeline.config import Config, ConfigError, flatten, load_config, to_dict
from tec_pipeline.data.sources import ImageFolderSource
from tec_pipeline.models.base import base_forward, load_base_model
from tec_pipeline.models.tec import TECModel
from tec_pipeline.targets import channel_normalize, feature_target
from tec_pipeline.cache.codecs import decode_batch
from tec_pipeline.train.batches import CachedBatches
from tec_pipeline.train.model import init_from_base
from tec_pipeline.train.model import model_kwargs
from tec_pipeline.train.data import TargetSpec
from tec_pipeline.views import normalize

ABLATIONS = Path(__file__).resolve().parents[1] / "configs" / "ablations"
BASE = TINY_BASE
TINY = [*TINY_MODEL_ARGS, "data.num_workers=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    write_images(root, 12, size=(40, 48))
    torch.manual_seed(0)
    base = load_base_model(BASE, None)
    torch.save(base.state_dict(), root / "base.pth")
    source = ImageFolderSource(root)
    cache = build_memory_cache(base, source, 32, views=1, seed=0, k_max=15, images_per_shard=4, source_path=str(root))
    return {"root": root, "base": base, "source": source, "cache": cache}


def test_one_yaml_per_tab6_row_each_loads():
    files = sorted(ABLATIONS.glob("*.yaml"))
    counts = {part: sum(f.name.startswith(part) for f in files) for part in "abcdef"}
    assert counts == {"a": 4, "b": 3, "c": 3, "d": 2, "e": 2, "f": 4}
    seen = set()
    for f in files:
        assert f.read_text().startswith(f"# Tab. 6({f.name[0]})"), f.name
        settings = flatten(yaml.safe_load(f.read_text()))
        seen.add(tuple(sorted(settings.items())))
        cfg = flatten(to_dict(load_config(None, extra_files=[f])))
        for key, value in settings.items():
            assert cfg[key] == value, (f.name, key)
    assert len(seen) >= 12  # rows repeated across sub-tables (a1 = b1 = c3) aside, they differ


def test_unknown_field_until_config_has_it():
    """d1 needs model.init_from_base; today the schema refuses it with one line (the runner marks the row)."""
    try:
        load_config(None, ["model.init_from_base=true"])
    except ConfigError as err:
        assert "model.init_from_base" in str(err)
    else:  # config.py has the field now: it must be a bool that defaults to false
        assert load_config(None, []).model.init_from_base is False


def test_runner_trains_each_row_from_one_cache_and_prints_a_table(world, tmp_path, capsys):
    paths = [ABLATIONS / f"{n}.yaml" for n in
             ("a1_patchnorm", "a4_patchnorm_attention_adapters", "c1_norm_none", "b2_input_adapter",
              "f3_attention_all")]
    rows = run_ablations(paths, world["cache"], [*TINY, f"data.path={world['root']}"],
                         output=str(tmp_path / "abl"))
    by = {r["name"]: r for r in rows}
    assert [r["status"] for r in rows[:4]] == ["done"] * 4
    assert all(r["step"] == 3 for r in rows[:4])  # 12 images / batch 4, one epoch
    assert "loss_att" not in by["a1_patchnorm"] and "loss_att" in by["a4_patchnorm_attention_adapters"]
    assert by["c1_norm_none"]["loss_fea"] != pytest.approx(by["a1_patchnorm"]["loss_fea"], rel=1e-3)
    assert by["f3_attention_all"]["status"] == "refused: targets.k=196 exceeds the cache's k_max=15"
    table = capsys.readouterr().out
    assert "a4_patchnorm_attention_adapters" in table and "refused: targets.k=196" in table
    again = run_ablations(paths[:1], world["cache"], [*TINY, f"data.path={world['root']}"], output=str(tmp_path / "abl"))
    assert again[0]["loss"] == by["a1_patchnorm"]["loss"]  # a finished row is read back, not retrained


def test_norm_modes_are_recovered_from_the_stored_statistics(world):
    """Tab. 6(c): raw and channel-normalized features come back from Yf, mean and std."""
    make = CachedBatches(world["cache"], world["source"], 32, attn_rows=1, buffer_shards=1)
    batch = make(np.arange(4), np.zeros(4, dtype=np.int64))
    t = decode_batch(batch, "cpu")
    raw = base_forward(world["base"], normalize(batch["images"]), 2).features
    assert torch.allclose(feature_target(t, "none"), raw, atol=1e-5)
    assert torch.allclose(feature_target(t, "channel"), channel_normalize(raw), atol=1e-4)
    assert torch.equal(feature_target(t, "patch"), t.feat)


@pytest.mark.parametrize("adapters, expected", [("none", (False, False)), ("input", (True, False)),
                                                 ("encoder", (False, True)), ("both", (True, True))])
def test_adapter_switches(adapters, expected):
    cfg = Config()
    cfg.model = replace(cfg.model, input_adapter=adapters in ("input", "both"),
                        encoder_adapter=adapters in ("encoder", "both"))
    spec = TargetSpec(img_size=224, num_patches=196, feat_dim=768, heads=12, k_max=15)
    kwargs = model_kwargs(cfg, spec)
    assert (kwargs["input_adapter"], kwargs["encoder_adapter"]) == expected


def test_init_from_base_copies_matching_weights(world):
    """Tab. 6(d) Load: a new encoder of the base's shape takes its weights (pos-embed stays sin-cos)."""
    path = world["root"] / "base.pth"
    model = TECModel(BASE, feat_dim=32, decoder_dim=32, decoder_depth=1, decoder_heads=2, encoder_adapter=False)
    pos = model.encoder.pos_embed.clone()
    copied = init_from_base(model, load_base_model(BASE, path), str(path))
    base_sd = world["base"].state_dict()
    assert copied == len(base_sd) - 1
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, base_sd["blocks.1.attn.qkv.weight"])
    # the cls token as the base's first block sees it: the new encoder's cls position is zero
    assert torch.equal(model.encoder.cls_token, base_sd["cls_token"] + base_sd["pos_embed"][:, :1])
    assert torch.equal(model.encoder.pos_embed, pos)
    other = TECModel(replace(BASE, embed_dim=48, num_heads=3), feat_dim=32, decoder_dim=32, decoder_depth=1,
                     decoder_heads=2, encoder_adapter=False)
    with pytest.raises(Exception, match="no weight"):
        init_from_base(other, load_base_model(BASE, path), str(path))


def test_cls_only_attention_trains(world, tmp_path):
    """Tab. 6(f) "cls token only": the attention target is the cls row alone (k = 0)."""
    rows = run_ablations([ABLATIONS / "f2_attention_cls_only.yaml"], world["cache"],
                         [*TINY, f"data.path={world['root']}"], output=str(tmp_path / "abl"))
    assert rows[0]["status"] == "done" and np.isfinite(rows[0]["loss_att"])
