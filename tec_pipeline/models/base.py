"""The frozen base model: a timm ViT of any servable family built from a local checkpoint, and its forward.

The forward returns what target enhancement needs (Sec. 2.3): the outputs of the
last blocks (patch tokens, before the final norm) and the pre-softmax q.k logits
of the last block over [cls; patches], which timm's fused attention never materialises.
Reading the files is `models.checkpoints`; converting a family's naming to timm's is timm's own
`checkpoint_filter_fn`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ..config import ViTArch
from ..domains import Rule, check_rules
from ..errors import UserError
from ..targets import row_logits
from .checkpoints import EXPORT_FORMAT, CheckpointError, file_sha256, read_checkpoint

__all__ = ["EXPORT_FORMAT", "CheckpointError", "UnsupportedBase", "NoFinalNorm", "file_sha256", "read_checkpoint",
           "build_vit", "build_base_vit", "load_base_model", "base_forward", "attention_qk", "BaseOutputs"]

# Entries of full checkpoints that are not part of the encoder (heads, decoders, adapters, MIM tokens).
_IGNORED_PREFIXES = ("head.", "head_dist.", "decoder", "mask_token", "masked_embed", "fc_norm.", "encoder_adaptor.",
                     "forward_fea_decoder.", "forward_att_decoder.")  # the last three: the authors' TECViT
# Where a family keeps its cls token and its patch kernel, before timm's conversion.
_CLS_KEYS = ("cls_token", "visual.class_embedding", "visual.trunk.cls_token")
_PATCH_KERNELS = ("patch_embed.proj.weight", "visual.conv1.weight", "visual.trunk.patch_embed.proj.weight")
REL_POS_BIAS = "a relative position bias (BEiT) is added to q.k, so q.k alone is not the base's attention"


class UnsupportedBase(UserError):
    """A model TEC cannot take its targets from; one line saying why."""


def create_vit(arch: ViTArch | str, **overrides) -> nn.Module:
    """A timm model, without classifier head unless `overrides` ask for one (``num_classes``); `arch`
    sizes override the registered defaults."""
    if isinstance(arch, str):
        arch = ViTArch(name=arch)
    sizes = {k: v for k, v in asdict(arch).items() if k != "name" and v is not None}
    return timm.create_model(arch.name, pretrained=False, **{"num_classes": 0, **sizes, **overrides})


def resolved_sizes(arch: ViTArch, setting: str) -> ViTArch:
    """`arch` with every size it leaves unset (None) taken from timm's registered model, built on the
    meta device (no memory, no initialisation); an unknown name is one line naming `setting`.name."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch.name, pretrained=False, num_classes=0)
    except (RuntimeError, ValueError, TypeError) as err:  # timm: "Unknown model (...)"
        raise UserError(f"{named(setting, arch.name)}: not a timm ViT ({' '.join(str(err).split())})") from None
    if not isinstance(model, VisionTransformer):  # no sizes to resolve: its builder says why it cannot serve
        return arch
    found = {"img_size": model.patch_embed.img_size[0], "patch_size": model.patch_embed.patch_size[0],
             "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads}
    return ViTArch(arch.name, **{k: v if v is not None else found[k] for k, v in asdict(arch).items() if k != "name"})


def check_sizes(settings: dict, setting: str, rules: tuple[Rule, ...]) -> None:
    """`rules` again on the dotted `settings` of a config, with the architecture at `setting` (e.g.
    "model.arch") resolved (`resolved_sizes`; its img_size stays as set, the models are built at
    the data's): a rule skipped at load because a size was left to timm's default (a width against
    the default heads) is one line here, before timm's own assertion would stop the build."""
    arch = ViTArch(**{k.removeprefix(setting + "."): v for k, v in settings.items() if k.startswith(setting + ".")})
    sizes = {f"{setting}.{k}": v for k, v in asdict(resolved_sizes(arch, setting)).items() if k != "img_size"}
    check_rules({**settings, **sizes}.get, rules)


def build_vit(arch: ViTArch | str, **overrides) -> VisionTransformer:
    """The new model's encoder: a timm ViT with one prefix token, the cls token (the paper's)."""
    model = create_vit(arch, **overrides)
    if not isinstance(model, VisionTransformer) or model.num_prefix_tokens != 1 or model.cls_token is None:
        name = arch if isinstance(arch, str) else arch.name
        raise ValueError(f"architecture '{name}': TEC needs a timm VisionTransformer with one cls token")
    return model


def unservable(model: nn.Module) -> str | None:
    """Why a base cannot give TEC's targets, which are its last block's pre-softmax q.k with the
    cls query row ranking the patches (Sec. 2.3); None when it can."""
    if any(hasattr(m, "relative_position_bias_table") for m in model.modules()):
        return REL_POS_BIAS
    if not isinstance(model, VisionTransformer):
        return f"a {type(model).__name__}, not a timm VisionTransformer (the base forward reads its blocks' qkv)"
    if model.global_pool == "map":
        return "it pools with an attention head (global_pool='map'), not a cls token that ranks the patches"
    if model.cls_token is None:
        return "it has no cls token, whose query row ranks the patches"
    return None


def build_base_vit(arch: ViTArch | str, setting: str = "base.arch") -> VisionTransformer:
    """The base: a timm ViT with a cls token and any further prefix tokens (registers, distillation).
    `setting` is where `arch` came from (a config key or a flag), named by every refusal."""
    name = named(setting, arch if isinstance(arch, str) else arch.name)
    try:
        model = create_vit(arch)
    except (RuntimeError, AssertionError, ValueError, TypeError) as err:  # timm: an unknown name, bad sizes
        raise UserError(f"{name}: cannot build this ViT ({' '.join(str(err).split())})") from None
    reason = unservable(model)
    if reason:
        raise UnsupportedBase(f"{name} cannot serve as TEC's base: {reason}")
    return model


def named(setting: str, name: str) -> str:
    """An architecture's name as the user gave it: a flag's value (``--arch x``) or a config key's."""
    return f"{setting} {name}" if setting.startswith("--") else f"{setting}.name='{name}'"


def checkpoint_prefix_tokens(sd: dict[str, Tensor]) -> tuple[int, bool]:
    """(register tokens, distillation token?) a checkpoint holds, in DINOv2's or timm's naming."""
    regs = sd.get("register_tokens", sd.get("reg_token"))
    return (0 if regs is None else int(regs.shape[1])), "dist_token" in sd


def check_family(sd: dict[str, Tensor], model: VisionTransformer, path: str | Path, setting: str = "base.arch") -> None:
    """Refuse, before timm converts it, a checkpoint this base (built from `setting`) cannot take: one line each."""
    kernel = next((sd[k] for k in _PATCH_KERNELS if k in sd and sd[k].ndim == 4), None)
    patch, model_patch = (kernel.shape[-1] if kernel is not None else None), model.patch_embed.patch_size[0]
    regs, dist = checkpoint_prefix_tokens(sd)
    model_dist = getattr(model, "dist_token", None) is not None
    rules = [
        (not any("relative_position_bias" in k for k in sd), REL_POS_BIAS),
        (any(k in sd for k in _CLS_KEYS) or "pos_embed" not in sd,  # a ViT's layout, but no cls token
         "no cls token (I-JEPA has none), whose query row ranks the patches"),
        (patch in (None, model_patch), f"patch size {patch} in the checkpoint, {model_patch} in {setting} "
                                       "(resampling the patch kernel would change the base)"),
        (regs == model.num_reg_tokens, f"{regs} register tokens in the checkpoint, {model.num_reg_tokens} in "
                                       f"{setting} (choose the matching *_reg4_* architecture or none)"),
        (dist == model_dist, f"{'a' if dist else 'no'} distillation token in the checkpoint, "
                             f"{'one' if model_dist else 'none'} in {setting} (DeiT: *_distilled_* architectures)"),
    ]
    for ok, message in rules:
        if not ok:
            raise CheckpointError(f"{path}: {message}")


def timm_state_dict(sd: dict[str, Tensor], model: VisionTransformer, path: str | Path,
                    setting: str = "base.arch") -> dict[str, Tensor]:
    """The checkpoint in `model`'s naming by timm's own conversion (DINOv2 registers and SwiGLU,
    OpenAI / OpenCLIP CLIP, DeiT-III layer scale), pos_embed resampled to the model's patch grid."""
    check_family(sd, model, path, setting)
    return checkpoint_filter_fn(dict(sd), model, adapt_layer_scale=True)


class NoFinalNorm(nn.Module):
    """Where a checkpoint has no final norm (a global-pool fine-tuning layout): TEC's targets come
    before it, so the base loads; any use of the norm itself is one clear error."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = str(path)

    def forward(self, x: Tensor) -> Tensor:
        raise CheckpointError(f"{self.path}: has no final norm ('norm.weight'); TEC's targets do not need it, "
                              "but this use of the encoder's output (evaluation, fine-tuning, export) does")


def without_missing_norm(model: VisionTransformer, sd: dict[str, Tensor], path: str | Path) -> None:
    """Replace the final norm by `NoFinalNorm` where the checkpoint has none (no key under ``norm.``)."""
    if list(model.norm.parameters()) and not any(k.startswith("norm.") for k in sd):
        model.norm = NoFinalNorm(path)


def match_state_dict(model: nn.Module, sd: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """Check `sd` against the model's parameters and buffers; error on the first bad key."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in sd:
            raise CheckpointError(f"{path}: missing encoder weight '{key}'")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: shape mismatch at '{key}': checkpoint {tuple(sd[key].shape)}, model {tuple(value.shape)}"
            )
    for key in sd:
        if key not in expected and not key.startswith(_IGNORED_PREFIXES):
            raise CheckpointError(f"{path}: unexpected weight '{key}' (architecture mismatch?)")
    return {k: sd[k] for k in expected}


