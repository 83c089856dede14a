"""Product quantization of the feature target on a per-cache PCA basis (``cache.feat_dtype=pq``).

A cache fits its parts once, on the patches of some of its views (`fit_pq`; which views:
``cache_targets.pq_fit``):

- the rotation R (C, C): the eigenvectors of the patches' second moment ``S = Yᵀ Y / N`` by
  descending eigenvalue (`principal_directions`). Yf is normalized per view and channel over the
  patches (Eq. 2), so it has zero mean and S is its covariance: nothing is centred;
- the rotated channels ``z = x R`` are dealt round-robin to M sub-vectors, direction j to
  sub-vector ``j mod M`` (`subvectors`), so each holds a share of the strong and the weak
  directions; sub-vector m is ``z[m::M]``, d = C / M values;
- the codebooks Q (M, 256, d): Lloyd's k-means of each sub-vector's values over the fit patches,
  started from 256 seeded patches (`kmeans`).

A patch x (C,) is stored as M uint8 codes ``c_m = argmin_k ||z_m - Q[m, k]||²`` (`PqCodec.encode`)
and read back as ``x̂ = ẑ Rᵀ`` with ``ẑ[m::M] = Q[m, c_m]`` (`PqCodec.decode`): a gather and one
matrix product, on the compute device. Both run in float32; the codes come from a matrix product
and an argmin, so another device or kernel may settle a near-tie otherwise (a resumed run on the
same kind of device writes the same bytes). The parts are stored float32 with the cache
(`pq_parts`); their digest (`PqCodec.sha256`) is part of the cache's identity.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

CENTROIDS = 256  # one uint8 code per sub-vector
KMEANS_ITERS = 12
FIT_SEED = 0
FIT_VIEWS = 256  # views the parts are fitted on (fewer when the source holds fewer)
NEAREST_CPU_ROWS = 128  # patches per distance block on a CPU: the block stays in cache
NEAREST_DEVICE_VALUES = 2**26  # distances per block on an accelerator (256 MB of float32)


def check_subvectors(subvectors: int, feat_dim: int) -> None:
    """Refuse a sub-vector count that does not split the C channels into equal parts."""
    if not 1 <= subvectors <= feat_dim or feat_dim % subvectors:
        raise UserError(f"cache.pq_subvectors={subvectors}: must divide the base's feature width "
                        f"{feat_dim} (1..{feat_dim}, e.g. {feat_dim // 4})")


def principal_directions(patches: Tensor) -> Tensor:
    """R (C, C) float32: eigenvectors of ``S = Yᵀ Y / N`` of patches Y (N, C), by descending
    eigenvalue, computed in float64; each column's sign is fixed (positive sum), so a fit is
    reproducible."""
    y = patches.double()
    _, vectors = torch.linalg.eigh(y.T @ y / len(y))
    vectors = vectors.flip(-1)  # eigh: ascending eigenvalues
    return (vectors * torch.where(vectors.sum(0) < 0, -1.0, 1.0)).float()


def subvectors(z: Tensor, m: int) -> Tensor:
    """Rotated patches z (N, C) -> (M, N, d): sub-vector m holds the columns m, m + M, m + 2M, ..."""
    return z.reshape(len(z), -1, m).permute(2, 0, 1)


def nearest(z: Tensor, centroids: Tensor) -> Tensor:
    """(M, N) int64: for each sub-vector of each patch z (M, N, d) the index of the nearest of
    `centroids` (M, K, d), ``argmin_k (|Q_k|² / 2 - z·Q_k)`` (the first of equals), in row blocks."""
    half_norm = 0.5 * (centroids * centroids).sum(-1)[:, None, :]  # (M, 1, K)
    rows = (NEAREST_CPU_ROWS if z.device.type == "cpu"
            else max(1, NEAREST_DEVICE_VALUES // (centroids.shape[0] * centroids.shape[1])))
    return torch.cat([(half_norm - z[:, i:i + rows] @ centroids.transpose(1, 2)).argmin(-1)
                      for i in range(0, z.shape[1], rows)], dim=1)


def kmeans(z: Tensor, k: int, iters: int, seed: int) -> Tensor:
    """Lloyd's k-means of every sub-space at once: z (M, N, d) -> centroids (M, k, d), started from
    k seeded patches (repeated when N < k: the copies stay unused); an empty cluster keeps its
    centroid. Run on the CPU, where the sums are accumulated in a fixed order."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randperm(z.shape[1], generator=generator)[torch.arange(k) % z.shape[1]]
    centroids = z[:, start].clone()
    for _ in range(iters):
        codes = nearest(z, centroids)  # (M, N)
        total = torch.zeros_like(centroids).scatter_add_(1, codes[..., None].expand_as(z), z)
        count = torch.zeros(centroids.shape[:2]).scatter_add_(1, codes, torch.ones(codes.shape))
        centroids = torch.where(count[..., None] > 0, total / count.clamp_min(1)[..., None], centroids)
    return centroids


