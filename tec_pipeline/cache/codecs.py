"""Storage dtypes of the targets and the measured error of the lossy ones.

For ViT-B/16 at k=15, int8 features with a per (view, channel) step and uint8 attention after
subtracting each row's max stay within the goal of <= 160 KB per view, feature relative RMS
<= 2 % and attention KL <= 1e-3 (measured: README "Benchmarks (measured; the machine is said
with each table)", bytes per view).

- ``feat`` int8: step ``s = max(1/16, absmax_c / 127)`` per (image, view, channel), stored
  float16 as ``feat_step``; ``q = clip(round(x / s), -127, 127)``. The patch-normalized target
  Yf has unit variance per channel, so the 1/16 floor gives ~1.8 % relative RMS; the
  absmax term keeps outlier channels from clipping. We clip ourselves: numcodecs'
  FixedScaleOffset wraps out-of-range values around.
- ``attn`` uint8: softmax ignores a per-row constant, so each (query row, head) row is shifted
  by its max and the non-negative ``max - x`` is stored with step 0.1, clipped to 255 steps
  (logits 25.5 below the max carry weight < exp(-25.5 / tau) ~ 1e-6 at tau = 1.8).
  Decoded uint8 attention is therefore the logits **minus their row max**.
- float16 stores both as is (overflow beyond 65504 is refused, not silently made inf).
"""
from __future__ import annotations

import numpy as np

FEAT_MIN_STEP = 1.0 / 16
INT8_LEVELS = 127
ATTN_STEP = 0.1
UINT8_LEVELS = 255
KL_TAU = 1.8  # the paper's MAE ViT-B temperature (Tab. 9), where the error is reported
ERROR_SAMPLE_VIEWS = 64  # views per shard on which the quantization error is measured


def _blocks(shape: tuple[int, ...], block_ndim: int):
    """Index tuples of the leading dims: the codecs below work one view (one block) at a time,
    which keeps each pass in cache and is 3-5x faster than whole-shard numpy passes."""
    return np.ndindex(*shape[:len(shape) - block_ndim])


def feat_steps(feat: np.ndarray) -> np.ndarray:
    """Per (..., channel) int8 step: ``max(1/16, absmax over patches / 127)``, float16-exact.

    ``feat`` is (L, C); the result (C,) float16. The step is rounded to float16 before
    quantizing, so the stored step is exactly the one used.
    """
    absmax = np.abs(feat).max(axis=-2)
    return np.maximum(np.float32(FEAT_MIN_STEP), absmax / np.float32(INT8_LEVELS)).astype(np.float16)


