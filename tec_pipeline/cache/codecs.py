"""Storage dtypes of the targets and the error of the lossy ones. The encoders are torch and run
on the device that computed the targets (``encode``); the decoders come twice, with the same
float32 math: numpy for readers (``decode``) and torch for a training batch on the compute device
(``decode_batch``), so the loader moves the compact bytes only.

The lossy pair below aims at <= 160 KB per ViT-B/16 view at k=15, feature relative RMS <= 2 %
and attention KL <= 1e-3; ``fidelity.error_stats`` records what each cache reaches.

- ``feat`` int8: step ``s = max(1/16, absmax_c / 127)`` per (image, view, channel), stored
  float16 as ``feat_step``; ``q = clip(round(x / s), -127, 127)``. The patch-normalized target
  Yf has unit variance per channel, so the 1/16 floor gives ~1.8 % relative RMS; the
  absmax term keeps outlier channels from clipping. We clip ourselves: numcodecs'
  FixedScaleOffset wraps out-of-range values around.
- ``attn`` uint8: softmax ignores a per-row constant, so each (query row, head) row is shifted
  by its max and the non-negative ``max - x`` is stored with step 0.1, clipped to 255 steps
  (logits 25.5 below the max carry weight < exp(-25.5 / tau) ~ 1e-6 at tau = 1.8).
  Decoded uint8 attention is therefore the logits **minus their row max**.
- ``feat`` pq: M uint8 codes per patch, product quantization on the cache's fitted PCA basis
  (``pq``: ``x̂ = ẑ Rᵀ``, ``ẑ[m::M] = Q[m, c_m]``); its error is what the cache records, not a
  bound fixed here (15 % relative RMS at M = C / 4 on the demo base).
- float16 stores both as is (overflow beyond 65504 is refused, not silently made inf).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..targets import Targets
from .pq import PqCodec

FEAT_MIN_STEP = 1.0 / 16
INT8_LEVELS = 127
ATTN_STEP = 0.1
UINT8_LEVELS = 255
FLOAT16_TO_INF = 65520.0  # 65504 + half its ulp: from here float16 rounds to inf (the tie goes to even, inf)


def _blocks(shape: tuple[int, ...], block_ndim: int):
    """Index tuples of the leading dims: the decoders below work one view (one block) at a time,
    which keeps each pass in cache and is 3-5x faster than whole-shard numpy passes."""
    return np.ndindex(*shape[:len(shape) - block_ndim])


# ----------------------------------------------------------------------------- encoders (torch)
# They run on the device that computed the targets, right after the base forward. Each float32
# operation is one correctly rounded IEEE operation, as numpy's, so any device gives the same
# bytes; a divisor is a tensor on the device, not a Python number: CUDA divides by a host scalar
# as a multiply by its reciprocal, which is not the same rounding.


def _constant(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _store(y: Tensor, dtype: torch.dtype, out: Optional[Tensor]) -> Tensor:
    """`y` in `dtype`, written into `out` when given (the conversion then makes no new tensor)."""
    return y.to(dtype) if out is None else out.copy_(y)


def feat_steps(feat: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The int8 step ``s = max(1/16, max_L |x| / 127)`` per (..., channel) of ``feat``
    (..., L, C) float32 -> (..., C) float16. Rounded to float16 before quantizing, so the stored
    step is exactly the one used."""
    absmax = feat.abs().amax(dim=-2)
    step = torch.div(absmax, _constant(INT8_LEVELS, absmax), out=absmax).clamp_min_(FEAT_MIN_STEP)
    return _store(step, torch.float16, out)


