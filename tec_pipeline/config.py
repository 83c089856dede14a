"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

OmegaConf does the merging and type checking (a well-kept library that already
validates keys and coerces ``"6"`` -> ``6``); this module defines the schema and each setting's
allowed values (`DOMAINS`), reads config files strictly (duplicate keys, binary or empty files
refused) and turns OmegaConf's multi-line errors into one line that names the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_file import read_yaml
from .domains import (
    BETA, COUNT, FLAG, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, Domain, Free, OneOf, Range, Rule, check_domains,
    check_rules, vit_arch,
)
from .errors import ConfigError
from .rules import RULES


@dataclass
class ViTArch:
    """A timm ViT: a registered model name plus the sizes that override its defaults."""

    name: str = "vit_base_patch16_224"
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None


@dataclass
class BaseConfig:
    """The frozen base model that produces the targets."""

    arch: ViTArch = field(default_factory=ViTArch)
    checkpoint: Optional[str] = None
    compute_dtype: str = "auto"  # stage one's forward: auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | fp32


@dataclass
class TargetConfig:
    """Target enhancement (Sec. 2.3) and the ablation switches of Tab. 6."""

    source: str = "cache"  # cache | online | pixels
    last_layers: int = 2  # feature target = mean of the last blocks' outputs (App. A)
    k: int = 15  # selected patches (Tab. 9)
    tau: float = 1.8  # temperature on the attention target (Tab. 9)
    norm: str = "patch"  # patch | channel | none (Tab. 6c)
    attention: str = "topk"  # topk | cls_only | none (Tab. 6f)


@dataclass
class ModelConfig:
    """The new model: encoder, adapters (Sec. 2.2) and multi-target decoder."""

    arch: ViTArch = field(default_factory=ViTArch)
    input_adapter: bool = True
    encoder_adapter: bool = True
    adapter_group: int = 3  # blocks per encoder-adapter group (Eq. 1)
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    init_from_base: bool = False  # Tab. 6d: start the encoder from the base weights (needs base.checkpoint)
    init_checkpoint: Optional[str] = None  # start the whole model from a run's checkpoint (e.g. the control)
    # Two initialisation details where we differ from the authors' code:
    adapter_norm_eps: float = 1e-6  # LayerNorm eps of the encoder adapters; theirs: 1e-5 (PyTorch's default)
    patch_bias_init: str = "zeros"  # zeros (MAE's model) | torch (theirs: the Conv2d's default draw kept)


@dataclass
class DataConfig:
    """Where images come from and how views are drawn (RandomResizedCrop + flip)."""

    kind: str = "imagefolder"  # imagefolder | webdataset | demo
    path: str = ""
    img_size: int = 224
    views: int = 1
    scale_min: float = 0.2
    scale_max: float = 1.0
    batch_size: int = 64
    num_workers: int = 2
    # who renders views: pil (loader workers decode and resize) | dali (workers read bytes, DALI renders
    # on the compute device) | auto (dali on CUDA where DALI is installed, else pil)
    loader: str = "auto"
    on_bad_image: str = "error"  # error | skip
    # training: epoch e uses view e mod V (cycle), a seeded random one of the V (random), or, online
    # only, a new crop drawn by (seed, epoch, image) (fresh: the authors' regime)
    view_mode: str = "cycle"
    buffer_shards: int = 4  # training: decoded cache shards held for shuffling
    # training: batches the loader makes ahead of the step, all its workers together; on CUDA each is
    # pinned host memory (~150 MB at batch 512 of ViT-B/16 int8 targets + JPEGs), so 6 keeps a node of
    # 8 processes near 10 GB while 6 batches in the making keep up with a fast GPU
    prefetch_batches: int = 6


@dataclass
class OptimConfig:
    """AdamW with per-iteration warmup and half-cycle cosine (Tab. 8)."""

    blr: float = 1.5e-4
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    epochs: int = 1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    accum_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    decay_tokens: bool = False  # weight decay on the cls token and mask tokens too (the authors' optimizer)


@dataclass
class MonitorConfig:
    """Stage two's online score (`tec_pipeline.train.monitor`): the encoder as it would be exported,
    scored on frozen features of a labelled train / val pair while the run trains, against the
    base's score. Off while `train` and `val` are empty."""

    train: str = ""  # labelled images to fit on: an ImageFolder (root/<class>/x.png) or webdataset tars (.cls)
    val: str = ""  # labelled images to score, of the same kind
    kind: str = "imagefolder"  # imagefolder | webdataset
    max_images: int = 0  # of each of train and val, evenly spaced in its order; 0: all
    every: int = 0  # optimizer steps between evaluations; 0: every `every_epochs` epochs
    every_epochs: int = 1
    protocol: str = "knn"  # the score guarded and drawn: knn | linear (k-NN is logged either way)
    k: int = 20  # the weighted k-NN's neighbours, as `eval --k`
    temperature: float = 0.07  # its temperature, as eval's T
    pool: str = "mean"  # mean of patch tokens | cls token (an MAE base never trains its cls token)
    batch_size: int = 128  # images per forward, per process
    drop_margin: float = 0.05  # a score this far (top-1, a fraction) below the best seen is a drop
    below_base_after: Optional[float] = 0.5  # past this fraction of the run, a score below the base's warns; None: never
    stop_on_drop: bool = False  # on a warning, write a checkpoint and stop (one line, exit 2)
    probe_at_end: bool = False  # protocol knn: the linear probe too, at the last step


