"""Fine-tuning and linear-probing settings: the Tab. 10 defaults, the Tab. 11 layer over them, one
loader (`config.load_structured`: YAML and dotted overrides, one-line errors) for both commands."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError, ViTArch, load_structured
from ..domains import (
    BETA, COUNT, FLAG, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, Domain, Free, OneOf, Range, Rule, vit_arch,
)
from ..rules import HEADS, MIN_LR_BELOW_PEAK, WARMUP_ENDS, WHOLE_PATCHES, divides


@dataclass
class FtModel:
    """The encoder to score and the head put on it."""

    checkpoint: Optional[str] = None  # our export, a run's checkpoint.pt, any base checkpoint; None: random init
    arch: ViTArch = field(default_factory=ViTArch)  # used where the checkpoint records no architecture
    drop_path: float = 0.1  # stochastic depth, timm's ViT drop_path_rate
    global_pool: str = "avg"  # avg: mean of patch tokens then a fresh fc_norm (MAE's head) | token: cls after norm
    head_init_std: float = 2e-5  # truncated normal of the head weight (MAE: 2e-5 fine-tune, 0.01 probe)
    input_adapter: bool = False  # probe only, Tab. 4 "+ input adapter FT": the cls MLP of a TEC run trains too


@dataclass
class FtData:
    """Labelled ImageFolder splits (root/<class>/image); batch per process, as in stage two."""

    kind: str = "imagefolder"  # imagefolder (root/<class>/image) | webdataset (tars, a .cls class index per image)
    train: str = ""  # a folder, or a tar pattern (`train-{0000..0127}.tar`) with kind webdataset
    val: str = ""  # scored on with split "test"
    split: str = "test"  # test: score on data.val | val: hold out a fifth of data.train
    groups: str = ""  # split val: a groups file (CSV image,group) of data.train; the fifth holds out whole groups
    img_size: int = 224
    batch_size: int = 128  # per process: 8 GPUs x 128 = 1024 (Tab. 10)
    num_workers: int = 8
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct (bicubic), centre crop


@dataclass
class FtAug:
    """Tab. 10's augmentation, timm's names; Tab. 11 switches all but crop and flip off."""

    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # RandAugment (9, 0.5)
    scale_min: float = 0.08  # RandomResizedCrop scale (scale_min, 1)
    reprob: float = 0.25  # random erasing, pixel mode
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5  # mixup or cutmix per batch
    smoothing: float = 0.1


@dataclass
class FtOptim:
    """Tab. 10: AdamW with layer-wise lr decay; Tab. 11: LARS. lr = blr x effective batch / 256."""

    name: str = "adamw"  # adamw | lars
    blr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.9  # LARS
    layer_decay: float = 0.75  # the configs set 0.55 (MAE-B), 0.65 (iBOT-B, MAE-L)
    epochs: int = 100
    warmup_epochs: float = 20
    min_lr: float = 1e-6
    accum_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16


@dataclass
class FtTrain:
    max_steps: Optional[int] = None  # optimizer steps of the whole schedule (default: epochs x steps per epoch)
    log_every: int = 10
    checkpoint_every: int = 1000  # optimizer steps between checkpoints; one after every epoch's evaluation too
    compile: Optional[bool] = None  # torch.compile the step's forward and loss; None: on with CUDA, off elsewhere


@dataclass
class FinetuneConfig:
    protocol: str = "finetune"  # finetune (Tab. 10) | linprobe (Tab. 11)
    seed: int = 0
    output: str = "runs/finetune"
    model: FtModel = field(default_factory=FtModel)
    data: FtData = field(default_factory=FtData)
    aug: FtAug = field(default_factory=FtAug)
    optim: FtOptim = field(default_factory=FtOptim)
    train: FtTrain = field(default_factory=FtTrain)


# Tab. 11 over Tab. 10: LARS at blr 0.1, no weight decay, 90 epochs with 10 of warmup to lr 0;
# RandomResizedCrop + flip only; the cls token after the final norm, no drop path (MAE's probe).
LINPROBE = {"protocol": "linprobe",
            "model": {"drop_path": 0.0, "global_pool": "token", "head_init_std": 0.01},
            "data": {"batch_size": 2048},  # per process: 8 GPUs x 2048 = 16384
            "aug": {"auto_augment": None, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0},
            "optim": {"name": "lars", "blr": 0.1, "weight_decay": 0.0, "epochs": 90, "warmup_epochs": 10,
                      "min_lr": 0.0}}
PROTOCOL_DEFAULTS = {"finetune": None, "linprobe": LINPROBE}
DOMAINS: dict[str, Domain] = {  # every setting's allowed values, as `config.DOMAINS`
    "protocol": OneOf(tuple(PROTOCOL_DEFAULTS)),
    "seed": SEED,
    "output": Free("a folder"),
    "model.checkpoint": Free("a checkpoint file"),
    **vit_arch("model.arch"),
    "model.drop_path": Range(0, 1, high_open=True),
    "model.global_pool": OneOf(("avg", "token")),
    "model.head_init_std": POSITIVE,
    "model.input_adapter": FLAG,
    "data.kind": OneOf(("imagefolder", "webdataset")),
    "data.train": Free("an image folder or tar pattern"),
    "data.val": Free("an image folder or tar pattern"),
    "data.split": OneOf(("test", "val")),
    "data.groups": Free("a groups file (CSV image,group)"),
    "data.img_size": COUNT,
    "data.batch_size": COUNT,
    "data.num_workers": NON_NEGATIVE,
    "data.crop_pct": Range(0, 1, low_open=True),
    "aug.auto_augment": Free("a timm RandAugment string"),
    "aug.scale_min": Range(0, 1, low_open=True),
    "aug.reprob": PROBABILITY,
    "aug.mixup": NON_NEGATIVE,  # Beta(alpha, alpha); 0: off
    "aug.cutmix": NON_NEGATIVE,
    "aug.mixup_prob": PROBABILITY,
    "aug.switch_prob": PROBABILITY,
    "aug.smoothing": Range(0, 1, high_open=True),
    "optim.name": OneOf(("adamw", "lars")),
    "optim.blr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": BETA,
    "optim.beta2": BETA,
    "optim.momentum": BETA,
    "optim.layer_decay": Range(0, 1, low_open=True),  # block i's lr scale is layer_decay ** (depth - i)
    "optim.epochs": COUNT,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.accum_steps": COUNT,
    "optim.mixed_precision": OneOf(("no", "bf16", "fp16")),
    "train.max_steps": COUNT,
    "train.log_every": COUNT,
    "train.checkpoint_every": COUNT,
    "train.compile": FLAG,
}


# The settings' cross rules (as `rules.RULES` for stage configs), checked at load after `DOMAINS`.
RULES: tuple[Rule, ...] = (
    WARMUP_ENDS,
    MIN_LR_BELOW_PEAK,
    # mixup and cutmix mix each image with the batch's flipped order: pairs need an even batch
    Rule(("data.batch_size", "aug.mixup", "aug.cutmix"),
         lambda batch, mix, cut: (mix == 0 and cut == 0) or batch % 2 == 0,
         "mixup / cutmix pair images: need an even batch_size (or both off)"),
    # top-1 on the images the classifier trained on says nothing of the encoder (data.split=val holds
    # out a fifth of data.train instead)
    Rule(("data.train", "data.val", "data.split"), lambda train, val, split: split == "val" or train != val,
         "scored on the images it trains on, the score says nothing: give data.val another split, or set "
         "data.split=val"),
    # the input adapter is a TEC run's, trained with a frozen encoder: Tab. 4's probe variant only
    Rule(("model.input_adapter", "protocol"), lambda adapter, protocol: not adapter or protocol == "linprobe",
         "the input adapter is Tab. 4's probe variant: use `tec-pipeline linprobe`"),
    # timm's attention splits a token's width over the heads; the encoder is built at data.img_size
    Rule(("model.arch.embed_dim", "model.arch.num_heads"), divides, HEADS),
    Rule(("data.img_size", "model.arch.patch_size"), divides, WHOLE_PATCHES),
    Rule(("model.arch.img_size", "data.img_size"), lambda arch, data: arch == data,
         "the encoder is built at data.img_size: leave model.arch.img_size unset or set it equal"),
)


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                         protocol: str = "finetune") -> FinetuneConfig:
    """Tab. 10 defaults <- Tab. 11 (linprobe) <- YAML <- overrides; refused where the file is the
    other protocol's or a setting cannot work (odd batch under mixup, adapter outside the probe)."""
    cfg = load_structured(FinetuneConfig, [path], overrides, DOMAINS, PROTOCOL_DEFAULTS[protocol], RULES)
    if cfg.protocol != protocol:
        raise ConfigError(f"{path}: a {cfg.protocol} config; run it with `tec-pipeline {cfg.protocol}`")
    for key in ("train", "val") if cfg.data.split == "test" else ("train",):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key} is not set (a labelled ImageFolder root/<class>/image, or webdataset "
                              f"tars with data.kind=webdataset)")
    return cfg
