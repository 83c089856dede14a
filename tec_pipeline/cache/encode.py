"""A batch of targets on the compute device -> its views in storage dtypes on the host.

Stage one calls this right after the base forward, on the device that computed the targets, so
only storage-dtype bytes (at int8/uint8 about a quarter of the float32 bytes) cross to the
host. On the device, per batch: the rows of skipped images are zeroed (the store's
contract), the targets are checked finite and in range with a few reductions, they are encoded
(``codecs.encode``), and the views of the shard's error sample are decoded again to measure the
quantization error (``fidelity.error_sample``).

On a GPU nothing of this waits for the device: the encoded bytes go to the shard's pinned host
arrays by asynchronous copies, and the checks and errors stay on the device as a `BatchChecks`
until the shard is complete, when `read_checks` reads all of them at once. On a CPU they are
read as they are made, which costs nothing there.

The float data path of ``CacheWriter.write_shard`` runs the same code on the CPU, so every cache
is encoded by one implementation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from . import codecs, fidelity
from .pq import PqCodec
from .schema import ArraySpec

FLOAT_KEYS = ("feat", "feat_mean", "feat_std", "attn")
VIEW_TARGETS = FLOAT_KEYS + ("topk_idx",)  # what base_targets.view_targets returns
# On a CPU the encoders run over this many views at a time, so a block's float32 features (a few
# MB at ViT-B/16) stay in the CPU cache between the check and encode passes, where passes over the
# whole batch would each read it from memory again. A GPU takes the batch at once.
CPU_BLOCK_VIEWS = 8


class NonFiniteTargetError(UserError):
    """A target holds NaN or inf (e.g. the base forward overflowed its compute precision)."""


def empty_shard(specs: dict[str, ArraySpec], images: int, views: int, pinned: bool = False) -> dict[str, np.ndarray]:
    """A shard's arrays in their storage dtypes (``schema.array_specs``), zeros (label -1); in
    page-locked memory with `pinned`, so a GPU copies into them asynchronously."""
    out = {}
    for name, s in specs.items():
        shape = (images, views, *s.tail) if s.per_view else (images,)
        out[name] = (torch.zeros(shape, dtype=torch.from_numpy(np.empty(0, s.dtype)).dtype, pin_memory=True).numpy()
                     if pinned else np.zeros(shape, s.dtype))
    out["label"][:] = -1
    return out


@dataclass
class BatchChecks:
    """What encoding a batch leaves to read on the host: the measured error of its sampled views
    and, from a GPU, its checks (read with the rest of its shard's by `read_checks`)."""

    images: Sequence[int]  # the batch's image indices, to name one in an error
    views: int
    errors: Tensor  # (P, 6) float64, `view_errors`
    finite: Optional[Tensor] = None  # (4, B*V) bool: each float target of each view finite; None: checked
    flags: list = field(default_factory=list)  # (bool tensor that must hold, error to raise) pairs


def measured_views(pairs: np.ndarray, valid: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """(B, V) bool: which views of a batch belong to their shard's error sample. ``pairs`` are
    the views' indices in the shard (``image * views + view``); skipped images are never measured."""
    return np.isin(pairs, sample) & np.asarray(valid, bool)[:, None]


def zero_skipped(targets: dict[str, Tensor], valid: Tensor) -> dict[str, Tensor]:
    """The targets with every row of a skipped image (``valid`` False) set to zeros."""
    if bool(valid.all()):
        return targets
    keep = valid.to(targets["feat"].device)
    return {name: torch.where(keep.view(-1, *[1] * (t.ndim - 1)), t, torch.zeros((), dtype=t.dtype, device=t.device))
            for name, t in targets.items()}


def check_finite(block: dict[str, Tensor], images: Sequence[int], views: int, first: int) -> None:
    """Refuse NaN / inf in the float targets of a block of views (flat index `first` onwards),
    naming the image. One sum per view and target: a sum is non-finite when a value is, or (for
    finite values beyond ~1e38 / L) when it overflows; a suspect view is then checked exactly."""
    suspect = torch.stack([~torch.isfinite(block[name].flatten(1).sum(-1)) for name in FLOAT_KEYS])
    if not bool(suspect.any()):
        return
    for k, i in zip(*np.nonzero(suspect.cpu().numpy())):
        if not bool(torch.isfinite(block[FLOAT_KEYS[k]][i]).all()):
            raise NonFiniteTargetError(f"'{FLOAT_KEYS[k]}' of image {images[(first + i) // views]} has non-finite values")


def check_topk(topk_idx: Tensor, num_patches: int, flags: Optional[list] = None) -> None:
    """Refuse top-k patch indices outside 0..L-1 (with `flags`: a device bool appended there)."""
    if not topk_idx.numel():
        return
    error = ValueError(f"topk_idx outside 0..{num_patches - 1}")
    ok = (topk_idx.amin() >= 0) & (topk_idx.amax() < num_patches)
    if flags is not None:
        flags.append((ok, error))
    elif not bool(ok):
        raise error


def whole_batch(device: torch.device) -> bool:
    """Whether the encoders take a batch at once (a GPU), not in blocks of views (a CPU)."""
    return device.type != "cpu"


def view_finite(flat: dict[str, Tensor]) -> Tensor:
    """(4, views) bool: whether each float target of each view (flat leading dim) is all finite."""
    return torch.stack([torch.isfinite(flat[name].flatten(1)).all(-1) for name in FLOAT_KEYS])


def encode_blocks(targets: dict[str, Tensor], feat_dtype: str, attn_dtype: str, out: dict[str, Tensor],
                  images: Sequence[int], checks: BatchChecks, pq: Optional[PqCodec] = None) -> dict[str, Tensor]:
    """Check (``check_finite``) and encode (``codecs.encode``; `pq`: the cache's fitted parts)
    (B, V, ...) targets into `out` (host tensors in storage dtypes); returns the encoded tensors on
    the targets' device. On a GPU the checks go to `checks` and the copies to `out` are
    asynchronous (pinned `out`)."""
    B, V = targets["feat"].shape[:2]
    flat = {name: t.flatten(0, 1) for name, t in targets.items()}
    dest = {name: t.flatten(0, 1) for name, t in out.items()}
    if whole_batch(targets["feat"].device):  # the whole batch on the device, then its storage bytes to the host
        checks.finite = view_finite(flat)
        enc = codecs.encode(flat, feat_dtype, attn_dtype, checks=checks.flags, pq=pq)
        for name, t in enc.items():
            dest[name].copy_(t, non_blocking=True)
        return {name: t.view(B, V, *t.shape[1:]) for name, t in enc.items()}
    for start in range(0, B * V, CPU_BLOCK_VIEWS):  # each block checked and encoded while in cache, into `out`
        part = slice(start, start + CPU_BLOCK_VIEWS)
        block = {name: t[part] for name, t in flat.items()}
        check_finite(block, images, V, start)
        codecs.encode(block, feat_dtype, attn_dtype, {name: t[part] for name, t in dest.items()}, pq=pq)
    return out


def view_errors(targets: dict[str, Tensor], enc: dict[str, Tensor], measure: np.ndarray, feat_dtype: str,
                attn_dtype: str, pq: Optional[PqCodec] = None) -> Tensor:
    """(P, 6) float64 sums ``fidelity.ERROR_COLUMNS`` (feature squared error and reference,
    attention KL and rows, feature cosine and patches) of the views where `measure` (B, V) is
    True, from their float targets and the stored values ``q s`` / ``ẑ Rᵀ`` / ``-0.1 u`` / float16
    (float32 differences). float32 storage is exact: its terms are zeros."""
    device = targets["feat"].device
    pick = torch.as_tensor(np.flatnonzero(measure), device=device)
    ref = {name: t.flatten(0, 1)[pick] for name, t in targets.items()}
    got = {name: t.flatten(0, 1)[pick] for name, t in enc.items()}
    out = torch.zeros(len(pick), len(fidelity.ERROR_COLUMNS), dtype=torch.float64, device=device)
    if len(pick) and feat_dtype != "float32":
        feat = codecs.decode_feat(got["feat"], got.get("feat_step"), pq)
        out[:, 0], out[:, 1] = fidelity.feat_error_sums(ref["feat"], feat)
        out[:, 4], out[:, 5] = fidelity.feat_cosine_sums(ref["feat"], feat)
    if len(pick) and attn_dtype != "float32":
        kl = fidelity.attn_kl_rows(ref["attn"], codecs.decode_attn(got["attn"]))
        out[:, 2], out[:, 3] = kl.flatten(1).sum(-1), kl[0].numel()
    return out


def encode_views(targets: dict[str, Tensor], valid: Tensor, measure: np.ndarray, feat_dtype: str, attn_dtype: str,
                 images: Sequence[int], out: dict[str, np.ndarray], pq: Optional[PqCodec] = None) -> BatchChecks:
    """A batch's targets on their device -> its views in storage dtypes, written into `out` on
    the host (arrays (B, V, ...) of ``codecs.encode``'s names, e.g. a shard's rows); returns the
    measured error of the views where `measure` is True (see ``view_errors``) with what is left
    to check, as `BatchChecks` for `read_checks`.

    ``targets``: float32 feat (B, V, L, C), feat_mean / feat_std (B, V, C), attn
    (B, V, k+1, H, L) and int64 topk_idx (B, V, k), as ``base_targets.view_targets`` returns
    them; ``valid`` (B,) bool; ``measure`` (B, V) bool (``measured_views``); ``images`` the
    image indices, for messages; ``pq`` the cache's fitted parts (``feat_dtype=pq``). Raises ``NonFiniteTargetError`` on NaN / inf (from a GPU: in
    `read_checks`).
    """
    targets = zero_skipped({name: targets[name] for name in VIEW_TARGETS}, valid)
    device = targets["feat"].device
    checks = BatchChecks(images, targets["feat"].shape[1], torch.empty(0, len(fidelity.ERROR_COLUMNS), dtype=torch.float64))
    check_topk(targets["topk_idx"], targets["feat"].shape[-2], checks.flags if whole_batch(device) else None)
    dest = {name: torch.from_numpy(a) for name, a in out.items()}
    enc = encode_blocks(targets, feat_dtype, attn_dtype, dest, images, checks, pq)
    checks.errors = view_errors(targets, enc, measure, feat_dtype, attn_dtype, pq)
    return checks


def read_checks(batches: Sequence[BatchChecks]) -> list[np.ndarray]:
    """Each batch's measured error on the host, (P, 6) float64, after raising the first failed
    check (a non-finite target first, naming its image). One read of the device for all of them."""
    parts = [t for b in batches for t in (b.errors, *([b.finite] if b.finite is not None else []),
                                          *(ok for ok, _ in b.flags))]
    if not parts:
        return []
    flat = torch.cat([t.double().flatten() for t in parts]).cpu().numpy()  # waits for the device once
    host = iter(np.split(flat, np.cumsum([t.numel() for t in parts])[:-1]))
    errors = []
    for b in batches:
        errors.append(next(host).reshape(-1, len(fidelity.ERROR_COLUMNS)))
        if b.finite is not None:
            finite = next(host).reshape(len(FLOAT_KEYS), -1)
            for k, i in zip(*np.nonzero(finite == 0)):
                raise NonFiniteTargetError(f"'{FLOAT_KEYS[k]}' of image {b.images[i // b.views]} has non-finite values")
        for _, error in b.flags:
            if not next(host).item():
                raise error
    return errors


def encode_float_shard(data: dict[str, np.ndarray], specs: dict[str, ArraySpec], feat_dtype: str, attn_dtype: str,
                       images: range, pq: Optional[PqCodec] = None) -> tuple[dict[str, np.ndarray], dict]:
    """A whole shard of float targets on the host (``writer.expected_shapes``) -> (its arrays in
    storage dtypes, its measured error ``fidelity.error_stats``), through ``encode_views`` on the
    CPU (`pq`: the cache's fitted parts). Skipped images' rows (``valid`` 0) become the encoding
    of zeros, their crops zeros."""
    valid = np.asarray(data["valid"]).astype(bool)
    n, V = data["feat"].shape[:2]
    measure = measured_views(np.arange(n * V).reshape(n, V), valid, fidelity.error_sample(n, V))
    targets = {name: torch.from_numpy(np.asarray(data[name], np.float32 if name in FLOAT_KEYS else np.int64))
               for name in VIEW_TARGETS}
    arrays = empty_shard(specs, n, V)
    encoded = {name: a for name, a in arrays.items() if name not in ("crop", "valid", "label")}
    checks = encode_views(targets, torch.from_numpy(valid), measure, feat_dtype, attn_dtype, images, encoded, pq)
    errors = read_checks([checks])[0]
    arrays.update(crop=np.where(valid[:, None, None], data["crop"], 0).astype(np.int32), valid=valid.astype(np.uint8),
                  label=np.asarray(data["label"], np.int64))
    return arrays, fidelity.error_stats(errors, feat_dtype, attn_dtype)
