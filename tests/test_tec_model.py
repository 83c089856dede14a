"""The new model: parameter counts, switches, masking, attention head, gradients, initialisation."""
import math

import pytest
import torch

from helpers import TINY_BASE, tiny_arch
from tec_pipeline.config import TargetConfig, ViTArch
from tec_pipeline.models.base import load_base_model
from tec_pipeline.models.pos_embed import sincos_2d
from tec_pipeline.models.tec import TECModel, count_parameters, random_masking
from tec_pipeline.step import tec_losses
from tec_pipeline.base_targets import compute_targets

VITB = {"encoder": 85_647_360, "input_adapter": 4_722_432, "encoder_adapter": 19_695_104,
        "feat_branch": 789_248, "attn_branch": 1_183_232, "decoder_blocks": 6_304_768, "total": 118_342_144}


def test_vit_b16_parameter_counts_part_by_part():
    with torch.device("meta"):  # no memory allocated
        model = TECModel(ViTArch("vit_base_patch16_224"), feat_dim=768, attn_dim=768, attn_heads=12)
    assert count_parameters(model) == VITB


def test_vit_l16_parameter_count():
    with torch.device("meta"):
        model = TECModel(ViTArch("vit_large_patch16_224"), feat_dim=1024, attn_dim=1024, attn_heads=16,
                         decoder_dim=768)
    assert count_parameters(model)["total"] == 405_200_384


def tiny_model(**kw):
    args = dict(feat_dim=32, attn_dim=32, attn_heads=2, decoder_dim=32, decoder_heads=2)
    args.update(kw)
    return TECModel(tiny_arch(depth=3), **args)


@pytest.mark.parametrize("input_adapter,encoder_adapter", [(False, False), (True, False), (False, True), (True, True)])
def test_adapter_switches(input_adapter, encoder_adapter):
    model = tiny_model(input_adapter=input_adapter, encoder_adapter=encoder_adapter)
    counts = count_parameters(model)
    assert (counts["input_adapter"] > 0) == input_adapter
    assert (counts["encoder_adapter"] > 0) == encoder_adapter
    out = model(torch.randn(2, 3, 32, 32), topk_idx=torch.tensor([[0, 5], [3, 1]]))
    assert out.feat.shape == (2, 16, 32) and out.attn.shape == (2, 3, 2, 16)


def test_branch_and_decoder_switches():
    model = tiny_model(attn_dim=0, decoder_depth=1)
    assert model.attn_branch is None and len(model.decoder_blocks) == 1
    out = model(torch.randn(2, 3, 32, 32))
    assert out.attn is None and out.feat.shape == (2, 16, 32)
    with pytest.raises(ValueError, match="not divisible by the adapter group"):
        TECModel(tiny_arch(depth=4), feat_dim=8)


def test_random_masking_keeps_the_right_count_and_is_seeded():
    x = torch.randn(3, 16, 4)
    noise = torch.rand(3, 16)
    visible, mask, ids_restore = random_masking(x, 0.75, noise)
    assert visible.shape == (3, 4, 4)
    assert mask.sum(1).tolist() == [12, 12, 12]
    for b in range(3):  # visible tokens are exactly the unmasked ones, in noise order
        kept = [i for i in noise[b].argsort().tolist()[:4]]
        assert torch.equal(visible[b], x[b, kept]) and mask[b, kept].sum() == 0
    assert torch.equal(random_masking(x, 0.75, noise)[1], mask)


def test_attention_head_matches_loops():
    model = tiny_model().double()
    qk = torch.randn(2, 17, 64, dtype=torch.float64)
    topk = torch.tensor([[4, 0, 9], [15, 2, 7]])
    za = model.attention_logits(qk, topk)
    H, hd, C = 2, 16, 32
    for b in range(2):
        rows = [0] + [1 + j for j in topk[b].tolist()]
        for r, row in enumerate(rows):
            for h in range(H):
                for key in range(16):
                    q = qk[b, row, h * hd:(h + 1) * hd]
                    k = qk[b, 1 + key, C + h * hd:C + (h + 1) * hd]
                    ref = (q * k).sum().item() / math.sqrt(C)  # scaled by C_base^-0.5
                    assert za[b, r, h, key].item() == pytest.approx(ref, abs=1e-12)


def test_gradients_reach_every_trainable_parameter_and_never_the_base():
    base = load_base_model(TINY_BASE, None)
    model = tiny_model()
    images = torch.randn(4, 3, 32, 32)
    targets = compute_targets(base, images, last_layers=2, k=3)
    losses = tec_losses(model, images, targets, TargetConfig(k=3, tau=1.0))
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.encoder.pos_embed.grad is None
    assert all(p.grad is None for p in base.parameters())


def test_mae_initialisation():
    model = tiny_model()
    torch.testing.assert_close(model.encoder.pos_embed, sincos_2d(32, (4, 4)))
    assert not model.encoder.pos_embed.requires_grad
    assert model.encoder.pos_embed[0, 0].abs().sum() == 0  # zero cls position
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert m.bias.abs().sum() == 0
            bound = math.sqrt(6 / (m.in_features + m.out_features))  # xavier-uniform
            assert m.weight.abs().max() <= bound
    w = model.encoder.patch_embed.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w[0].numel()))


def test_sincos_2d_matches_formula():
    dim, grid = 8, (2, 3)
    emb = sincos_2d(dim, grid)[0]
    for r in range(2):
        for c in range(3):
            row = emb[1 + r * 3 + c]
            for i in range(2):  # dim/4 frequencies per axis
                w = 1 / 10000 ** (i / 2)
                assert row[i].item() == pytest.approx(math.sin(c * w), abs=1e-6)
                assert row[2 + i].item() == pytest.approx(math.cos(c * w), abs=1e-6)
                assert row[4 + i].item() == pytest.approx(math.sin(r * w), abs=1e-6)
                assert row[6 + i].item() == pytest.approx(math.cos(r * w), abs=1e-6)


def test_encode_uses_adapted_cls_token():
    model = tiny_model(input_adapter=True).eval()
    x = torch.randn(2, 3, 32, 32)
    enc = model.encoder
    with torch.no_grad():
        ref = enc.forward_features(x)  # timm path with the raw cls token
        got = model.encode(x)
        enc.cls_token.copy_(model.input_adapter(enc.cls_token))
        folded = enc.forward_features(x)
    assert not torch.allclose(got, ref)
    torch.testing.assert_close(got, folded, atol=1e-5, rtol=1e-5)