def export_arch(meta: dict) -> ViTArch | None:
    """The architecture an export recorded in its metadata, if any."""
    return ViTArch(**json.loads(meta["arch"])) if "arch" in meta else None


def load_base_model(arch: ViTArch | str | None, checkpoint: str | Path | None, img_size: int | None = None,
                    setting: str = "base.arch") -> VisionTransformer:
    """Build the base ViT, load `checkpoint` (any supported family and layout), freeze it, eval mode.

    `checkpoint=None` gives a randomly initialised base (tests, smoke runs). `arch=None`
    takes the architecture recorded in a tec-pipeline export or run checkpoint. `img_size` sets
    the patch grid the checkpoint's position embedding is resampled to. `setting` names where
    `arch` came from in every refusal ("base.arch", fine-tuning's "model.arch", eval's "--arch").
    """
    sd, meta = None, {}
    if checkpoint is not None:
        sd, _entry, meta = read_checkpoint(checkpoint)
    if arch is None:
        arch = export_arch(meta)
        if arch is None:
            raise CheckpointError(f"{checkpoint}: no architecture given ({setting}) and none recorded in the "
                                  "checkpoint")
    if isinstance(arch, str):
        arch = ViTArch(name=arch)
    if img_size is not None:
        arch = ViTArch(**{**asdict(arch), "img_size": img_size})
    return frozen_base(arch, sd, checkpoint, setting)


