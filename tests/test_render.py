"""The view renderers (`tec_pipeline.render`): DALI against PIL on the same crops, undecodable files,
and both stages with ``data.loader=dali`` on DALI's CPU pipelines (as they run on CUDA with
``mixed`` decoding): same bytes and losses on a rerun, training's resume, two processes, the
renderer in the cache's identity, and training with another renderer than the cache's only where
its measured drift is below int8's own error. Stage one's kill-and-resume and bad files run with
both renderers in tests/test_cache_targets.py."""
import io
import json
import platform

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_as_ranks
from tec_pipeline.stages.cache_targets import run_cache_targets
from tec_pipeline.stages.train import run_train
from tec_pipeline.stages.verify import verify_cache
from tec_pipeline.cache.store import open_cache
from tec_pipeline.cache.fidelity import INT8_FEAT_REL_RMS, UINT8_ATTN_KL
from tec_pipeline.train.data import check_renderer
from tec_pipeline.config import load_config
from tec_pipeline.errors import UserError
from tec_pipeline.export import CHECKPOINT
from tec_pipeline.train.checkpoint import load_checkpoint
from tec_pipeline.render import dali_missing, open_renderer, pack_files, render_files, resolve_loader, unpack_files
from tec_pipeline.views import ViewParams, sample_view
from test_cache_targets import arrays, assert_same, overrides
from test_train import read_log

if dali_missing() and platform.machine() != "x86_64":
    pytest.skip(f"{dali_missing()}: DALI has no wheel for {platform.machine()} here", allow_module_level=True)

CPU = torch.device("cpu")
TRAIN = ["model.arch.name=vit_tiny_patch16_224", "model.arch.img_size=32", "model.arch.patch_size=8",
         "model.arch.embed_dim=32", "model.arch.depth=3", "model.arch.num_heads=2", "model.decoder_dim=32",
         "model.decoder_heads=2", "model.decoder_depth=1", "data.batch_size=4", "optim.epochs=2",
         "optim.blr=0.05", "targets.k=3", "train.log_every=1"]