@dataclass(frozen=True, eq=False)
class PqCodec:
    """A cache's fitted parts: ``rotation`` R (C, C) and ``codebooks`` Q (M, 256, d), float32."""

    rotation: Tensor
    codebooks: Tensor
    _placed: dict = field(default_factory=dict, compare=False, repr=False)  # device -> this codec there

    @property
    def subvectors(self) -> int:
        return self.codebooks.shape[0]

    def on(self, device: torch.device | str) -> "PqCodec":
        """This codec with its parts on `device` (moved once per device)."""
        device = torch.device(device)
        if self.rotation.device == device:
            return self
        if device not in self._placed:
            self._placed[device] = PqCodec(self.rotation.to(device), self.codebooks.to(device))
        return self._placed[device]

    def encode(self, feat: Tensor) -> Tensor:
        """float32 features (..., C) -> uint8 codes (..., M), on `feat`'s device."""
        parts = self.on(feat.device)
        z = feat.reshape(-1, feat.shape[-1]) @ parts.rotation  # (N, C)
        codes = nearest(subvectors(z, self.subvectors), parts.codebooks)  # (M, N)
        return codes.T.reshape(*feat.shape[:-1], self.subvectors).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        """uint8 codes (..., M) -> float32 features (..., C), on `codes`' device."""
        parts = self.on(codes.device)
        z = parts.codebooks[torch.arange(self.subvectors, device=codes.device), codes.long()]  # (..., M, d)
        return z.transpose(-1, -2).flatten(-2) @ parts.rotation.T  # column i * M + m is Q[m, c_m, i]

    def arrays(self) -> dict[str, np.ndarray]:
        """The parts as stored: {"rotation": (C, C), "codebooks": (M, 256, d)} float32."""
        return {"rotation": self.rotation.cpu().numpy(), "codebooks": self.codebooks.cpu().numpy()}

    def sha256(self) -> str:
        """Digest of the parts' shapes and little-endian float32 bytes: the cache's identity holds it."""
        digest = hashlib.sha256()
        for name, array in sorted(self.arrays().items()):
            digest.update(f"{name}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array, "<f4").tobytes())
        return digest.hexdigest()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "PqCodec":
        return cls(torch.from_numpy(np.asarray(arrays["rotation"], np.float32)),
                   torch.from_numpy(np.asarray(arrays["codebooks"], np.float32)))


def fit_pq(feat: Tensor, m: int, seed: int = FIT_SEED, iters: int = KMEANS_ITERS) -> PqCodec:
    """The parts fitted on the patches of views ``feat`` (..., L, C) float32, on the CPU."""
    patches = feat.reshape(-1, feat.shape[-1]).float().cpu()
    check_subvectors(m, patches.shape[-1])
    rotation = principal_directions(patches)
    z = subvectors(patches @ rotation, m).contiguous()
    return PqCodec(rotation, kmeans(z, CENTROIDS, iters, seed))
