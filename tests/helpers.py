"""Tiny architectures shared by the tests (32-px images, a few layers)."""
from tec_pipeline.config import ViTArch

TINY_BASE = ViTArch(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_arch(patch_size: int = 8, embed_dim: int = 32, depth: int = 3, num_heads: int = 2) -> ViTArch:
    return ViTArch(name="vit_tiny_patch16_224", img_size=32, patch_size=patch_size, embed_dim=embed_dim,
                   depth=depth, num_heads=num_heads)
