"""A tiny TEC model overfits one fixed batch through the online reference step."""
import torch

from tec_pipeline.config import TargetConfig, ViTArch
from tec_pipeline.models.base import load_base_model
from tec_pipeline.models.tec import TECModel
from tec_pipeline.step import online_step


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    base = load_base_model(ViTArch("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2,
                                   num_heads=2), None)
    with torch.no_grad():  # a random-init base attends uniformly (entropy = ln 64, the CE floor): sharpen it
        base.blocks[-1].attn.qkv.weight.mul_(20)
    model = TECModel(ViTArch("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2),
                     feat_dim=32, attn_dim=32, attn_heads=2, decoder_dim=32, decoder_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    images = torch.randn(8, 3, 32, 32)
    noise = torch.rand(8, 64)  # the same mask every step: one fixed batch
    cfg = TargetConfig(k=4, tau=1.0)
    losses = [online_step(base, model, optimizer, images, cfg, noise=noise) for _ in range(200)]
    assert losses[-1]["loss"] <= 0.5 * losses[0]["loss"], (losses[0], losses[-1])
    assert losses[-1]["loss_fea"] < losses[0]["loss_fea"] and losses[-1]["loss_att"] < losses[0]["loss_att"]
    assert all(p.grad is None for p in base.parameters())