def quantize_feat(feat: Tensor, step: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """int8 ``q = clip(rint(x / s), -127, 127)`` of ``feat`` (..., L, C) with steps (..., C)
    float16 (round half to even). We clip ourselves: numcodecs' FixedScaleOffset would wrap
    out-of-range values around."""
    q = feat / step.float()[..., None, :]
    return _store(q.round_().clamp_(-INT8_LEVELS, INT8_LEVELS), torch.int8, out)


def encode_attn_uint8(attn: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``u = clip(rint((max_row x - x) / 0.1), 0, 255)`` uint8 of logits (..., L) (a row is the
    last axis); dividing by 0.1 is multiplying by float32(10), exactly."""
    y = torch.sub(attn.amax(dim=-1, keepdim=True), attn)
    return _store(y.mul_(float(np.float32(1 / ATTN_STEP))).round_().clamp_(0, UINT8_LEVELS), torch.uint8, out)


Checks = list  # of (bool tensor that must be True, the error to raise when it is not)


def to_float16(x: Tensor, name: str, setting: str, out: Optional[Tensor] = None,
               checks: Optional[Checks] = None) -> Tensor:
    """float16 copy of finite float32 ``x``; refuses values that would round to inf
    (``|x| >= 65520``) instead of storing them, naming the `setting` that stores them as float32.
    With `checks`, the range test is appended there (a device bool, read later) instead of read now."""
    error = UserError(f"'{name}' exceeds the float16 range (|x| > 65504): set {setting}=float32")
    if x.numel():
        in_range = x.abs().amax() < FLOAT16_TO_INF
        if checks is not None:
            checks.append((in_range, error))
        elif not bool(in_range):
            raise error
    return _store(x, torch.float16, out)


def _float(x: Tensor, dtype: str, name: str, setting: str, out: Optional[Tensor], checks: Optional[Checks]) -> Tensor:
    """float32 kept as is where `setting` is float32, float16 otherwise (mean / std of int8 features too)."""
    if dtype != "float32":
        return to_float16(x, name, setting, out, checks)
    return x if out is None else out.copy_(x)


def fitted(pq: Optional[PqCodec]) -> PqCodec:
    """The cache's fitted pq parts, which pq features cannot be encoded or decoded without."""
    if pq is None:
        raise ValueError("pq features need the cache's fitted parts (CacheWriter.record_feat_codec)")
    return pq


def encode(targets: dict[str, Tensor], feat_dtype: str, attn_dtype: str,
           out: Optional[dict[str, Tensor]] = None, checks: Optional[Checks] = None,
           pq: Optional[PqCodec] = None) -> dict[str, Tensor]:
    """Finite float32 targets (feat, feat_mean, feat_std, attn, any leading dims) and int64
    topk_idx -> tensors in their storage dtypes (``schema.array_specs``), on the same device;
    written into `out` (tensors of those dtypes and shapes) when given. Range checks go to
    `checks` when given (`to_float16`), so a device need not be read per batch. `pq`: the
    cache's fitted parts, for ``feat_dtype=pq``."""
    out = out or {}
    L = targets["feat"].shape[-2]
    index = torch.int16 if L <= np.iinfo(np.int16).max else torch.int32
    enc = {"topk_idx": _store(targets["topk_idx"], index, out.get("topk_idx"))}
    if feat_dtype == "int8":
        enc["feat_step"] = feat_steps(targets["feat"], out.get("feat_step"))
        enc["feat"] = quantize_feat(targets["feat"], enc["feat_step"], out.get("feat"))
    elif feat_dtype == "pq":
        enc["feat"] = _store(fitted(pq).encode(targets["feat"]), torch.uint8, out.get("feat"))
    for name in ("feat", "feat_mean", "feat_std"):
        if name not in enc:
            enc[name] = _float(targets[name], feat_dtype, name, "cache.feat_dtype", out.get(name), checks)
    if attn_dtype == "uint8":
        enc["attn"] = encode_attn_uint8(targets["attn"], out.get("attn"))
    else:
        enc["attn"] = _float(targets["attn"], attn_dtype, "attn", "cache.attn_dtype", out.get("attn"), checks)
    return enc


# ----------------------------------------------------------------------------- decoders (numpy)


def decode_feat_int8(q: np.ndarray, step: np.ndarray) -> np.ndarray:
    out = np.empty(q.shape, np.float32)
    for pos in _blocks(q.shape, 2):
        np.multiply(q[pos], step[pos].astype(np.float32), out=out[pos])
    return out


def decode_attn_uint8(u: np.ndarray) -> np.ndarray:
    """The row-max-shifted logits (<= 0); softmax of them equals softmax of the originals."""
    out = np.empty(u.shape, np.float32)
    for pos in _blocks(u.shape, 3):
        np.multiply(u[pos], np.float32(-ATTN_STEP), out=out[pos])
    return out


def to_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:
        return x
    y = np.empty(x.shape, np.float32)
    for pos in _blocks(x.shape, min(2, x.ndim)):
        y[pos] = x[pos]
    return y


def decode_feat_pq(codes: np.ndarray, pq: PqCodec) -> np.ndarray:
    """uint8 codes (..., L, M) -> float32 (..., L, C), one view at a time (`PqCodec.decode`)."""
    out = np.empty(codes.shape[:-1] + pq.rotation.shape[:1], np.float32)
    for pos in _blocks(codes.shape, 2):
        out[pos] = pq.decode(torch.from_numpy(np.ascontiguousarray(codes[pos]))).numpy()
    return out


def decode(enc: dict[str, np.ndarray], feat_dtype: str, attn_dtype: str,
           pq: Optional[PqCodec] = None) -> dict[str, np.ndarray]:
    """Stored arrays -> float32 feat/feat_mean/feat_std/attn, int64 topk_idx, int32 crop,
    uint8 valid, int64 label. Works for any leading dims; `pq`: the cache's fitted parts."""
    out = {"crop": enc["crop"].astype(np.int32, copy=False), "valid": enc["valid"].astype(np.uint8, copy=False),
           "label": enc["label"].astype(np.int64, copy=False), "topk_idx": enc["topk_idx"].astype(np.int64)}
    if feat_dtype == "int8":
        out["feat"] = decode_feat_int8(enc["feat"], enc["feat_step"])
    elif feat_dtype == "pq":
        out["feat"] = decode_feat_pq(enc["feat"], fitted(pq))
    else:
        out["feat"] = to_float32(enc["feat"])
    for name in ("feat_mean", "feat_std"):
        out[name] = to_float32(enc[name])
    if attn_dtype == "uint8":
        out["attn"] = decode_attn_uint8(enc["attn"])
    else:
        out["attn"] = to_float32(enc["attn"])
    return out


# ----------------------------------------------------------------------------- decoders (torch)
TARGET_FIELDS = ("feat", "feat_mean", "feat_std", "attn", "topk_idx")  # a batch's targets, feat_step aside


def decode_feat(feat: Tensor, feat_step: Optional[Tensor] = None, pq: Optional[PqCodec] = None) -> Tensor:
    """float32 features from their stored dtype, where they are: int8 ``q`` (..., L, C) with its
    float16 steps ``s`` (..., C) -> ``float32(q) * float32(s)[..., None, :]`` (as `decode_feat_int8`);
    uint8 pq codes (..., L, M) -> ``ẑ Rᵀ`` with the cache's parts `pq` (`PqCodec.decode`, moved to
    `feat`'s device once); float16 widened, float32 kept."""
    if feat.dtype == torch.uint8:
        return fitted(pq).decode(feat)
    if feat.dtype == torch.int8:
        if feat_step is None:
            raise ValueError("int8 features need their feat_step")
        return feat.float() * feat_step.float()[..., None, :]
    return feat.float()


def decode_attn(attn: Tensor) -> Tensor:
    """float32 attention logits from their stored dtype, where they are: uint8 ``u`` ->
    ``float32(u) * float32(-ATTN_STEP)``, the logits minus their row max (as `decode_attn_uint8`);
    float16 widened, float32 kept."""
    if attn.dtype == torch.uint8:
        return attn.float() * float(np.float32(-ATTN_STEP))  # the float32 step, exactly
    return attn.float()


def decode_targets(feat: Tensor, feat_mean: Tensor, feat_std: Tensor, attn: Tensor, topk_idx: Tensor,
                   feat_step: Optional[Tensor] = None, pq: Optional[PqCodec] = None) -> Targets:
    """float32 `Targets` from a batch in its stored dtypes, computed where the tensors are
    (`decode_feat`, `decode_attn`; ``topk_idx`` becomes int64).

    Every widening is exact and each product is one correctly rounded float32 multiply, as in
    `decode`'s numpy math, so the values are bit-identical to a reader's ``read_shard``; pq
    features come from a matrix product, whose float32 sums may round otherwise on a batch.
    """
    return Targets(feat=decode_feat(feat, feat_step, pq), feat_mean=feat_mean.float(), feat_std=feat_std.float(),
                   attn=decode_attn(attn), topk_idx=topk_idx.long())


def decode_batch(batch: dict[str, Tensor], device: torch.device | str, pq: Optional[PqCodec] = None) -> Targets:
    """A batch's cached targets as float32 `Targets` on `device`: the stored dtypes travel to the
    device and are decoded there (`decode_targets`; `pq`: the cache's fitted parts, for pq codes)."""
    names = TARGET_FIELDS + (("feat_step",) if "feat_step" in batch else ())
    return decode_targets(**{name: batch[name].to(device, non_blocking=True) for name in names}, pq=pq)