@dataclass
class TrainConfig:
    """Loop settings of stage two."""

    max_steps: Optional[int] = None  # optimizer steps of the whole schedule (default: epochs x steps per epoch)
    log_every: int = 1  # optimizer steps between log records (JSONL, trackers, progress bar)
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (one at the end too)
    compile: Optional[bool] = None  # torch.compile the step's forward and losses; None: on with CUDA, off elsewhere
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass
class CacheConfig:
    """Stage one's output: store kind, storage dtypes and shard size."""

    path: str = "cache/default.zarr"  # a local path or an fsspec URL
    store: str = "zarr"  # zarr | webdataset
    k_max: int = 15  # attention rows stored; any k <= k_max is a prefix
    # float32 | float16 | int8 | pq: product-quantized on a PCA basis fitted per cache, pq_subvectors
    # uint8 codes per patch (see docs/architecture.md)
    feat_dtype: str = "float16"
    pq_subvectors: Optional[int] = None  # feat_dtype=pq: codes (bytes) per patch, dividing the base's width; required
    attn_dtype: str = "float16"  # float32 | float16 | uint8
    images_per_shard: int = 256
    compress: str = "zstd"  # zstd | lz4 | none: the chunks' codec (lz4 / none: zarr only)
    zstd_level: int = 1  # with compress=zstd
    store_images: bool = False  # webdataset: keep the encoded source image in each sample
    # fsspec options of cache.path's filesystem, e.g. {endpoint_url: ..., key: ..., secret: ...} for
    # s3://; credentials otherwise come from the usual places (environment, ~/.aws)
    storage_options: dict = field(default_factory=dict)
    writer_threads: Optional[int] = None  # shards compressed and written at once (default: cores, at most 4)
    direct_io: bool = True  # local zarr shard files written with O_DIRECT (no page-cache copy); same bytes


