"""The scored models: MAE's fine-tuning classifier (Tab. 10), MAE's linear probe (Tab. 11) and
Tab. 4's "+ input adapter FT" probe, and their optimizers from timm (layer-wise decay, LARS)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import json

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.optim import Lars, create_optimizer_v2
from torch import Tensor, nn

from ..config import ViTArch
from ..errors import UserError
from ..base_targets import autocast
from ..train.checkpoint import load_run_model
from ..models.base import check_sizes, create_vit, export_arch, frozen_base, read_checkpoint, resolved_sizes
from ..models.tec import TECModel
from .config import RULES, FinetuneConfig

FRESH = ("head.", "fc_norm.")  # what fine-tuning adds to an encoder: the head, and under avg pooling its norm


@dataclass
class Encoder:
    """The encoder a run scores: its architecture at ``data.img_size``, and ``model.checkpoint``'s weights
    as read once, before the splits are opened (None: a random-init encoder)."""
    arch: ViTArch
    state: Optional[dict[str, Tensor]]  # its state dict in its family's naming (`read_checkpoint`)
    checkpoint: Optional[str]


def read_encoder(cfg: FinetuneConfig, settings: dict) -> Optional[Encoder]:
    """``model.checkpoint`` read once, with the architecture an export or a run checkpoint records, else
    ``model.arch`` with its sizes left to timm checked against `config.RULES` (its dotted `settings`).
    None for Tab. 4's adapter probe, which loads its training run whole (`adapter_probe`)."""
    m = cfg.model
    if cfg.protocol == "linprobe" and m.input_adapter:
        return None
    state, meta = None, {}
    if m.checkpoint:
        state, _entry, meta = read_checkpoint(m.checkpoint)
    arch = export_arch(meta)
    if arch is None:
        check_sizes(settings, "model.arch", RULES)
        arch = m.arch
    else:  # the checkpoint's own patch: timm would drop the pixels past the last whole one
        patch = resolved_sizes(arch, "model.arch").patch_size
        if cfg.data.img_size % patch:
            raise UserError(f"data.img_size={cfg.data.img_size}: not divisible by the patch size {patch} of "
                            f"model.checkpoint={m.checkpoint}")
    return Encoder(ViTArch(**{**asdict(arch), "img_size": cfg.data.img_size}), state, m.checkpoint)


def load_encoder(model: VisionTransformer, base: VisionTransformer, checkpoint: str) -> None:
    """Copy the loaded base's weights into the classifier; only the head (and fc_norm) may stay fresh.
    Under global pooling timm's final norm is an Identity, so the encoder's norm.* is dropped (MAE)."""
    own = model.state_dict()
    missing = model.load_state_dict({k: v for k, v in base.state_dict().items() if k in own}, strict=False).missing_keys
    kept_fresh = [k for k in missing if not k.startswith(FRESH)]
    if kept_fresh:
        raise UserError(f"model.checkpoint={checkpoint}: has no '{kept_fresh[0]}' for this classifier")


def classifier(cfg: FinetuneConfig, num_classes: int, encoder: Encoder) -> VisionTransformer:
    """Tab. 10's model: the encoder as a timm ViT with drop path, pooled by ``model.global_pool`` (avg:
    patch-token mean then a fresh fc_norm, MAE's head) and a linear head of truncated-normal init."""
    m = cfg.model
    model = create_vit(encoder.arch, num_classes=num_classes, global_pool=m.global_pool, drop_path_rate=m.drop_path)
    if encoder.state is not None:
        load_encoder(model, frozen_base(encoder.arch, encoder.state, encoder.checkpoint, setting="model.arch"),
                     encoder.checkpoint)
    trunc_normal_(model.head.weight, std=m.head_init_std)
    nn.init.zeros_(model.head.bias)
    return model


def probe_head(dim: int, num_classes: int, std: float) -> nn.Sequential:
    """MAE's linear probe head: BatchNorm1d without affine (eps 1e-6) whitening the frozen features, then Linear."""
    linear = nn.Linear(dim, num_classes)
    trunc_normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


