"""Target enhancement against slow, obvious float64 references (Eq. 2, top-k selection, q.k logits)."""
import math

import pytest
import torch

from helpers import TINY_BASE
from reference_vit import reference_targets
from tec_pipeline.config import ViTArch
from tec_pipeline.models.base import base_forward, load_base_model
from tec_pipeline.base_targets import compute_targets
from tec_pipeline.targets import (Targets, attention_target, channel_normalize, feature_target, patch_normalize,
                                  row_logits, select_topk)


def test_patch_normalize_matches_loops():
    y = torch.randn(2, 7, 3, dtype=torch.float64) * 3 + 1
    yf, mean, std = patch_normalize(y)
    B, L, C = y.shape
    for b in range(B):
        for c in range(C):
            vals = [y[b, l, c].item() for l in range(L)]
            mu = sum(vals) / L
            var = sum((v - mu) ** 2 for v in vals) / (L - 1)  # unbiased
            assert mean[b, c].item() == pytest.approx(mu, abs=1e-12)
            assert std[b, c].item() == pytest.approx(math.sqrt(var + 1e-6), abs=1e-12)
            for l in range(L):
                assert yf[b, l, c].item() == pytest.approx((vals[l] - mu) / math.sqrt(var + 1e-6), abs=1e-12)


def qk(B, H, L, D=5, dtype=torch.float64):
    """Random scaled queries and keys (B, H, 1+L, D) and their logits q k^T."""
    q, k = torch.randn(B, H, 1 + L, D, dtype=dtype), torch.randn(B, H, 1 + L, D, dtype=dtype)
    return q, k, q @ k.transpose(-2, -1)


def test_select_topk_matches_loops():
    B, H, L, k = 2, 3, 9, 4
    queries, keys, logits = qk(B, H, L)
    att, idx = select_topk(queries, keys, k)
    assert att.shape == (B, k + 1, H, L) and idx.shape == (B, k) and att.dtype == torch.float64
    for b in range(B):
        score = [sum(logits[b, h, 0, 1 + j].item() for h in range(H)) / H for j in range(L)]
        order = sorted(range(L), key=lambda j: -score[j])[:k]
        assert idx[b].tolist() == order  # rank order, highest first
        rows = [0] + [1 + j for j in order]  # cls query row first
        for r, row in enumerate(rows):
            for h in range(H):
                for l in range(L):
                    ref = sum(queries[b, h, row, d].item() * keys[b, h, 1 + l, d].item() for d in range(5))
                    assert att[b, r, h, l].item() == pytest.approx(ref, abs=1e-12)  # cls key dropped


def test_row_logits_are_float32_under_half_autocast_and_do_not_overflow():
    """q.k of a large-norm base: 4e4 x 4e4 x 4 terms overflows float16 (max 65504), not the rows."""
    queries = torch.full((1, 1, 3, 4), 4e4).half()
    keys = torch.full((1, 1, 3, 4), 4e4).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = row_logits(queries, keys, torch.tensor([[0, 2]]))
    assert rows.dtype == torch.float32 and rows.shape == (1, 1, 2, 3)
    assert torch.isfinite(rows).all() and rows[0, 0, 0, 0].item() == pytest.approx(4 * 4e4 * 4e4, rel=1e-3)


def test_select_topk_rejects_k_above_patches():
    with pytest.raises(ValueError, match="k=10"):
        select_topk(torch.randn(1, 2, 10, 3), torch.randn(1, 2, 10, 3), 10)


def _layer_norm64(x, ln):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


def test_attention_logits_equal_hand_computed_qk_with_fused_attention():
    base = load_base_model(TINY_BASE, None)
    last = base.blocks[-1]
    assert last.attn.fused_attn  # timm's fused path stays on; logits are computed beside it
    captured = {}
    last.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    images = torch.randn(2, 3, 32, 32)
    out = base_forward(base, images, last_layers=1)
    x = captured["x"]
    h = _layer_norm64(x, last.norm1)
    W, bias = last.attn.qkv.weight.double(), last.attn.qkv.bias.double()
    C, H = base.embed_dim, base.blocks[0].attn.num_heads
    hd = C // H
    for b in range(2):
        for head in range(H):
            q = h[b] @ W[head * hd:(head + 1) * hd].T + bias[head * hd:(head + 1) * hd]
            k = h[b] @ W[C + head * hd:C + (head + 1) * hd].T + bias[C + head * hd:C + (head + 1) * hd]
            ref = (q @ k.T) / math.sqrt(hd)
            torch.testing.assert_close(out.logits[b, head].double(), ref, atol=1e-4, rtol=1e-4)


