"""The new model of a stage-two run (Fig. 4) from its config: its arguments, its first weights
(fresh, Tab. 6d's base encoder, or another run's), checked against what the targets can serve."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Optional

from accelerate.utils import set_seed

from ..config import Config, TargetConfig, ViTArch, flatten, to_dict
from ..errors import UserError
from ..export import build_model
from ..models.base import check_sizes, load_base_model
from ..rules import RULES
from .checkpoint import init_from_base, init_from_checkpoint
from .spec import TargetSpec, check_request

if TYPE_CHECKING:
    from .data import DataPipeline


def base_arch(cfg: Config, meta: Optional[dict]) -> ViTArch:
    """The base's architecture: the one a cache recorded it was made with, else the config's."""
    recorded = ((meta or {}).get("base") or {}).get("arch")
    return ViTArch(**recorded) if recorded else cfg.base.arch


def effective_targets(cfg: Config) -> TargetConfig:
    """The target settings a run uses: pixels (MAE) have no attention target and no norm choice."""
    if cfg.targets.source == "pixels":
        return replace(cfg.targets, attention="none", norm="patch")
    return cfg.targets


def model_kwargs(cfg: Config, spec: TargetSpec) -> dict:
    """`TECModel` arguments for this run; stored in every checkpoint so export can rebuild it."""
    m, t = cfg.model, effective_targets(cfg)
    pixels = cfg.targets.source == "pixels"
    attn = t.attention != "none"
    return {
        "arch": asdict(replace(m.arch, img_size=cfg.data.img_size)),
        "feat_dim": spec.feat_dim,
        "attn_dim": spec.feat_dim if attn else 0,
        "attn_heads": spec.heads if attn else 0,
        "input_adapter": m.input_adapter and not pixels,  # MAE has no adapters
        "encoder_adapter": m.encoder_adapter and not pixels,
        "adapter_group": m.adapter_group,
        "decoder_dim": m.decoder_dim,
        "decoder_depth": m.decoder_depth,
        "decoder_heads": m.decoder_heads,
        "adapter_norm_eps": m.adapter_norm_eps,
        "patch_bias_init": m.patch_bias_init,
    }


def step_graph(cfg: Config) -> str:
    """The settings the compiled step's graph depends on, as one string: the model and its target
    branches (Tab. 6's adapters, norm, attention, k, tau), the mask ratio, the batch's shape, the
    source and the precision. Epochs, lr, seed and the first weights (Tab. 6d, e) are not among
    them: runs that differ only there share one compiled step. The base's width comes from the
    cache, the same for every run that reads it."""
    model = {k: v for k, v in asdict(cfg.model).items() if k not in ("init_from_base", "init_checkpoint")}
    return json.dumps({"model": model, "targets": asdict(effective_targets(cfg)), "img_size": cfg.data.img_size,
                       "batch_size": cfg.data.batch_size, "precision": cfg.optim.mixed_precision}, sort_keys=True)


def new_model(cfg: Config, data: "DataPipeline"):
    """The new model at its first step, checked against what the targets can serve, and its
    `model_kwargs`: freshly initialised (seeded right before, so whatever ran earlier, a base
    model build, cannot shift it), then Tab. 6d's base encoder and/or another run's weights."""
    check_sizes(flatten(to_dict(cfg)), "model.arch", RULES)  # sizes left to timm's defaults, resolved
    t, kwargs = effective_targets(cfg), model_kwargs(cfg, data.spec)
    set_seed(cfg.seed)
    model = build_model(kwargs)
    check_request(data.spec, img_size=cfg.data.img_size, num_patches=model.encoder.patch_embed.num_patches,
                  k=t.k, attention=t.attention, what="the cache" if data.source == "cache" else "the base model")
    if cfg.model.init_from_base:
        # a cached run may name no base: the cache records the checkpoint it was made with
        checkpoint = cfg.base.checkpoint or ((data.meta or {}).get("base") or {}).get("checkpoint")
        if not checkpoint:
            raise UserError("model.init_from_base=true needs base.checkpoint (the base model's weights)")
        base = data.base or load_base_model(base_arch(cfg, data.meta), checkpoint, img_size=cfg.data.img_size)
        init_from_base(model, base, checkpoint)
    if cfg.model.init_checkpoint:
        init_from_checkpoint(model, cfg.model.init_checkpoint)
    return model, kwargs
