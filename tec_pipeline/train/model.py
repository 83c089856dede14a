"""The new model of a stage-two run (Fig. 4) from its config: its arguments, the target settings
it trains with, the graph its compiled step depends on, and its first weights (fresh, Tab. 6d's
base encoder, or another run's), checked against what the targets can serve."""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed

from ..config import Config, TargetConfig, ViTArch
from ..errors import UserError
from ..models.base import NoFinalNorm, check_sizes, load_base_model
from ..models.checkpoints import read_safetensors
from ..models.tec import TECModel
from ..rules import RULES
from .checkpoint import build_model, load_checkpoint
from .data import TargetSpec, TrainData, check_request


def base_arch(cfg: Config, meta: Optional[dict]) -> ViTArch:
    """The base's architecture: the one a cache recorded it was made with, else the config's."""
    recorded = ((meta or {}).get("base") or {}).get("arch")
    return ViTArch(**recorded) if recorded else cfg.base.arch


def base_checkpoint(cfg: Config, data: TrainData) -> Optional[str]:
    """The base's weights: ``base.checkpoint``, else the checkpoint the cache records it was made
    with (a cached run may name no base); None where the run has neither."""
    return cfg.base.checkpoint or ((data.meta or {}).get("base") or {}).get("checkpoint")


def run_base(cfg: Config, data: TrainData, checkpoint: Optional[str]):
    """The run's frozen base: the online run's, already loaded, else `checkpoint` (`base_checkpoint`)
    built at `base_arch` and ``data.img_size``."""
    if data.base is not None:
        return data.base
    return load_base_model(base_arch(cfg, data.meta), checkpoint, img_size=cfg.data.img_size)


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


def check_arch_sizes(settings: dict, source: str) -> None:
    """The new encoder's sizes (and an online run's base's) that the config left to timm's
    defaults, resolved and held to `rules.RULES`: the config's own check could not see them."""
    check_sizes(settings, "model.arch", RULES)
    if source == "online":
        check_sizes(settings, "base.arch", RULES)


def new_model(cfg: Config, data: TrainData):
    """The new model at its first step, checked against what the targets can serve, and its
    `model_kwargs`: freshly initialised (seeded right before, so whatever ran earlier, a base
    model build, cannot shift it), then Tab. 6d's base encoder and/or another run's weights."""
    t, kwargs = effective_targets(cfg), model_kwargs(cfg, data.spec)
    set_seed(cfg.seed)
    model = build_model(kwargs)
    check_request(data.spec, img_size=cfg.data.img_size, num_patches=model.encoder.patch_embed.num_patches,
                  k=t.k, attention=t.attention, what="the cache" if data.source == "cache" else "the base model")
    if cfg.model.init_from_base:
        checkpoint = base_checkpoint(cfg, data)
        if not checkpoint:
            raise UserError("model.init_from_base=true needs base.checkpoint (the base model's weights)")
        init_from_base(model, run_base(cfg, data, checkpoint), checkpoint)
    if cfg.model.init_checkpoint:
        init_from_checkpoint(model, cfg.model.init_checkpoint)
    return model, kwargs


@torch.no_grad()
def init_from_base(model: TECModel, base, checkpoint: str) -> int:
    """Tab. 6(d) "Load": copy the loaded base encoder's weights where names and shapes match.

    `base` is `load_base_model`'s, so any family arrives in timm's naming. Its cls token is taken
    as its first block sees it (plus its position where it has one), because the new encoder's
    cls position is zero; the new pos_embed stays the fixed sin-cos one, and registers or a
    distillation token have no place in it (one cls token). Returns the number of tensors copied.
    """
    weights = dict(base.state_dict())
    if not base.no_embed_class:
        weights["cls_token"] = base.cls_token + base.pos_embed[:, :1]
    if isinstance(base.norm, NoFinalNorm):
        warnings.warn(f"model.init_from_base: base.checkpoint={checkpoint} has no final norm; the new encoder's "
                      "norm keeps its initialisation", stacklevel=2)
    copied = 0
    for name, value in model.encoder.state_dict().items():
        if name != "pos_embed" and name in weights and tuple(weights[name].shape) == tuple(value.shape):
            value.copy_(weights[name])
            copied += 1
    if copied == 0:
        raise UserError(f"model.init_from_base: no weight of base.checkpoint={checkpoint} fits the new encoder")
    return copied


def init_from_checkpoint(model: TECModel, path: str) -> None:
    """Start the whole model (encoder, adapters, decoder) from another run's weights.

    `path` is a run's checkpoint.pt or a .safetensors of the model's state dict (as
    `demo-base` ships); used by the demo's control to continue the base's own MAE run.
    """
    if not Path(path).is_file():
        raise UserError(f"model.init_checkpoint={path}: file not found")
    if path.endswith(".safetensors"):
        state = read_safetensors(Path(path))[0]
    else:
        state = load_checkpoint(Path(path)).get("model")
        if state is None:
            raise UserError(f"model.init_checkpoint={path}: not a tec-pipeline training checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        reason = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), "shape mismatch")
        raise UserError(f"model.init_checkpoint={path}: does not fit this model ({reason})") from None
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"model.init_checkpoint={path}: does not fit this model ({'missing' if missing else 'unexpected'} "
                        f"'{first}')")