def test_features_are_mean_of_last_blocks_before_final_norm():
    base = load_base_model(TINY_BASE, None)
    outs = []
    for blk in base.blocks:
        blk.register_forward_hook(lambda m, a, o: outs.append(o))
    images = torch.randn(3, 3, 32, 32)
    base.forward_features(images)  # timm's own path, final norm applied after the hooks
    ref = (outs[-1][:, 1:] + outs[-2][:, 1:]) / 2
    got = base_forward(base, images, last_layers=2).features
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_compute_targets_shapes_and_consistency():
    base = load_base_model(TINY_BASE, None)
    t = compute_targets(base, torch.randn(2, 3, 32, 32), last_layers=2, k=5)
    assert t.feat.shape == (2, 16, 32) and t.attn.shape == (2, 6, 2, 16) and t.topk_idx.shape == (2, 5)
    torch.testing.assert_close(t.feat.mean(1), torch.zeros(2, 32), atol=1e-5, rtol=0)


def _targets(B=2, L=6, C=4, H=2, k=3):
    y = torch.randn(B, L, C, dtype=torch.float64) * 2 + 5
    feat, mean, std = patch_normalize(y)
    att, idx = select_topk(*qk(B, H, L)[:2], k)
    return y, Targets(feat=feat, feat_mean=mean, feat_std=std, attn=att, topk_idx=idx)


def test_feature_target_modes_recover_raw_features():
    y, t = _targets()
    assert feature_target(t, "patch") is t.feat
    torch.testing.assert_close(feature_target(t, "none"), y)
    torch.testing.assert_close(feature_target(t, "channel"), channel_normalize(y))
    ch = feature_target(t, "channel")
    torch.testing.assert_close(ch.mean(-1), torch.zeros(2, 6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_attention_target_prefix_and_modes():
    _, t = _targets(k=3)
    att, idx = attention_target(t, "topk", 2)
    assert torch.equal(att, t.attn[:, :3]) and torch.equal(idx, t.topk_idx[:, :2])
    att, idx = attention_target(t, "cls_only", 3)
    assert att.shape[1] == 1 and idx.shape[1] == 0
    assert attention_target(t, "none", 3) is None
    with pytest.raises(ValueError, match="k=4 exceeds the k_max=3"):
        attention_target(t, "topk", 4)


def test_select_topk_with_k0_keeps_the_cls_row():
    queries, keys, logits = qk(2, 3, 4, dtype=torch.float32)
    att, idx = select_topk(queries, keys, 0)
    assert att.shape == (2, 1, 3, 4) and idx.shape == (2, 0)
    torch.testing.assert_close(att[:, 0], logits[:, :, 0, 1:])


@pytest.mark.parametrize("arch, size, prefix", [("vit_small_patch14_reg4_dinov2", 42, 5),  # cls + 4 registers
                                                ("deit_tiny_distilled_patch16_224", 48, 2)])  # cls + dist token
def test_targets_with_more_prefix_tokens_match_loops(arch, size, prefix):
    """Features are patch tokens only; rows [cls; top-k], keys the patches, ranked by the cls row."""
    torch.manual_seed(0)
    base = load_base_model(ViTArch(arch, img_size=size, embed_dim=32, depth=2, num_heads=2), None)
    with torch.no_grad():  # learned tokens and positions away from their near-zero init
        for p in (base.cls_token, base.pos_embed, getattr(base, "reg_token", None), getattr(base, "dist_token", None)):
            if p is not None:
                p.normal_(0, 1)
    assert base.num_prefix_tokens == prefix
    captured, outs = {}, []
    last = base.blocks[-1]
    last.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    for blk in base.blocks:
        blk.register_forward_hook(lambda m, a, o: outs.append(o))
    images = torch.randn(2, 3, size, size)
    t = compute_targets(base, images, last_layers=2, k=4)
    h = _layer_norm64(captured["x"], last.norm1)
    W, bias = last.attn.qkv.weight.double(), last.attn.qkv.bias.double()
    C, H = base.embed_dim, last.attn.num_heads
    hd = C // H
    logits = torch.stack([torch.stack([
        (h[b] @ W[i * hd:(i + 1) * hd].T + bias[i * hd:(i + 1) * hd])
        @ (h[b] @ W[C + i * hd:C + (i + 1) * hd].T + bias[C + i * hd:C + (i + 1) * hd]).T / math.sqrt(hd)
        for i in range(H)]) for b in range(2)])  # (B, H, N, N) over every token
    features = (outs[-1][:, prefix:] + outs[-2][:, prefix:]).double() / 2
    ref = reference_targets(features, logits, prefix, 4)
    assert t.feat.shape == (2, (size // base.patch_embed.patch_size[0]) ** 2, C)
    torch.testing.assert_close(t.feat.double(), ref["feat"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t.attn.double(), ref["attn"], atol=1e-4, rtol=1e-4)
    assert torch.equal(t.topk_idx, ref["topk_idx"])