def frozen_base(arch: ViTArch, sd: dict[str, Tensor] | None, checkpoint: str | Path | None,
                setting: str = "base.arch") -> VisionTransformer:
    """The base ViT `arch` holding `sd`, a state dict `read_checkpoint` already read from `checkpoint`
    (None: random init), frozen and in eval mode."""
    model = build_base_vit(arch, setting)
    if sd is not None:
        sd = timm_state_dict(sd, model, checkpoint, setting)
        without_missing_norm(model, sd, checkpoint)
        model.load_state_dict(match_state_dict(model, sd, checkpoint), strict=True)
    model.requires_grad_(False)
    return model.eval()


@dataclass
class BaseOutputs:
    """What the base forward hands to target enhancement: patch tokens, and the last block's scaled
    queries and keys over [cls; patches], from which only the logit rows the targets keep are
    computed (`targets.row_logits`)."""

    features: Tensor  # Y (B, L, C): mean of the last blocks' patch tokens, before the final norm
    queries: Tensor  # q * head_dim^-0.5 (B, H, 1+L, head_dim)
    keys: Tensor  # k (B, H, 1+L, head_dim)

    @property
    def logits(self) -> Tensor:
        """All pre-softmax logits A (B, H, 1+L, 1+L) of the last block (pictures, checks)."""
        return row_logits(self.queries, self.keys)


def attention_qk(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(q * head_dim^-0.5, k) of a timm Attention, each (B, H, N, head_dim), from the block's own
    `qkv` weights; `x` is the block's `norm1` output. The scale goes on q before any product, so
    a half-precision q.k of a large-norm base cannot overflow before it is scaled."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qkv[0]) * attn.scale, attn.k_norm(qkv[1])


def target_tokens(x: Tensor, num_prefix_tokens: int) -> Tensor:
    """The tokens TEC's targets live on, (B, 1+L, C): the cls token and the patches.

    timm orders tokens [cls, registers or distillation token, patches]; the other prefix tokens
    are dropped as queries and as keys (the targets relate patches, ranked by the cls row).
    """
    if num_prefix_tokens == 1:
        return x
    return torch.cat([x[:, :1], x[:, num_prefix_tokens:]], dim=1)


def base_forward(vit: VisionTransformer, images: Tensor, last_layers: int = 2) -> BaseOutputs:
    """Standard ViT forward that keeps the last `last_layers` blocks' patch tokens and the last
    block's queries and keys among cls and patches, for any number of prefix tokens.

    q and k are per-token maps of the block input (norm1, qkv), so computing them on the kept
    tokens alone gives exactly those rows and columns of the full logits.
    """
    depth = len(vit.blocks)
    if not 1 <= last_layers <= depth:
        raise ValueError(f"last_layers={last_layers} must be within 1..{depth} (the base depth)")
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    kept = []
    for i, block in enumerate(vit.blocks):
        if i == depth - 1:
            queries, keys = attention_qk(block.attn, block.norm1(target_tokens(x, vit.num_prefix_tokens)))
        x = block(x)
        if i >= depth - last_layers:
            kept.append(x[:, vit.num_prefix_tokens:])
    features = torch.stack(kept).mean(0)
    return BaseOutputs(features=features, queries=queries, keys=keys)