class AdapterProbe(nn.Module):
    """Tab. 4 "+ input adapter FT": the frozen encoder of a TEC run sees its cls token through the input
    adapter, ``T' = MLP(T)`` (Sec. 2.2), and that MLP trains with the probe on the cls output."""

    def __init__(self, tec: TECModel, head: nn.Module):
        super().__init__()
        tec.encoder_adapter = tec.feat_branch = tec.attn_branch = None  # pre-training parts the probe never runs
        tec.decoder_blocks = nn.ModuleList()
        self.tec, self.head = tec.requires_grad_(False), head
        tec.input_adapter.requires_grad_(True)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.tec.encode(images)[:, 0])  # cls after the final norm (B, C) -> (B, classes)


def adapter_probe(cfg: FinetuneConfig, num_classes: int) -> AdapterProbe:
    """The Tab. 4 variant, from a TEC training run's checkpoint.pt (the input adapter is in it, not in exports)."""
    if not cfg.model.checkpoint:
        raise UserError("model.input_adapter=true needs model.checkpoint: a TEC run's checkpoint.pt")
    tec, arch = load_run_model(cfg.model.checkpoint)
    if tec.input_adapter is None:
        raise UserError(f"model.checkpoint={cfg.model.checkpoint}: this run has no input adapter to train")
    if arch.img_size not in (None, cfg.data.img_size):
        raise UserError(f"data.img_size={cfg.data.img_size}: the run's encoder is {arch.img_size} px")
    return AdapterProbe(tec, probe_head(tec.encoder.embed_dim, num_classes, cfg.model.head_init_std))


def linear_probe(cfg: FinetuneConfig, num_classes: int, encoder: Optional[Encoder]) -> nn.Module:
    """Tab. 11's model: the frozen encoder (cls after its final norm) and `probe_head`; only the head trains."""
    if cfg.model.input_adapter:
        return adapter_probe(cfg, num_classes)
    model = classifier(replace(cfg, model=replace(cfg.model, global_pool="token", drop_path=0.0)), num_classes, encoder)
    model.requires_grad_(False)
    model.head = probe_head(model.embed_dim, num_classes, cfg.model.head_init_std)
    return model


def classification_loss(model: nn.Module, criterion: nn.Module, images: Tensor, targets: Tensor,
                        precision: Optional[torch.dtype] = None) -> Tensor:
    """The step's loss: logits (B, classes) of `images` under autocast to `precision` (None: float32),
    then `criterion` against `targets` ((B,) labels, or (B, classes) Mixup rows) in float32."""
    with autocast(images.device, precision):
        logits = model(images)
    return criterion(logits.float(), targets)


def step_graph(cfg: FinetuneConfig) -> str:
    """What the compiled step's graph depends on: the protocol, the model, the augmentation that
    shapes the targets, the batch's shape and the precision (not the lr, epochs or data paths)."""
    model = {k: v for k, v in asdict(cfg.model).items() if k != "checkpoint"}
    return json.dumps({"protocol": cfg.protocol, "model": model, "mixup": cfg.aug.mixup > 0 or cfg.aug.cutmix > 0,
                       "smoothing": cfg.aug.smoothing, "img_size": cfg.data.img_size,
                       "batch_size": cfg.data.batch_size, "precision": cfg.optim.mixed_precision}, sort_keys=True)


def build_model(cfg: FinetuneConfig, num_classes: int, encoder: Optional[Encoder]) -> nn.Module:
    """The protocol's model around `encoder` (`read_encoder`)."""
    if cfg.protocol == "linprobe":
        return linear_probe(cfg, num_classes, encoder)
    return classifier(cfg, num_classes, encoder)


def lars(model: nn.Module, lr: float, weight_decay: float, momentum: float) -> Lars:
    """Tab. 11's LARS as MAE's: timm's `Lars` with trust coefficient 1 (update scaled by ||w|| / ||g||) on
    the weight matrices, plain momentum SGD on biases (no adaptation, no decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "always_adapt": True},
              {"params": [p for p in params if p.ndim <= 1], "always_adapt": False, "weight_decay": 0.0}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=weight_decay,
                trust_coeff=1.0)


def make_optimizer(cfg: FinetuneConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Tab. 10: AdamW (0.9, 0.999), wd 0.05 off 1-D weights and tokens, timm's layer-decay groups (each
    with an ``lr_scale`` = decay^(depth + 1 - layer), layer 0 the embeddings); Tab. 11: `lars`."""
    o = cfg.optim
    if o.name == "lars":
        return lars(model, lr, o.weight_decay, o.momentum)
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=o.weight_decay, layer_decay=o.layer_decay,
                               betas=(o.beta1, o.beta2), fused=torch.cuda.is_available() or None)  # one kernel on CUDA
