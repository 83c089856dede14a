"""The new model (Fig. 4): ViT encoder, input adapter, encoder adapters (Eq. 1), multi-target decoder."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..config import ViTArch
from ..targets import query_rows
from .base import build_vit
from .pos_embed import sincos_2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class InputAdapter(nn.Module):
    """Sec. 2.2: ``T' = MLP(T)`` on the cls token, no residual; a constant at inference."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = Mlp(dim, 4 * dim, dim, act_layer=nn.GELU)

    def forward(self, cls_token: Tensor) -> Tensor:
        return self.mlp(cls_token)


class EncoderAdapter(nn.Module):
    """Eq. 1: ``Z_n = FC(concat(X_i..X_j))``, ``Z'_n = Z_n + MLP(Z_n)``, ``Ze = LN(sum_n Z'_n)``.

    The D block outputs (the last after the encoder's final norm) are concatenated on
    channels, layer-normed, and split into N = D / group contiguous groups of `group` blocks.
    """

    def __init__(self, dim: int, depth: int, group: int, hidden: int, norm_eps: float = 1e-6):
        super().__init__()
        if depth % group:
            raise ValueError(f"encoder depth {depth} is not divisible by the adapter group size {group}")
        self.group = group
        self.norm = nn.LayerNorm(depth * dim, eps=norm_eps)
        self.fcs = nn.ModuleList(nn.Linear(group * dim, dim) for _ in range(depth // group))
        self.mlps = nn.ModuleList(Mlp(dim, hidden, dim, act_layer=nn.GELU) for _ in range(depth // group))
        self.out_norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, block_outputs: list[Tensor]) -> Tensor:
        groups = self.norm(torch.cat(block_outputs, dim=-1)).chunk(len(self.fcs), dim=-1)
        z = [fc(g) for fc, g in zip(self.fcs, groups)]
        return self.out_norm(sum(zn + mlp(zn) for zn, mlp in zip(z, self.mlps)))


class DecoderBranch(nn.Module):
    """One target's branch of the multi-target decoder: input FC + mask token, final norm, head."""

    def __init__(self, enc_dim: int, dec_dim: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.norm = LayerNorm(dec_dim)
        self.head = nn.Linear(dec_dim, out_dim)

    def tokens(self, ze: Tensor, ids_restore: Tensor) -> Tensor:
        """Project visible tokens, fill masked places with the mask token, restore patch order."""
        x = self.embed(ze)
        B, L = ids_restore.shape
        # the mask token in x's dtype: under autocast a float32 token would promote the whole decoder input
        patches = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)], dim=1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise; keeps ``int(L * (1 - ratio))``.

    Returns (visible tokens, mask (B, L) with 1 = masked, ids_restore (B, L)).
    """
    B, L, C = x.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    visible = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, C))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0
    return visible, mask.gather(1, ids_restore), ids_restore


@dataclass
class TECOutput:
    feat: Optional[Tensor]  # Zf (B, L, feat_dim)
    attn: Optional[Tensor]  # Za logits (B, k+1, H_base, L)
    mask: Tensor  # (B, L), 1 = masked


class TECModel(nn.Module):
    """Encoder + adapters + multi-target decoder (Sec. 2.2, 2.3); every part switchable.

    Args:
        arch: the new encoder (any timm ViT; same patch grid as the targets).
        feat_dim: channels of the feature target (C_base, or p*p*3 for pixels); 0 = no feature branch.
        attn_dim, attn_heads: C_base and H_base of the attention target; 0 = no attention branch.
    """

    def __init__(
        self,
        arch: ViTArch,
        feat_dim: int,
        attn_dim: int = 0,
        attn_heads: int = 0,
        input_adapter: bool = True,
        encoder_adapter: bool = True,
        adapter_group: int = 3,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 16,
        adapter_norm_eps: float = 1e-6,
        patch_bias_init: str = "zeros",
    ):
        super().__init__()
        self.patch_bias_init = patch_bias_init
        self.encoder = build_vit(arch)
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos (MAE)
        dim, depth = self.encoder.embed_dim, len(self.encoder.blocks)
        grid = self.encoder.patch_embed.grid_size
        self.input_adapter = InputAdapter(dim) if input_adapter else None
        self.encoder_adapter = (EncoderAdapter(dim, depth, adapter_group, 4 * decoder_dim, adapter_norm_eps)
                                if encoder_adapter else None)
        self.feat_branch = DecoderBranch(dim, decoder_dim, feat_dim) if feat_dim else None
        self.attn_branch = DecoderBranch(dim, decoder_dim, 2 * attn_dim) if attn_dim else None
        if attn_dim and attn_dim % attn_heads:
            raise ValueError(f"attention target width {attn_dim} is not divisible by its {attn_heads} heads")
        if not (feat_dim or attn_dim):
            raise ValueError("the new model needs at least one target branch (feature or attention)")
        self.attn_dim, self.attn_heads = attn_dim, attn_heads
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=LayerNorm) for _ in range(decoder_depth)
        )
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, grid), persistent=False)
        self.initialize_weights()

    # ---- initialisation (MAE) ----
    def initialize_weights(self) -> None:
        """Fixed sin-cos pos-embeds, xavier-uniform Linear (patch embed as Linear), N(0, .02) tokens."""
        grid = self.encoder.patch_embed.grid_size
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_2d(self.encoder.embed_dim, grid))
        self.apply(_init_linear_and_norm)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_bias_init == "zeros":  # "torch": the Conv2d's own default draw stays, as in the authors' code
            nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        for branch in (self.feat_branch, self.attn_branch):
            if branch is not None:
                nn.init.normal_(branch.mask_token, std=0.02)

    # ---- encoder ----
    def cls_token(self) -> Tensor:
        """The cls token the encoder sees: T' = MLP(T) with the input adapter, else T."""
        t = self.encoder.cls_token
        return self.input_adapter(t) if self.input_adapter is not None else t

    def encoder_blocks(self, x: Tensor) -> list[Tensor]:
        """All D block outputs; the last one after the encoder's final norm."""
        outs = []
        for block in self.encoder.blocks:
            x = block(x)
            outs.append(x)
        outs[-1] = self.encoder.norm(outs[-1])
        return outs

    def forward_encoder(self, images: Tensor, mask_ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Masked encoder -> Ze (B, 1+keep, C) via the encoder adapters; mask and ids_restore."""
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        cls = (self.cls_token() + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        outs = self.encoder_blocks(torch.cat([cls, x], dim=1))
        ze = self.encoder_adapter(outs) if self.encoder_adapter is not None else outs[-1]
        return ze, mask, ids_restore

    def encode(self, images: Tensor) -> Tensor:
        """Unmasked encoder features (B, 1+L, C), as the exported timm ViT computes them."""
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        cls = (self.cls_token() + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.encoder_blocks(torch.cat([cls, x], dim=1))[-1]

    # ---- multi-target decoder ----
    def forward_decoder(self, ze: Tensor, ids_restore: Tensor, topk_idx: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Both branches through one shared block stack (batched together), then their heads."""
        branches = [b for b in (self.feat_branch, self.attn_branch) if b is not None]
        if topk_idx is None and self.feat_branch is not None:
            branches = [self.feat_branch]
        h = torch.cat([b.tokens(ze, ids_restore) + self.decoder_pos_embed for b in branches], dim=0)
        for block in self.decoder_blocks:
            h = block(h)
        outs = dict(zip(branches, h.chunk(len(branches), dim=0)))
        feat = attn = None
        if self.feat_branch in outs:
            b = self.feat_branch
            feat = b.head(b.norm(outs[b]))[:, 1:]
        if self.attn_branch in outs:
            b = self.attn_branch
            attn = self.attention_logits(b.head(b.norm(outs[b])), topk_idx)
        return feat, attn

    def attention_logits(self, qk: Tensor, topk_idx: Tensor) -> Tensor:
        """Za (B, k+1, H, L): queries [cls; the k selected patches], keys all patches, scale C_base^-0.5."""
        B, N, _ = qk.shape
        q, k = qk.reshape(B, N, 2, self.attn_heads, self.attn_dim // self.attn_heads).unbind(2)
        rows = query_rows(topk_idx)
        q = q.gather(1, rows[:, :, None, None].expand(-1, -1, *q.shape[2:]))
        logits = torch.einsum("bqhd,bnhd->bqhn", q, k) * self.attn_dim**-0.5
        return logits[..., 1:]

    def forward(self, images: Tensor, topk_idx: Optional[Tensor] = None, mask_ratio: float = 0.75,
                noise: Optional[Tensor] = None) -> TECOutput:
        """Masked reconstruction forward. `topk_idx` (B, k) selects the attention query rows."""
        if noise is None:
            noise = torch.rand(images.shape[0], self.encoder.patch_embed.num_patches, device=images.device)
        ze, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise)
        feat, attn = self.forward_decoder(ze, ids_restore, topk_idx)
        return TECOutput(feat=feat, attn=attn, mask=mask)


@torch.no_grad()
def encoder_state(model: TECModel) -> dict[str, Tensor]:
    """The encoder's timm state dict with the input adapter folded in, ``cls_token <- MLP(cls_token)``:
    the encoder as `export` writes it and the monitor scores it (Sec. 2.2: the adapter is a constant
    at inference)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.encoder.state_dict().items()}
    state["cls_token"] = model.cls_token().detach().clone().contiguous()
    return state


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


PARTS = ("encoder", "input_adapter", "encoder_adapter", "feat_branch", "attn_branch", "decoder_blocks")


def count_parameters(model: TECModel) -> dict[str, int]:
    """Trainable parameters per part, and their total."""
    counts = {}
    for part in PARTS:
        module = getattr(model, part)
        counts[part] = sum(p.numel() for p in module.parameters() if p.requires_grad) if module is not None else 0
    counts["total"] = sum(counts.values())
    return counts
