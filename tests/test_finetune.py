"""Fine-tuning by Tab. 10: layer-decay groups, Mixup / CutMix targets, a fine-tune that transfers
what its encoder learnt, and exact resume on the CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tec_pipeline.stages.finetune import run_finetune
from tec_pipeline.config import ConfigError
from tec_pipeline.errors import UserError
from tec_pipeline.export import CHECKPOINT
from tec_pipeline.train.checkpoint import load_checkpoint
from tec_pipeline.finetune.config import load_finetune_config
from tec_pipeline.finetune.data import criterion, mixup
from tec_pipeline.config import flatten, to_dict
from tec_pipeline.finetune.model import classifier, make_optimizer, read_encoder
from tec_pipeline.train.schedule import set_lr

DEPTH = 3
TINY_FT = ["model.arch.name=vit_tiny_patch16_224", "model.arch.patch_size=8", "model.arch.embed_dim=32",
           f"model.arch.depth={DEPTH}", "model.arch.num_heads=2", "data.img_size=32", "data.batch_size=4",
           "data.num_workers=0", "train.log_every=1"]


def halves_folder(root: Path, per_class: int, seed: int) -> Path:
    """A separable toy ImageFolder: class `top` is bright above and dark below, `bottom` the reverse
    (a horizontal flip keeps the class), with noise."""
    rng = np.random.default_rng(seed)
    for name, bright_top in (("bottom", False), ("top", True)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (32, 32, 3))
            rows = slice(0, 16) if bright_top else slice(16, 32)
            pixels[rows] += 150
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    halves_folder(root / "train", 8, seed=0)
    halves_folder(root / "val", 8, seed=1)
    return root


def config(toy: Path, out: Path, *extra: str, protocol: str = "finetune"):
    return load_finetune_config(None, [*TINY_FT, f"data.train={toy / 'train'}", f"data.val={toy / 'val'}",
                                       f"output={out}", *extra], protocol)


def test_layer_decay_groups_scale_each_block_as_computed_by_hand(toy, tmp_path):
    cfg = config(toy, tmp_path, "optim.layer_decay=0.65")
    model = classifier(cfg, 2, read_encoder(cfg, flatten(to_dict(cfg))))
    opt = make_optimizer(cfg, model, lr=1e-3)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1  # the embeddings are layer 0
        elif name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        else:  # fc_norm, head
            layer = DEPTH + 1
        assert scale[id(p)] == pytest.approx(0.65 ** (DEPTH + 1 - layer), rel=1e-12), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert decay[id(p)] == (0.0 if no_decay else 0.05), name
    set_lr(opt, 2e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(
        sorted(2e-3 * 0.65 ** (DEPTH + 1 - layer) for layer in range(DEPTH + 2)))


def test_mixup_and_cutmix_targets_are_smoothed_label_mixtures(toy, tmp_path):
    classes, batch, eps = 10, 8, 0.1
    mix = mixup(config(toy, tmp_path), classes)  # Tab. 10: mixup 0.8, cutmix 1.0, smoothing 0.1
    labels = torch.arange(batch) % classes
    seen = set()
    for seed in range(8):
        np.random.seed(seed)
        images = torch.arange(batch, dtype=torch.float64).view(batch, 1, 1, 1).expand(batch, 3, 32, 32).clone()
        mixed, targets = mix(images.clone(), labels)
        targets = targets.double()
        assert torch.allclose(targets.sum(1), torch.ones(batch, dtype=torch.float64), atol=1e-6)
        for i in range(batch):
            j = batch - 1 - i  # timm pairs each image with the batch flipped
            lam = (mixed[i].mean() - j) / (i - j)  # mixup: lam i + (1 - lam) j per pixel; cutmix: by area
            onehot = lambda c: torch.full((classes,), eps / classes, dtype=torch.float64).index_fill_(  # noqa: E731
                0, torch.tensor([c]), 1 - eps + eps / classes)
            expected = lam * onehot(int(labels[i])) + (1 - lam) * onehot(int(labels[j]))
            assert torch.allclose(targets[i], expected, atol=1e-5), (seed, i)
        seen.add("cutmix" if mixed[0].unique().numel() > 1 else "mixup")
    assert seen == {"mixup", "cutmix"}
    logits, soft = torch.randn(4, classes, dtype=torch.float64), targets[:4]
    by_hand = -(soft * logits.log_softmax(1)).sum(1).mean()
    assert criterion(config(toy, tmp_path), mixing=True)(logits, soft).item() == pytest.approx(by_hand.item())


def test_a_pretrained_encoder_beats_its_random_init_twin(toy, tmp_path):
    """A fine-tune transfers its checkpoint: an encoder trained on a larger set of the toy task,
    saved as a base checkpoint ({"model": state_dict}, MAE's layout) and fine-tuned briefly on the
    small set, beats the same brief fine-tune from random init (the task needs position and
    content together, which two epochs on 16 images do not teach a random ViT)."""
    easy = ["aug.auto_augment=null", "aug.reprob=0", "aug.scale_min=0.6", "model.drop_path=0", "aug.mixup=0",
            "aug.cutmix=0", "data.batch_size=8", "model.global_pool=token", "model.arch.patch_size=16"]
    big = halves_folder(tmp_path / "big", 64, seed=5)
    first = run_finetune(config(toy, tmp_path / "pre", *easy, f"data.train={big}", "optim.blr=0.05", "optim.epochs=15",
                                "optim.warmup_epochs=1", "optim.min_lr=0", "optim.layer_decay=1.0"))
    assert first["top1"] > 80, first["epochs"]
    weights = {k: v for k, v in load_checkpoint(tmp_path / "pre" / CHECKPOINT)["model"].items()
               if not k.startswith(("head.", "fc_norm."))}
    torch.save({"model": weights}, tmp_path / "encoder.pth")
    brief = [*easy, "optim.blr=0.01", "optim.epochs=2", "optim.warmup_epochs=0"]
    tuned = run_finetune(config(toy, tmp_path / "tuned", *brief, f"model.checkpoint={tmp_path / 'encoder.pth'}"))
    twin = run_finetune(config(toy, tmp_path / "twin", *brief))
    assert tuned["top1"] > twin["top1"] + 20, (tuned["top1"], twin["top1"])


def test_an_interrupted_run_resumes_to_the_uninterrupted_state(toy, tmp_path):
    """With Tab. 10's augmentation, Mixup / CutMix and drop path all drawing: stop after 3 of 8
    steps, resume, and the weights, AdamW moments, scores and logged losses equal one run's."""
    whole = run_finetune(config(toy, tmp_path / "whole", "optim.epochs=2", "optim.warmup_epochs=1"))
    cut = config(toy, tmp_path / "cut", "optim.epochs=2", "optim.warmup_epochs=1")
    assert not run_finetune(cut, stop_after=3)["finished"]
    resumed = run_finetune(cut, resume=True)
    a, b = load_checkpoint(tmp_path / "whole" / CHECKPOINT), load_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = lambda s: [v for st in s["optimizer"]["state"].values() for v in st.values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))
    assert resumed["epochs"] == whole["epochs"] and resumed["hits"] == whole["hits"]
    lines = lambda d: (tmp_path / d / "log.jsonl").read_text().splitlines()  # noqa: E731
    losses = lambda d: [r.split('"loss": ')[1].split(",")[0] for r in lines(d) if '"loss"' in r]  # noqa: E731
    assert losses("whole") == losses("cut") and len(losses("whole")) == 8


