"""benchmarks/feat_codecs.py: each codec's encode -> decode against a float64 reference of the
same codec (a wrong axis, step or packing would be far off it), and bytes per view from the
encoded arrays themselves."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import feat_codecs as fc  # noqa: E402  (benchmarks/ is scripts, not a package)

from tec_pipeline.cache.fidelity import feat_rel_rms  # noqa: E402

L, C = 16, 64


def targets(n: int, seed: int) -> torch.Tensor:
    """Patch-normalized (n, L, C) features with a decaying spectrum (mixed Gaussian channels)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=torch.Generator().manual_seed(99)) * torch.linspace(1, 0.05, C)[:, None]
    y = torch.randn(n, L, C, generator=g) @ mix
    return (y - y.mean(1, keepdim=True)) / y.std(1, keepdim=True)


FIT, HELD = targets(32, 0), targets(6, 1)


def quantized64(z: np.ndarray, step: np.ndarray, levels: int) -> np.ndarray:
    """float64 ``clip(round(z / s), -levels, levels) * s``: the reference dequantized values."""
    return np.clip(np.round(z / step), -levels, levels) * step


def reference(codec, x: torch.Tensor, enc: dict) -> np.ndarray:
    """What the codec should decode to, computed in float64 from `x`, the codec's stored parts
    and its stored steps (PQ: the float64 nearest centroid)."""
    x64 = x.double().numpy()
    parts = {k: v.double().numpy() for k, v in codec.parts.items()}
    if isinstance(codec, fc.Group4):
        step = enc["step"].double().numpy()[..., None]
        return quantized64(x64.reshape(*x.shape[:-1], -1, codec.g), step, 7).reshape(x64.shape)
    if isinstance(codec, fc.PCA):
        basis = parts["basis"]
        return quantized64(x64 @ basis, enc["step"].double().numpy()[:, None, :], codec.levels) @ basis.T
    rot = parts.get("rotation", np.eye(C))
    z = (x64 @ rot).reshape(-1, C // codec.m, codec.m).transpose(2, 0, 1)  # (M, rows, d)
    book = parts["codebooks"]
    codes = ((z[:, :, None, :] - book[:, None]) ** 2).sum(-1).argmin(-1)  # (M, rows)
    rec = np.take_along_axis(book, codes[..., None], axis=1)  # (M, rows, d)
    return rec.transpose(1, 2, 0).reshape(*x.shape[:-1], C) @ rot.T


CODECS = [lambda: fc.Group4(16), lambda: fc.PCA(24, 8), lambda: fc.PCA(32, 4), lambda: fc.PQ(16, False),
          lambda: fc.PQ(16, True)]


@pytest.mark.parametrize("make", CODECS)
def test_decode_matches_a_float64_reference_and_is_deterministic(make):
    codec, again = make(), make()
    codec.fit(FIT)
    again.fit(FIT)
    for name, part in codec.parts.items():
        assert torch.equal(part, again.parts[name]), name
    enc = codec.encode(HELD)
    got = codec.decode(enc)
    ref = reference(codec, HELD, enc)
    assert got.dtype == torch.float32 and got.shape == HELD.shape
    assert feat_rel_rms(ref.astype(np.float32), got) < 1e-3  # rounding ties may differ, nothing more
    assert feat_rel_rms(HELD, got) < 0.6  # and it is a reconstruction at all (zeros score 1.0)


def test_full_rank_pca_and_int8_reconstruct_within_quantization_error():
    full = fc.PCA(C, 8)
    full.fit(FIT)
    assert feat_rel_rms(HELD, full.decode(full.encode(HELD))) < 0.02
    int8 = fc.Int8()
    assert feat_rel_rms(HELD, int8.decode(int8.encode(HELD))) < 0.02


def test_pack4_round_trips_every_value():
    q = torch.arange(-7, 8, dtype=torch.int8).repeat(2)[:, None].expand(30, 4).T.contiguous()  # (4, 30)
    packed = fc.pack4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 15)
    assert torch.equal(fc.unpack4(packed), q)


@pytest.mark.parametrize("make, expected", [
    (lambda: fc.Int8(), L * C + 2 * C), (lambda: fc.Group4(16), L * C // 2 + 2 * L * C // 16),
    (lambda: fc.PCA(24, 8), L * 24 + 2 * 24), (lambda: fc.PCA(32, 4), L * 32 // 2 + 2 * 32),
    (lambda: fc.PQ(16, True), L * 16)])
def test_bytes_per_view_come_from_the_encoded_arrays(make, expected):
    codec = make()
    codec.fit(FIT)
    enc = codec.encode(HELD)
    raw, packed = fc.view_bytes(enc)
    assert raw == sum(t.numpy().nbytes for t in enc.values()) / len(HELD) == expected
    assert 0 < packed < raw + 40 * len(enc)  # zstd frames of the same arrays (a frame adds < 40 bytes)