def photo_jpeg() -> bytes:
    """A 500 x 375 JPEG of a real photograph (scikit-learn's sample)."""
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((500, 375), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    photo.save(out, format="JPEG", quality=90)
    return out.getvalue()


def render_both(files: list[bytes], crops: np.ndarray, size: int):
    encoded = [np.frombuffer(f, np.uint8) for f in files]
    return [open_renderer(name, size, CPU, 8).render(encoded, crops) for name in ("pil", "dali")]


# ----------------------------------------------------------------------------- renderers


def test_packed_files_come_back_unchanged():
    files = [b"abc", b"", b"\xff\x00z"]
    assert [bytes(f) for f in unpack_files(pack_files(files))] == files


def test_the_decoded_window_holds_the_crop_and_its_filter_margin():
    from tec_pipeline.render_dali import decode_window  # DALI's module: imported where DALI is

    anchor, shape, start, end = decode_window(ViewParams(10, 3, 100, 50, False), size=25)  # 4x down in height
    assert anchor == [1, 0]  # a margin of 2 x 4 + 1 pixels, cut at the left edge
    assert start == [9.0, 3.0] and end == [109.0, 53.0]
    assert shape == [9 + 100 + 9, 3 + 50 + 9]
    anchor, _, start, _ = decode_window(ViewParams(40, 40, 10, 10, True), size=32)  # upscaling: margin 3
    assert anchor == [37, 37] and start == [3.0, 3.0]


def test_dali_renders_the_crops_pil_renders():
    """The same 32 crops of a photo: DALI's pixels within a grey level or two of PIL's."""
    crops = np.stack([sample_view(0, 0, v, 375, 500).as_array() for v in range(32)])
    (pil, pil_err), (dali, dali_err) = render_both([photo_jpeg()] * 32, crops, 224)
    assert not any(pil_err) and not any(dali_err)
    diff = (pil.int() - dali.int()).abs().float()
    assert diff.mean() < 0.3 and diff.quantile(0.99) <= 1 and diff.max() <= 8
    flipped = [i for i in range(32) if crops[i, 4]]
    assert flipped and (dali[flipped].int() - pil[flipped].int()).abs().float().mean() < 0.3


def test_an_undecodable_file_is_named_and_the_others_render(capfd):
    good = photo_jpeg()
    files = [good, good[:len(good) // 3], b"just text", good]
    crops = np.stack([sample_view(0, 0, v, 375, 500).as_array() for v in range(4)])
    views, errors = open_renderer("dali", 64, CPU, 4).render([np.frombuffer(f, np.uint8) for f in files], crops)
    assert [bool(e) for e in errors] == [False, True, True, False]
    assert all("\n" not in e and e.startswith("cannot decode image") for e in errors if e)
    assert "Premature end of JPEG data" in errors[1]  # the decoder's own reason, in the one line
    assert capfd.readouterr().err == ""  # and not printed again by the decoder
    assert not views[1:3].any() and views[0].any()
    alone, _ = open_renderer("dali", 64, CPU, 4).render([np.frombuffer(good, np.uint8)], crops[3:])
    assert torch.equal(views[3], alone[0])  # a failed batch does not change the views that rendered
    skipped, errs = render_files(open_renderer("dali", 64, CPU, 4), pack_files(files), crops, 1,
                                 np.array([True, False, False, True]))
    assert not any(errs) and torch.equal(skipped, views)  # files marked invalid are not decoded


def test_the_loader_setting_resolves_per_device(monkeypatch, capsys):
    assert resolve_loader("auto", CPU) == "pil" and resolve_loader("dali", CPU) == "dali"
    monkeypatch.setattr("tec_pipeline.render.dali_missing", lambda: "NVIDIA DALI is not installed (test)")
    with pytest.raises(UserError, match="data.loader=dali: NVIDIA DALI is not installed") as err:
        resolve_loader("dali", CPU)
    assert "\n" not in str(err.value)
    assert resolve_loader("auto", torch.device("cuda")) == "pil"
    assert capsys.readouterr().out.count("\n") == 1  # one line says why auto fell back to pil


# ----------------------------------------------------------------------------- stage one


@pytest.fixture(scope="module")
def dali_cache(images, tmp_path_factory):
    url = tmp_path_factory.mktemp("dali") / "dali.zarr"
    run_cache_targets(load_config(None, overrides(url, images, "data.loader=dali")))
    return url


def test_stage_one_with_dali_is_reproducible_and_records_its_renderer(dali_cache, images, tmp_path):
    again = tmp_path / "again.zarr"
    run_cache_targets(load_config(None, overrides(again, images, "data.loader=dali")))
    assert_same(arrays(dali_cache), arrays(again))
    pil = tmp_path / "pil.zarr"
    run_cache_targets(load_config(None, overrides(pil, images, "data.loader=pil")))
    assert np.array_equal(arrays(pil)["crop"], arrays(dali_cache)["crop"])  # crops drawn from the header's size
    reader = open_cache(str(dali_cache))
    assert reader.meta["identity"]["data"]["loader"] == "dali"
    drift = reader.summary["renderer_drift"]["pil"]
    assert 0 < drift["feat_rel_rms"] < INT8_FEAT_REL_RMS and drift["attn_kl"] < UINT8_ATTN_KL
    with pytest.raises(UserError, match="data.loader"):  # another renderer is another cache
        run_cache_targets(load_config(None, overrides(dali_cache, images, "data.loader=pil")))
    assert verify_cache(str(dali_cache), sample=8)
    from tec_pipeline.cache.inspect import describe_cache

    assert "views rendered by: dali (targets' drift under pil: feature rel RMS" in describe_cache(str(dali_cache))


def test_stage_one_with_dali_in_two_processes_gives_the_same_arrays(dali_cache, images, tmp_path):
    url = tmp_path / "two.zarr"
    cfg = load_config(None, overrides(url, images, "data.loader=dali"))
    assert run_as_ranks(run_cache_targets, cfg, timeout=120) == [0, 0]
    assert_same(arrays(url), arrays(dali_cache))


# ----------------------------------------------------------------------------- stage two


def train_config(cache, images, out, *extra: str):
    return load_config(None, overrides(cache, images) + TRAIN + [f"output={out}", *extra])


def test_training_with_dali_is_reproducible_and_resumes(dali_cache, images, tmp_path):
    full = train_config(dali_cache, images, tmp_path / "full", "data.loader=dali", "train.checkpoint_every=2")
    run_train(full)
    again = train_config(dali_cache, images, tmp_path / "again", "data.loader=dali")
    run_train(again)
    assert [r["loss"] for r in read_log(tmp_path / "full")] == [r["loss"] for r in read_log(tmp_path / "again")]
    part = train_config(dali_cache, images, tmp_path / "part", "data.loader=dali", "train.checkpoint_every=2")
    run_train(part, stop_after=3)
    run_train(part, resume=True)
    a, b = (load_checkpoint(tmp_path / name / CHECKPOINT) for name in ("full", "part"))
    assert a["step"] == b["step"] > 3
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    identity = json.loads((tmp_path / "full" / "identity.json").read_text())
    assert identity["renderer"] == "dali"


def test_training_with_dali_in_two_processes_matches_one(dali_cache, images, tmp_path):
    one = train_config(dali_cache, images, tmp_path / "one", "data.loader=dali", "data.batch_size=8",
                       "train.max_steps=2")
    run_train(one)
    two = train_config(dali_cache, images, tmp_path / "two", "data.loader=dali", "train.max_steps=2")
    assert run_as_ranks(run_train, two) == [0, 0]
    assert [r["loss"] for r in read_log(tmp_path / "two")] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "one")], rel=1e-5)