@dataclass
class Config:
    """Everything one run needs; `configs/*.yaml` files fill in parts of it."""

    seed: int = 0
    output: str = "runs/default"
    base: BaseConfig = field(default_factory=BaseConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


# Every setting's allowed values (`domains`), checked when a config is loaded, before anything is
# computed or written; then the rules settings keep with each other (`rules.RULES`: warmup within
# the run, widths their heads divide, ...). What needs a file as well (k <= a cache's k_max) is
# checked where the file is opened.
DOMAINS: dict[str, Domain] = {
    "seed": SEED,
    "output": Free("a folder"),
    **vit_arch("base.arch"),
    "base.checkpoint": Free("a checkpoint file"),
    "base.compute_dtype": OneOf(("auto", "fp16", "bf16", "fp32")),
    "targets.source": OneOf(("cache", "online", "pixels")),
    "targets.last_layers": COUNT,
    "targets.k": NON_NEGATIVE,  # 0: the cls row alone
    "targets.tau": POSITIVE,  # a temperature divides the logits
    "targets.norm": OneOf(("patch", "channel", "none")),
    "targets.attention": OneOf(("topk", "cls_only", "none")),
    **vit_arch("model.arch"),
    "model.input_adapter": FLAG,
    "model.encoder_adapter": FLAG,
    "model.adapter_group": COUNT,
    "model.decoder_dim": COUNT,
    "model.decoder_depth": NON_NEGATIVE,  # 0: the target branches alone
    "model.decoder_heads": COUNT,
    # 0 masks no patch (the losses, over masked patches, are 0); 1 leaves none visible
    "model.mask_ratio": Range(0, 1, low_open=True, high_open=True),
    "model.init_from_base": FLAG,
    "model.init_checkpoint": Free("a checkpoint file"),
    "model.adapter_norm_eps": POSITIVE,
    "model.patch_bias_init": OneOf(("zeros", "torch")),
    "data.kind": OneOf(("imagefolder", "webdataset", "demo")),
    "data.path": Free("an image folder or tar pattern"),
    "data.img_size": COUNT,
    # stage one renders all views of an image and runs them through the base in one batch (its
    # batches never split an image), so V bounds one step's memory: 1024 views of 224 px are 150 MB
    "data.views": Range(1, 1024),
    "data.scale_min": Range(0, 1, low_open=True),
    "data.scale_max": Range(0, 1, low_open=True),
    "data.batch_size": COUNT,
    "data.num_workers": NON_NEGATIVE,
    "data.loader": OneOf(("auto", "pil", "dali")),
    "data.on_bad_image": OneOf(("error", "skip")),
    "data.view_mode": OneOf(("cycle", "random", "fresh")),
    "data.buffer_shards": COUNT,
    "data.prefetch_batches": COUNT,
    "optim.blr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": BETA,
    "optim.beta2": BETA,
    "optim.epochs": COUNT,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.accum_steps": COUNT,
    "optim.mixed_precision": OneOf(("no", "bf16", "fp16")),
    "optim.decay_tokens": FLAG,
    "train.max_steps": COUNT,
    "train.log_every": COUNT,
    "train.checkpoint_every": COUNT,
    "train.compile": FLAG,
    "train.monitor.train": Free("a labelled image folder or tar pattern"),
    "train.monitor.val": Free("a labelled image folder or tar pattern"),
    "train.monitor.kind": OneOf(("imagefolder", "webdataset")),
    "train.monitor.max_images": NON_NEGATIVE,  # 0: all
    "train.monitor.every": NON_NEGATIVE,  # 0: by epochs
    "train.monitor.every_epochs": COUNT,
    "train.monitor.protocol": OneOf(("knn", "linear")),
    "train.monitor.k": COUNT,
    "train.monitor.temperature": POSITIVE,  # divides the similarities
    "train.monitor.pool": OneOf(("mean", "cls")),
    "train.monitor.batch_size": COUNT,
    "train.monitor.drop_margin": PROBABILITY,  # top-1 is a fraction
    "train.monitor.below_base_after": PROBABILITY,  # a fraction of the run; None: never
    "train.monitor.stop_on_drop": FLAG,
    "train.monitor.probe_at_end": FLAG,
    "cache.path": Free("a folder or fsspec URL"),
    "cache.store": OneOf(("zarr", "webdataset")),
    "cache.k_max": COUNT,  # zarr cannot chunk an empty axis; k=0 is a prefix of any k_max
    "cache.feat_dtype": OneOf(("float32", "float16", "int8", "pq")),
    "cache.pq_subvectors": COUNT,  # must divide the base's feature width: checked once the base is built
    "cache.attn_dtype": OneOf(("float32", "float16", "uint8")),
    "cache.images_per_shard": COUNT,
    "cache.compress": OneOf(("zstd", "lz4", "none")),
    "cache.zstd_level": Range(-131072, 22),  # zstd's levels; negative ones are its fast levels
    "cache.store_images": FLAG,
    "cache.storage_options": Free("a mapping of fsspec options"),
    "cache.writer_threads": COUNT,
    "cache.direct_io": FLAG,
}


def _one_line(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return ConfigError(f"{origin}: bad config key '{key}': {msg}")


def load_structured(schema: type, paths: Sequence[str | Path | None], overrides: Sequence[str],
                    domains: dict[str, Domain], defaults: Optional[dict] = None, rules: tuple[Rule, ...] = ()):
    """A dataclass `schema`'s defaults <- `defaults` <- YAML files in order <- dotted overrides,
    type-checked, then every key of `domains` held to its domain and every rule of `rules` kept;
    every error one line."""
    layers = [("defaults", OmegaConf.create(defaults))] if defaults else []
    layers += [(str(path), OmegaConf.create(read_yaml(path))) for path in paths if path is not None]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
    cfg = OmegaConf.structured(schema)
    for origin, layer in layers:
        words_back(layer, domains)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _one_line(err, origin) from None
    check_domains(lambda key: OmegaConf.select(cfg, key), domains, ConfigError)
    check_rules(lambda key: OmegaConf.select(cfg, key), rules, ConfigError)
    return OmegaConf.to_object(cfg)


def words_back(layer, domains: dict[str, Domain]) -> None:
    """YAML reads `no` (and off, false) as the boolean false, in files and in dotted overrides alike;
    a setting whose allowed names include "no" (``optim.mixed_precision``) gets that name back."""
    for key, domain in domains.items():
        if isinstance(domain, OneOf) and "no" in domain.values and OmegaConf.select(layer, key) is False:
            OmegaConf.update(layer, key, "no")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                extra_files: Sequence[str | Path] = ()) -> Config:
    """Schema defaults <- YAML file <- `extra_files` (e.g. an ablation row) <- dotted overrides
    (``model.depth=6``), type-checked and held to `DOMAINS` and `rules.RULES`."""
    return load_structured(Config, [path, *extra_files], overrides, DOMAINS, rules=RULES)


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def to_dict(cfg) -> dict[str, Any]:
    """A plain dict of the config, for metadata, logs and checkpoints; credentials among
    ``cache.storage_options`` are written as "<redacted>", never in the clear."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    options = out.get("cache", {}).get("storage_options", {})  # any config dataclass; only stage configs have one
    for name in options:
        if any(word in name.lower() for word in SECRET_WORDS):
            options[name] = "<redacted>"
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf}, the keys spelled as overrides name them ("data.views")."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