def test_config_errors_are_one_line(toy, tmp_path):
    with pytest.raises(ConfigError, match="^data.batch_size=3, aug.mixup=0.8, aug.cutmix=1: mixup / cutmix pair images"):
        config(toy, tmp_path, "data.batch_size=3")
    with pytest.raises(ConfigError, match="^optim.name=sgd: expected one of adamw, lars$"):
        config(toy, tmp_path, "optim.name=sgd")
    with pytest.raises(ConfigError, match="data.val is not set"):
        load_finetune_config(None, ["data.train=x"])


def test_the_val_split_holds_out_whole_source_digits_of_the_train_folder(tmp_path):
    """``data.split=val`` (demo-finetune --val): train on four fifths of the train digits, score the
    fifth held out; no scored image shares a source digit with a trained one, the test folder is
    not read, and the groups demo-finetune resamples by are those of the scored images, in order."""
    from experiments.demo_finetune import scored_groups
    from tec_pipeline.finetune.splits import open_splits
    from tec_pipeline.demo.data import build_demo_data, group_files
    from tec_pipeline.evaluate.features import labelled_folder
    from tec_pipeline.evaluate.groups import read_groups

    build_demo_data(tmp_path / "demo", train_size=60, test_size=10)
    files = group_files(tmp_path / "demo")
    cfg = load_finetune_config(None, [*TINY_FT, f"data.train={tmp_path / 'demo' / 'train'}", "data.split=val",
                                      f"data.groups={files['train']}", f"output={tmp_path / 'out'}"])
    train_set, val_set, data = open_splits(cfg)
    groups = read_groups(files["train"], labelled_folder(cfg.data.train))
    fit, held = set(groups[train_set.indices]), set(groups[val_set.indices])
    assert fit and held and not fit & held
    assert sorted([*train_set.indices, *val_set.indices]) == list(range(60))
    assert data["split"] == "val" and data["val_images"] == len(val_set) == len(val_set.indices) < 30
    assert val_set[0][1] == train_set.labels[val_set.indices[0]]
    assert scored_groups(cfg, files["test"]).tolist() == groups[val_set.indices].tolist()
    with pytest.raises(ConfigError, match="data.split=dev: expected one of test, val"):
        load_finetune_config(None, [f"data.train={tmp_path}", "data.split=dev"])


