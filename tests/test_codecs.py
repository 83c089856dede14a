"""The storage encoders (torch, on the compute device), bit for bit against a slow float64
reference of their rules and against a numpy encoder of the same rules, view by view; the batch
encoding's checks and measured error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tec_pipeline.cache import codecs, fidelity
from tec_pipeline.cache.encode import NonFiniteTargetError, encode_views, measured_views, read_checks
from tec_pipeline.errors import UserError

B, V, L, C, H, K = 3, 4, 49, 24, 3, 5


def realistic_targets(seed: int = 0) -> dict[str, np.ndarray]:
    """Patch-normalized features with outlier channels and an all-zero view, logits with a far
    outlier, exact ties at half a step, topk indices."""
    r = np.random.default_rng(seed)
    y = r.standard_t(4, size=(B, V, L, C))
    y[..., 5] *= 60.0  # outlier channels: their step is absmax / 127
    y[..., 7] *= 1e-3  # tiny channels: their step is the 1/16 floor
    feat = ((y - y.mean(2, keepdims=True)) / y.std(2, ddof=1, keepdims=True)).astype(np.float32)
    feat[1, 2] = 0.0  # a skipped image's zeros: step 1/16, q = 0
    feat[0, 0, :4, 7] = np.float32(1 / 16) * np.array([0.5, 1.5, -2.5, 126.5], np.float32)  # ties: to even
    attn = (2.5 * r.normal(size=(B, V, K + 1, H, L))).astype(np.float32)
    attn[0, 1, 0, 0, 3] = -100.0  # beyond 255 steps below its row max: clipped, not wrapped
    attn[2, 0, 1, 2] = -np.abs(attn[2, 0, 1, 2]) - 1
    attn[2, 0, 1, 2, :2] = [0.0, -np.float32(0.05)]  # half a step below the row max (0 - x exact, * 10 -> 0.5)
    return {"feat": feat, "feat_mean": r.normal(size=(B, V, C)).astype(np.float32) * 300,
            "feat_std": r.uniform(0.01, 50, (B, V, C)).astype(np.float32), "attn": attn,
            "topk_idx": np.argsort(-r.random((B, V, L)), axis=-1)[..., :K]}


# ---------------------------------------------------------------- the rules, slowly, in float64
# Each rule is a sequence of float32 operations. Doing each one in float64 and rounding the result
# to float32 gives the correctly rounded float32 result (53 >= 2 * 24 + 2: double rounding is
# innocuous for + - * /), so this reference is exact, one view at a time.
def f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)


def reference_feat_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, steps = np.empty(x.shape, np.int8), np.empty(x.shape[:-2] + x.shape[-1:], np.float16)
    for pos in np.ndindex(*x.shape[:-2]):
        v = x[pos].astype(np.float64)
        step = np.maximum(1 / 16, f32(np.abs(v).max(axis=0) / 127)).astype(np.float16)
        q[pos] = np.clip(np.rint(f32(v / step.astype(np.float64))), -127, 127)
        steps[pos] = step
    return q, steps


def reference_attn_uint8(a: np.ndarray) -> np.ndarray:
    u = np.empty(a.shape, np.uint8)
    for pos in np.ndindex(*a.shape[:-1]):
        row = a[pos].astype(np.float64)
        u[pos] = np.clip(np.rint(f32(f32(row.max() - row) * 10.0)), 0, 255)
    return u


# ---------------------------------------------------------------- the same rules in numpy, view by view
def numpy_feat_int8(feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, step = np.empty(feat.shape, np.int8), np.empty(feat.shape[:-2] + feat.shape[-1:], np.float16)
    for pos in np.ndindex(*feat.shape[:-2]):
        absmax = np.abs(feat[pos]).max(axis=-2)
        s = np.maximum(np.float32(1 / 16), absmax / np.float32(127)).astype(np.float16)
        y = feat[pos] / s.astype(np.float32)
        np.rint(y, out=y)
        np.clip(y, -127, 127, out=y)
        q[pos], step[pos] = y, s
    return q, step


def numpy_attn_uint8(attn: np.ndarray) -> np.ndarray:
    u = np.empty(attn.shape, np.uint8)
    for pos in np.ndindex(*attn.shape[:-3]):
        y = attn[pos].max(axis=-1, keepdims=True) - attn[pos]
        y *= np.float32(1 / 0.1)
        np.rint(y, out=y)
        np.clip(y, 0, 255, out=y)
        u[pos] = y
    return u


def encoded(data: dict[str, np.ndarray], feat_dtype: str, attn_dtype: str) -> dict[str, np.ndarray]:
    t = codecs.encode({k: torch.from_numpy(v) for k, v in data.items()}, feat_dtype, attn_dtype)
    return {k: v.numpy() for k, v in t.items()}


def test_steps_and_quotients_are_divisions_not_reciprocal_products():
    """Where a division and a product by the reciprocal round differently: a step of 2M random
    absmax values, and quotients one or two float32 ulps from a half step."""
    r = np.random.default_rng(3)
    halves = np.arange(np.float16(1 / 16).view(np.uint16), np.float16(1000).view(np.uint16), dtype=np.uint16)
    ties = (halves.view(np.float16).astype(np.float64) + np.spacing(halves.view(np.float16)).astype(np.float64) / 2)
    at = (127 * ties).astype(np.float32)  # exact: x / 127 is a float16 tie
    x = np.concatenate([(r.uniform(0, 1, 1_000_000) * 10.0 ** r.uniform(-2, 3, 1_000_000)).astype(np.float32), at,
                        np.nextafter(at, np.float32(np.inf)), np.nextafter(at, np.float32(-np.inf))])[:, None, None]
    want = np.maximum(1 / 16, f32(x[:, 0, 0].astype(np.float64) / 127)).astype(np.float16)
    got = codecs.feat_steps(torch.from_numpy(x)).numpy()[:, 0]
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    step = np.float16(r.uniform(0.07, 3.0, 4096)).astype(np.float16)
    k = r.integers(-126, 126, 4096)
    ties = ((k + 0.5) * step.astype(np.float64)).astype(np.float32)  # exact: 11 + 8 bits
    near = np.stack([np.nextafter(ties, np.float32(np.sign(d) * np.inf)) if d else ties for d in (-1, 0, 1)]
                    + [np.nextafter(np.nextafter(ties, np.float32(np.inf)), np.float32(np.inf))])
    feat = near.T[:, :, None].copy()  # (4096, 4, 1): L = 4 near-ties per step, C = 1
    q = codecs.quantize_feat(torch.from_numpy(feat), torch.from_numpy(step[:, None])).numpy()
    ref = np.clip(np.rint(f32(feat.astype(np.float64) / step.astype(np.float64)[:, None, None])), -127, 127)
    np.testing.assert_array_equal(q, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_and_uint8_encoders_match_the_float64_rule_and_the_old_numpy_bit_for_bit(seed):
    data = realistic_targets(seed)
    got = encoded(data, "int8", "uint8")
    for want_q, want_step in (reference_feat_int8(data["feat"]), numpy_feat_int8(data["feat"])):
        np.testing.assert_array_equal(got["feat"], want_q)
        np.testing.assert_array_equal(got["feat_step"].view(np.uint16), want_step.view(np.uint16))
    for want in (reference_attn_uint8(data["attn"]), numpy_attn_uint8(data["attn"])):
        np.testing.assert_array_equal(got["attn"], want)
    assert got["feat"].dtype == np.int8 and got["attn"].dtype == np.uint8 and got["topk_idx"].dtype == np.int16
    assert got["feat"][0, 0, :4, 7].tolist() == [0, 2, -2, 126]  # ties round to even
    assert got["feat_step"][1, 2].tolist() == [np.float16(1 / 16)] * C and not got["feat"][1, 2].any()
    assert got["attn"][0, 1, 0, 0, 3] == 255 and got["attn"][2, 0, 1, 2, 1] == 0  # clipped; half a step -> even
    assert np.abs(got["feat"]).max() <= 127


def test_float16_and_float32_storage():
    data = realistic_targets()
    got = encoded(data, "float16", "float16")
    for name in ("feat", "feat_mean", "feat_std", "attn"):
        np.testing.assert_array_equal(got[name].view(np.uint16), data[name].astype(np.float16).view(np.uint16))
    exact = encoded(data, "float32", "float32")
    for name in ("feat", "feat_mean", "feat_std", "attn"):
        assert exact[name].dtype == np.float32 and np.array_equal(exact[name], data[name])
    data["feat_mean"][2, 1, 3] = 65520.0  # rounds to inf in float16
    with pytest.raises(UserError, match=r"'feat_mean' exceeds the float16 range .* set cache.feat_dtype=float32"):
        encoded(data, "int8", "uint8")
    data["feat_mean"][2, 1, 3] = 65519.0  # rounds to 65504: stored
    assert encoded(data, "int8", "uint8")["feat_mean"][2, 1, 3] == 65504


def batch_of(data: dict[str, np.ndarray], valid: np.ndarray, measure: np.ndarray, feat_dtype="int8", attn_dtype="uint8"):
    """``encode_views`` of images 10, 11, 12 into new host arrays, its checks read (``read_checks``)
    -> (arrays, measured errors)."""
    targets = {k: torch.from_numpy(v.copy()) for k, v in data.items()}
    out = {k: np.full_like(v, 77) for k, v in encoded(realistic_targets(), feat_dtype, attn_dtype).items()}
    checks = encode_views(targets, torch.from_numpy(valid), measure, feat_dtype, attn_dtype, [10, 11, 12], out)
    return out, read_checks([checks])[0]


def test_batch_encoding_zeroes_skipped_images_and_measures_the_sample():
    data = realistic_targets()
    valid = np.array([True, False, True])
    sample = fidelity.error_sample(B, V, limit=5)
    assert sample.tolist() == [0, 3, 6, 8, 11]  # evenly spread over the 12 views
    measure = measured_views(np.arange(B * V).reshape(B, V), valid, sample)
    assert np.flatnonzero(measure).tolist() == [0, 3, 8, 11]  # image 1 (views 4..7) is skipped
    arrays, errors = batch_of(data, valid, measure)
    zeros = encoded({k: np.zeros_like(v[:1]) for k, v in data.items()}, "int8", "uint8")
    for name, arr in arrays.items():
        np.testing.assert_array_equal(arr[1], zeros[name][0], err_msg=name)
        np.testing.assert_array_equal(arr[[0, 2]], encoded(data, "int8", "uint8")[name][[0, 2]], err_msg=name)
    # the measured error, against float64 numpy on the same views
    pick = [(0, 0), (0, 3), (2, 0), (2, 3)]
    for row, (i, v) in zip(errors, pick):
        ref = data["feat"][i, v].astype(np.float64)
        approx = arrays["feat"][i, v] * arrays["feat_step"][i, v].astype(np.float32)
        assert row[0] == pytest.approx(((approx - ref) ** 2).sum(), rel=1e-5)  # float32 terms and sums
        assert row[1] == pytest.approx((ref ** 2).sum(), rel=1e-5)
        kl = fidelity.attn_kl_rows(data["attn"][i, v], arrays["attn"][i, v] * np.float32(-0.1))
        assert row[2] == pytest.approx(float(kl.sum()), rel=1e-9) and row[3] == (K + 1) * H
    stats = fidelity.error_stats(errors, "int8", "uint8")
    assert stats["error_views"] == 4 and 0 < stats["feat_rel_rms"] < 0.03 and 0 < stats["attn_kl"] < 1e-3


@pytest.mark.parametrize("name", ["feat", "attn", "feat_std"])
def test_non_finite_targets_are_refused_naming_the_image(name):
    data = realistic_targets()
    data[name][2, 1].flat[7] = np.inf if name != "attn" else -np.inf
    with pytest.raises(NonFiniteTargetError, match=f"'{name}' of image 12 has non-finite values"):
        batch_of(data, np.ones(B, bool), np.zeros((B, V), bool))
    data[name][2, 1].flat[7] = np.nan
    with pytest.raises(NonFiniteTargetError, match="image 12"):
        batch_of(data, np.ones(B, bool), np.zeros((B, V), bool))
    batch_of(data, np.array([True, True, False]), np.zeros((B, V), bool))  # a skipped image's rows are zeros


def test_huge_finite_values_are_not_mistaken_for_overflow():
    data = realistic_targets()
    data["feat_std"][0, 0] = 3e38  # finite, but their sum overflows float32
    arrays, _ = batch_of(data, np.ones(B, bool), np.zeros((B, V), bool), "float32", "float32")
    assert arrays["feat_std"][0, 0, 0] == np.float32(3e38)
    data["topk_idx"][1, 1, 0] = L
    with pytest.raises(ValueError, match=f"topk_idx outside 0..{L - 1}"):
        batch_of(data, np.ones(B, bool), np.zeros((B, V), bool))


def test_a_gpu_encodes_the_batch_at_once_into_the_same_bytes(monkeypatch):
    """The device path (one whole-batch encode, then a copy of the storage bytes to the host),
    run here on the CPU, gives the bytes of the CPU's blocks."""
    from tec_pipeline.cache import encode

    data = realistic_targets()
    measure = np.ones((B, V), bool)
    blocks, block_errors = batch_of(data, np.ones(B, bool), measure)
    monkeypatch.setattr(encode, "whole_batch", lambda device: True)
    whole, whole_errors = batch_of(data, np.ones(B, bool), measure)
    for name in blocks:
        np.testing.assert_array_equal(whole[name], blocks[name], err_msg=name)
    np.testing.assert_array_equal(whole_errors, block_errors)
    data["attn"][1, 3, 0, 0, 0] = np.nan  # found when the checks are read, named as on the CPU
    with pytest.raises(NonFiniteTargetError, match="'attn' of image 11"):
        batch_of(data, np.ones(B, bool), measure)
    data = realistic_targets()
    data["topk_idx"][1, 1, 0] = L
    with pytest.raises(ValueError, match=f"topk_idx outside 0..{L - 1}"):
        batch_of(data, np.ones(B, bool), measure)