def test_another_renderer_trains_only_below_int8_error(dali_cache, images, tmp_path, capsys):
    cfg = train_config(dali_cache, images, tmp_path / "pil", "data.loader=pil", "train.max_steps=1")
    run_train(cfg)
    assert "data.loader=pil: the cache was rendered with dali" in capsys.readouterr().out
    assert json.loads((tmp_path / "pil" / "identity.json").read_text())["renderer"] == "pil"
    meta = open_cache(str(dali_cache)).meta
    with pytest.raises(UserError, match="data.loader=pil: .* not measured .* set data.loader=dali"):
        check_renderer(meta, {}, "pil")
    far = {"renderer_drift": {"pil": {"feat_rel_rms": 2 * INT8_FEAT_REL_RMS, "attn_kl": 0.0}}}
    with pytest.raises(UserError, match="above int8's own") as err:
        check_renderer(meta, far, "pil")
    assert "\n" not in str(err.value)
    check_renderer(meta, {}, "dali")  # its own renderer needs no measurement


def test_a_training_batch_renders_alike_either_way(dali_cache, images):
    from tec_pipeline.train.data import open_data

    views = {}
    for loader in ("pil", "dali"):
        cfg = train_config(dali_cache, images, "unused", f"data.loader={loader}")
        data = open_data(cfg)
        batch = {**data.make_batch(np.arange(4), np.zeros(4, dtype=np.int64)), "index": torch.arange(4)}
        assert ("images" in batch) == (loader == "pil") and ("files" in batch) == (loader == "dali")
        views[loader] = data.views_of(batch)
    diff = (views["pil"].int() - views["dali"].int()).abs().float()
    assert views["dali"].shape == (4, 3, 32, 32) and diff.mean() < 1.5


def test_a_batch_of_good_files_hands_the_renderers_views_over_as_they_are():
    """The usual batch (no file skipped) is the renderer's own tensor: no index of rows is made
    and copied to the device (on CUDA an unpinned copy made the host wait for the device). With
    a skipped file, the kept rows are placed by an index and the skipped views stay black."""
    made = []

    class Recording:
        name, size, device = "dali", 8, CPU

        def render(self, encoded, crops):
            made.append(torch.full((len(crops), 3, 8, 8), len(made) + 1, dtype=torch.uint8))
            return made[-1], [""] * len(crops)

    files = pack_files([b"a", b"bb", b"ccc"])
    crops = np.zeros((6, 5), np.int32)
    views, errors = render_files(Recording(), files, crops, 2)
    assert views is made[0] and errors == ["", "", ""]
    views, _ = render_files(Recording(), files, crops, 2, np.array([True, False, True]))
    assert views[[0, 1, 4, 5]].eq(2).all() and not views[2:4].any()