def test_demo_finetune_scores_the_three_encoders_of_each_seed_folder(tmp_path):
    """demo-finetune over a demo-seeds folder: seed N's control and TEC come from RUN/seed<N>/ (RUN
    itself where there is none), the report holds each seed's top-1 and paired margins, and --val
    writes its own report. Here every encoder is a copy of the shipped base, so with the same
    fine-tuning seed all three fine-tunes are the same run: every margin is exactly 0."""
    import shutil

    from experiments.demo_finetune import BASE, demo_encoders, run_demo_finetune
    from tec_pipeline.demo.data import build_demo_data

    build_demo_data(tmp_path / "demo", train_size=40, test_size=20)
    run = tmp_path / "run"
    for folder in (run / "seed1", run):
        for name in ("control", "tec"):
            (folder / name).mkdir(parents=True)
            shutil.copy(BASE, folder / name / BASE.name)
    assert demo_encoders(run, 1)["tec"] == run / "seed1" / "tec" / BASE.name
    assert demo_encoders(run, 0)["tec"] == run / "tec" / BASE.name
    tiny = [f"data.train={tmp_path / 'demo' / 'train'}", f"data.val={tmp_path / 'demo' / 'test'}", "data.batch_size=4",
            "data.num_workers=0", "optim.epochs=1", "train.max_steps=2"]
    report = run_demo_finetune(run, [0, 1], overrides=tiny)
    assert [s["seed"] for s in report["seeds"]] == [0, 1]
    for s in report["seeds"]:
        assert s["top1"]["tec"] == s["top1"]["base"] == s["top1"]["control"]
        assert all(m["diff"] == 0 for m in s["margins"].values())
    assert (run / "finetune" / "finetune.json").is_file() and (run / "finetune" / "seed1" / "tec" / "result.json").is_file()
    val = run_demo_finetune(run, [0], overrides=tiny, split="val")
    assert val["split"] == "val" and (run / "finetune_val" / "finetune_val.json").is_file()


