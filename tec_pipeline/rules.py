"""The stage config's cross-setting rules: values each within its domain (`config.DOMAINS`) that
contradict each other. `config.load_config` checks them right after the domains, before any
command computes or writes anything; a broken rule is one line naming every setting in it
(`domains.check_rules`). Each rule's comment says why it holds.

A rule whose settings are not all set (an architecture size left to timm's default) is checked
again once the default is known: `train.model.check_arch_sizes` for stage two's models.
"""
from __future__ import annotations

import os

from .domains import Rule


def divides(width: int, parts: int) -> bool:
    return width % parts == 0


def num_patches(img_size: int, patch_size: int) -> int:
    """L of an image cut into whole patches (Sec. 2.1): (img_size / patch_size)^2."""
    return (img_size // patch_size) ** 2


def visible_patches(mask_ratio: float, img_size: int, patch_size: int) -> int:
    """Patches the encoder sees under `mask_ratio`, as `models.tec.random_masking` keeps them."""
    return int(num_patches(img_size, patch_size) * (1 - mask_ratio))


def launched_processes() -> int:
    """Processes of this launch: ``WORLD_SIZE``, which torchrun and ``accelerate launch`` set; 1 otherwise."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Tab. 8 linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256


def peak_lr(blr: float, batch_size: int, accum_steps: int) -> float:
    """The peak lr of a schedule (`scaled_lr`) for this launch's processes."""
    return scaled_lr(blr, batch_size * accum_steps * launched_processes())


def masks_some_and_keeps_some(mask_ratio: float, img_size: int, patch_size: int) -> bool:
    return 1 <= visible_patches(mask_ratio, img_size, patch_size) < num_patches(img_size, patch_size)


HEADS = "attention splits the width evenly over the heads: need the width divisible by the heads"
WHOLE_PATCHES = "the image is cut into whole patches: need img_size divisible by patch_size"

# Both schedules (Tab. 8, Tab. 10) warm up, then decay by a half cosine: a warmup as long as the run
# never reaches the peak lr, and the decay never starts
WARMUP_ENDS = Rule(("optim.warmup_epochs", "optim.epochs"), lambda warmup, epochs: warmup == 0 or warmup < epochs,
                   "the warmup must end before the run does: need warmup_epochs < epochs")
# the cosine runs from the peak lr down to min_lr: a min_lr above the peak would raise the lr as the run ends
MIN_LR_BELOW_PEAK = Rule(("optim.min_lr", "optim.blr", "data.batch_size", "optim.accum_steps"),
                         lambda min_lr, blr, batch, accum: min_lr <= peak_lr(blr, batch, accum),
                         "need min_lr <= the peak lr, blr x batch_size x accum_steps x processes / 256")

RULES: tuple[Rule, ...] = (
    # RandomResizedCrop draws each view's area fraction from [scale_min, scale_max]
    Rule(("data.scale_min", "data.scale_max"), lambda low, high: low <= high, "need scale_min <= scale_max"),
    WARMUP_ENDS,
    MIN_LR_BELOW_PEAK,
    # timm's attention (encoder, decoder, base) splits a token's width over the heads
    Rule(("model.arch.embed_dim", "model.arch.num_heads"), divides, HEADS),
    Rule(("model.decoder_dim", "model.decoder_heads"), divides, HEADS),
    Rule(("base.arch.embed_dim", "base.arch.num_heads"), divides, HEADS),
    # Eq. 1: the encoder adapter joins the outputs of each group of adapter_group consecutive blocks
    # (MAE, targets.source=pixels, has no adapters)
    Rule(("model.encoder_adapter", "targets.source", "model.arch.depth", "model.adapter_group"),
         lambda on, source, depth, group: not on or source == "pixels" or divides(depth, group),
         "the encoder adapter groups consecutive blocks (Eq. 1): need depth divisible by adapter_group"),
    # both ViTs cut the same views into patches; every model is built at data.img_size
    Rule(("data.img_size", "model.arch.patch_size"), divides, WHOLE_PATCHES),
    Rule(("data.img_size", "base.arch.patch_size"), divides, WHOLE_PATCHES),
    Rule(("model.arch.img_size", "data.img_size"), lambda arch, data: arch == data,
         "the new encoder is built at data.img_size: leave model.arch.img_size unset or set it equal"),
    Rule(("base.arch.img_size", "data.img_size"), lambda arch, data: arch == data,
         "the base runs at data.img_size: leave base.arch.img_size unset or set it equal"),
    # the feature and attention losses are taken over the masked patches and the encoder needs a
    # visible one: a ratio that masks none gives a loss of 0, one that masks all leaves no input
    Rule(("model.mask_ratio", "data.img_size", "model.arch.patch_size"), masks_some_and_keeps_some,
         "masking keeps int(L x (1 - mask_ratio)) of L = (img_size / patch_size)^2 patches: need at least one "
         "kept and one masked"),
    # the feature target averages the base's last blocks (App. A)
    Rule(("targets.last_layers", "base.arch.depth"), lambda last, depth: last <= depth,
         "the feature target averages the base's last blocks: need last_layers <= depth"),
    # a cache keeps each view's crop: the same views every epoch, never a new one
    Rule(("data.view_mode", "targets.source"), lambda mode, source: mode != "fresh" or source != "cache",
         "a cache holds fixed views, it cannot draw a new crop every epoch: use targets.source=online or "
         "pixels, or data.view_mode=cycle or random"),
    # product quantization's codes per patch mean nothing to the other feature dtypes
    Rule(("cache.pq_subvectors", "cache.feat_dtype"), lambda subvectors, dtype: dtype == "pq",
         "pq_subvectors is the code size of feat_dtype=pq: set feat_dtype=pq or leave pq_subvectors unset"),
    # only a webdataset sample has a member to keep the source image in; its members are zstd
    Rule(("cache.store_images", "cache.store"), lambda keep, store: not keep or store == "webdataset",
         "only webdataset samples keep source images: need cache.store=webdataset"),
    Rule(("cache.compress", "cache.store"), lambda compress, store: compress == "zstd" or store == "zarr",
         "webdataset members are zstd: lz4 and none need cache.store=zarr"),
    # the monitor fits its probe on one labelled split and scores on the other; scored on the
    # images it fits on, the k-NN finds each image itself and the score says nothing
    Rule(("train.monitor.train", "train.monitor.val"), lambda train, val: bool(train) == bool(val),
         "the monitor fits on one labelled split and scores on the other: set both or neither"),
    Rule(("train.monitor.train", "train.monitor.val"), lambda train, val: not train or train != val,
         "scored on the images it fits on, the monitor's score says nothing: give it two different splits"),
)