def encode_feat_int8(feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (..., L, C), step float16 (..., C)) with ``feat ~= q * step``."""
    q = np.empty(feat.shape, np.int8)
    step = np.empty(feat.shape[:-2] + feat.shape[-1:], np.float16)
    for pos in _blocks(feat.shape, 2):
        s = feat_steps(feat[pos])
        y = feat[pos] / s.astype(np.float32)
        np.rint(y, out=y)
        np.clip(y, -INT8_LEVELS, INT8_LEVELS, out=y)  # FixedScaleOffset would wrap instead
        q[pos], step[pos] = y, s
    return q, step


def decode_feat_int8(q: np.ndarray, step: np.ndarray) -> np.ndarray:
    out = np.empty(q.shape, np.float32)
    for pos in _blocks(q.shape, 2):
        np.multiply(q[pos], step[pos].astype(np.float32), out=out[pos])
    return out


def encode_attn_uint8(attn: np.ndarray) -> np.ndarray:
    """uint8 ``round((rowmax - x) / 0.1)`` clipped to [0, 255]; rows are the last axis."""
    u = np.empty(attn.shape, np.uint8)
    for pos in _blocks(attn.shape, 3):
        y = attn[pos].max(axis=-1, keepdims=True) - attn[pos]
        y *= np.float32(1 / ATTN_STEP)
        np.rint(y, out=y)
        np.clip(y, 0, UINT8_LEVELS, out=y)
        u[pos] = y
    return u


def decode_attn_uint8(u: np.ndarray) -> np.ndarray:
    """The row-max-shifted logits (<= 0); softmax of them equals softmax of the originals."""
    out = np.empty(u.shape, np.float32)
    for pos in _blocks(u.shape, 3):
        np.multiply(u[pos], np.float32(-ATTN_STEP), out=out[pos])
    return out


def to_float16(x: np.ndarray, name: str) -> np.ndarray:
    """float16 copy; refuses values beyond the float16 range instead of storing inf."""
    y = np.empty(x.shape, np.float16)
    for pos in _blocks(x.shape, min(2, x.ndim)):
        y[pos] = x[pos]
        if not np.isfinite(y[pos]).all():
            raise ValueError(f"{name} exceeds the float16 range (|x| > 65504); store it as float32")
    return y


def to_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:
        return x
    y = np.empty(x.shape, np.float32)
    for pos in _blocks(x.shape, min(2, x.ndim)):
        y[pos] = x[pos]
    return y


def encode(data: dict[str, np.ndarray], feat_dtype: str, attn_dtype: str) -> dict[str, np.ndarray]:
    """Validated float targets -> arrays in their storage dtypes (see ``schema.array_specs``)."""
    out = {"crop": data["crop"].astype(np.int32), "valid": data["valid"].astype(np.uint8),
           "label": data["label"].astype(np.int64)}
    L = data["feat"].shape[-2]
    out["topk_idx"] = data["topk_idx"].astype(np.int16 if L <= np.iinfo(np.int16).max else np.int32)
    feat = data["feat"].astype(np.float32, copy=False)
    if feat_dtype == "int8":
        out["feat"], out["feat_step"] = encode_feat_int8(feat)
    elif feat_dtype == "float16":
        out["feat"] = to_float16(feat, "feat")
    else:
        out["feat"] = feat
    for name in ("feat_mean", "feat_std"):
        x = data[name].astype(np.float32, copy=False)
        out[name] = x if feat_dtype == "float32" else to_float16(x, name)
    attn = data["attn"].astype(np.float32, copy=False)
    if attn_dtype == "uint8":
        out["attn"] = encode_attn_uint8(attn)
    elif attn_dtype == "float16":
        out["attn"] = to_float16(attn, "attn")
    else:
        out["attn"] = attn
    return out


def decode(enc: dict[str, np.ndarray], feat_dtype: str, attn_dtype: str) -> dict[str, np.ndarray]:
    """Stored arrays -> float32 feat/feat_mean/feat_std/attn, int64 topk_idx, int32 crop,
    uint8 valid, int64 label. Works for any leading dims."""
    out = {"crop": enc["crop"].astype(np.int32, copy=False), "valid": enc["valid"].astype(np.uint8, copy=False),
           "label": enc["label"].astype(np.int64, copy=False), "topk_idx": enc["topk_idx"].astype(np.int64)}
    if feat_dtype == "int8":
        out["feat"] = decode_feat_int8(enc["feat"], enc["feat_step"])
    else:
        out["feat"] = to_float32(enc["feat"])
    for name in ("feat_mean", "feat_std"):
        out[name] = to_float32(enc[name])
    if attn_dtype == "uint8":
        out["attn"] = decode_attn_uint8(enc["attn"])
    else:
        out["attn"] = to_float32(enc["attn"])
    return out


# ----------------------------------------------------------------------------- error


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def attn_kl_rows(ref: np.ndarray, approx: np.ndarray, tau: float = KL_TAU) -> np.ndarray:
    """KL(softmax(ref / tau) || softmax(approx / tau)) of every row (last axis), float64."""
    lp = log_softmax(ref.astype(np.float64) / tau)
    lq = log_softmax(approx.astype(np.float64) / tau)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def feat_rel_rms(ref: np.ndarray, approx: np.ndarray) -> float:
    """``||approx - ref|| / ||ref||`` (relative RMS), float64."""
    ref = ref.astype(np.float64)
    den = float((ref * ref).sum())
    err = float(((approx.astype(np.float64) - ref) ** 2).sum())
    return float(np.sqrt(err / den)) if den > 0 else float(np.sqrt(err))


def error_sample_views(valid: np.ndarray, views: int, limit: int = ERROR_SAMPLE_VIEWS) -> tuple[np.ndarray, np.ndarray]:
    """The views the quantization error is measured on: up to ``limit`` (image, view) pairs of
    valid images, evenly spread over the shard and deterministic."""
    pairs = np.array([(i, v) for i in np.flatnonzero(valid) for v in range(views)], dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        return pairs[:, 0], pairs[:, 1]
    pick = np.unique(np.linspace(0, len(pairs) - 1, min(limit, len(pairs))).round().astype(np.int64))
    return pairs[pick, 0], pairs[pick, 1]


def quantization_error(data: dict[str, np.ndarray], enc: dict[str, np.ndarray], feat_dtype: str,
                       attn_dtype: str, limit: int = ERROR_SAMPLE_VIEWS) -> dict:
    """Measured error of the lossy storage dtypes on a sample of a shard's valid views.

    Returns sums (so shards aggregate exactly) and the shard's own values:
    ``feat_sq_err``, ``feat_sq_ref``, ``feat_rel_rms``, ``attn_kl_sum``, ``attn_rows``,
    ``attn_kl`` (mean over rows of KL at tau = 1.8), ``error_views``. float32 stores are exact
    and report 0 without measuring.
    """
    img, view = error_sample_views(data["valid"], data["feat"].shape[1], limit)
    stats = {"error_views": int(len(img)), "feat_sq_err": 0.0, "feat_sq_ref": 0.0, "feat_rel_rms": 0.0,
             "attn_kl_sum": 0.0, "attn_rows": 0, "attn_kl": 0.0}
    if len(img) == 0:
        return stats
    if feat_dtype != "float32":
        for i, v in zip(img, view):  # one view at a time: no large float64 temporaries
            ref = data["feat"][i, v].astype(np.float32, copy=False).ravel()
            if feat_dtype == "int8":
                approx = decode_feat_int8(enc["feat"][i, v], enc["feat_step"][i, v]).ravel()
            else:
                approx = enc["feat"][i, v].astype(np.float32).ravel()
            diff = approx - ref
            stats["feat_sq_err"] += float(np.dot(diff, diff))
            stats["feat_sq_ref"] += float(np.dot(ref, ref))
        stats["feat_rel_rms"] = float(np.sqrt(stats["feat_sq_err"] / max(stats["feat_sq_ref"], 1e-300)))
    if attn_dtype != "float32":
        ref = data["attn"][img, view]
        stored = enc["attn"][img, view]
        approx = decode_attn_uint8(stored) if attn_dtype == "uint8" else stored.astype(np.float32)
        kl = attn_kl_rows(ref, approx)
        stats["attn_kl_sum"] = float(kl.sum())
        stats["attn_rows"] = int(kl.size)
        stats["attn_kl"] = float(kl.mean())
    return stats


def aggregate_errors(stats: list[dict]) -> dict:
    """Cache-wide errors from per-shard stats (as returned by ``write_shard``)."""
    sq_err = sum(s.get("feat_sq_err", 0.0) for s in stats)
    sq_ref = sum(s.get("feat_sq_ref", 0.0) for s in stats)
    kl_sum = sum(s.get("attn_kl_sum", 0.0) for s in stats)
    rows = sum(s.get("attn_rows", 0) for s in stats)
    return {"feat_rel_rms": float(np.sqrt(sq_err / sq_ref)) if sq_ref > 0 else 0.0,
            "attn_kl": kl_sum / rows if rows else 0.0,
            "error_views": int(sum(s.get("error_views", 0) for s in stats)),
            "tau": KL_TAU}