def as_webdataset(folder: Path, tar: Path) -> Path:
    """The toy ImageFolder as one webdataset tar, images in the folder's order, the class index in `.cls`."""
    import io
    import tarfile

    from tec_pipeline.data.sources import ImageFolderSource

    source = ImageFolderSource(folder)
    with tarfile.open(tar, "w") as tf:
        for i in range(len(source)):
            for ext, data in (("png", source.raw(i)), ("cls", str(source.label(i)).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return tar


def test_webdataset_splits_fine_tune_exactly_as_the_same_images_in_folders(toy, tmp_path):
    """``data.kind=webdataset``: the same images and classes as tars give the same run, bit for bit
    (weights, scores and per-image hits), as the ImageFolders; an unlabelled tar is one line."""
    tars = {split: as_webdataset(toy / split, tmp_path / f"{split}.tar") for split in ("train", "val")}
    steps = ["optim.epochs=1", "optim.warmup_epochs=0"]
    folders = run_finetune(config(toy, tmp_path / "folders", *steps))
    wds = run_finetune(config(toy, tmp_path / "wds", *steps, "data.kind=webdataset", f"data.train={tars['train']}",
                              f"data.val={tars['val']}"))
    assert wds["epochs"] == folders["epochs"] and wds["hits"] == folders["hits"] and len(wds["hits"]) == 16
    a, b = load_checkpoint(tmp_path / "folders" / CHECKPOINT), load_checkpoint(tmp_path / "wds" / CHECKPOINT)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    import tarfile

    with tarfile.open(tmp_path / "nolabel.tar", "w") as tf:
        tf.add(next((toy / "val" / "top").iterdir()), arcname="x.png")
    with pytest.raises(UserError, match=r"nolabel.tar: fine-tuning needs a .cls class index for every image; .*x.png has none$"):
        run_finetune(config(toy, tmp_path / "bad", *steps, "data.kind=webdataset", f"data.train={tars['train']}",
                            f"data.val={tmp_path / 'nolabel.tar'}"))


def test_two_processes_fine_tune_as_one_process_with_their_whole_batch(toy, tmp_path):
    """accelerate over 2 processes (gloo, as `accelerate launch --cpu`): batch 2 each gives what one
    process gives at batch 4: the same views (seeded by image, not by rank), lr, weights, and the
    val hits gathered back in val order. Mixup and drop path draw per rank, so they are off here."""
    import json

    from helpers import run_as_ranks

    plain = ["aug.mixup=0", "aug.cutmix=0", "model.drop_path=0", "optim.epochs=2", "optim.warmup_epochs=1"]
    whole = run_finetune(config(toy, tmp_path / "whole", *plain, "data.batch_size=4"))
    assert run_as_ranks(run_finetune, config(toy, tmp_path / "ranks", *plain, "data.batch_size=2")) == [0, 0]
    ranks = json.loads((tmp_path / "ranks" / "result.json").read_text())
    assert ranks["step"] == whole["step"] == 8 and ranks["hits"] == whole["hits"] and len(ranks["hits"]) == 16
    a, b = load_checkpoint(tmp_path / "whole" / CHECKPOINT), load_checkpoint(tmp_path / "ranks" / CHECKPOINT)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def _finetune_in_child(cfg) -> None:
    run_finetune(cfg)


def test_bf16_autocast_fine_tunes_and_differs_from_fp32_only_by_rounding(toy, tmp_path):
    """``optim.mixed_precision=bf16`` (accelerate's autocast, on the CPU here; in a process of its own,
    since accelerate keeps one precision per process): the run finishes, and its weights are close to
    the fp32 run's but not equal (the forward really ran in bf16)."""
    from helpers import run_as_ranks

    steps = ["optim.epochs=1", "optim.warmup_epochs=0", "aug.mixup=0", "aug.cutmix=0"]
    fp32 = run_finetune(config(toy, tmp_path / "fp32", *steps))
    assert run_as_ranks(_finetune_in_child, config(toy, tmp_path / "bf16", *steps, "optim.mixed_precision=bf16"),
                        world=1) == [0]
    assert fp32["finished"] and (tmp_path / "bf16" / "result.json").is_file()
    a, b = load_checkpoint(tmp_path / "fp32" / CHECKPOINT)["model"], load_checkpoint(tmp_path / "bf16" / CHECKPOINT)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2