def test_a_gpu_batch_leaves_its_checks_on_the_device_until_read(monkeypatch):
    """On the device path encoding raises nothing and reads nothing: a non-finite target, an
    out-of-range top-k index and a float16 overflow are each found by ``read_checks`` alone."""
    from tec_pipeline.cache import encode

    monkeypatch.setattr(encode, "whole_batch", lambda device: True)
    data = realistic_targets()
    data["feat"][2, 0, 0, 0] = np.inf
    data["topk_idx"][0, 0, 0] = -1
    data["feat_mean"][0, 0, 0] = 7e4
    targets = {k: torch.from_numpy(v.copy()) for k, v in data.items()}
    out = {k: np.zeros_like(v) for k, v in encoded(realistic_targets(), "int8", "uint8").items()}
    checks = encode_views(targets, torch.ones(B, dtype=torch.bool), np.zeros((B, V), bool), "int8", "uint8",
                          [10, 11, 12], out)  # nothing raised yet
    assert checks.finite is not None and len(checks.flags) == 3  # top-k range, feat_mean and feat_std range
    with pytest.raises(NonFiniteTargetError, match="'feat' of image 12"):  # the first failed check: non-finite
        read_checks([checks])
    checks.finite = torch.ones_like(checks.finite)
    with pytest.raises(ValueError, match="topk_idx outside"):
        read_checks([checks])
