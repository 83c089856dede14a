"""``tec-pipeline inspect``: a cache's metadata, progress, size and recorded error as text."""
from __future__ import annotations

from . import fidelity
from ..config import flatten
from ..render import cache_loader
from .pq_parts import PARTS_GROUP
from .schema import pq_description, pq_parts_digest, read_markers
from .growth import unfinished_parts
from .store import open_cache


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _chunk_codec(meta: dict) -> str:
    compress = meta.get("compress", "zstd")
    return f"zstd level {meta['zstd_level']}" if compress == "zstd" else f"{compress} + crc32c"


def _feat_codec(meta: dict) -> str:
    if meta["feat_dtype"] != "pq":
        return meta["feat_dtype"]
    digest = pq_parts_digest(meta)
    return f"pq ({pq_description(meta)}, parts {PARTS_GROUP}/ sha256 {digest[:12] if digest else 'not fitted yet'})"


def describe_cache(url: str) -> str:
    """Multi-line description: metadata, counts, shards done/total, bytes on storage and per
    view, completeness (recorded file sizes checked against storage) and the recorded
    quantization error."""
    reader = open_cache(url)
    meta, doc = reader.meta, reader.doc
    missing, damaged = reader.missing_shards(), reader.damaged_shards()
    done = reader.num_shards - len(missing) - len(damaged)
    nbytes = reader.nbytes()
    done_views = sum(len(reader.shard_range(s)) for s in range(reader.num_shards)
                     if s not in missing and s not in damaged) * reader.views
    lines = [
        f"cache: {url}",
        f"store: {meta['store']} (format {doc['format_version']}, written by tec-pipeline {doc.get('package_version', '?')})",
        f"images: {reader.num_images} x {reader.views} views = {reader.num_images * reader.views} views",
        *([f"lineage: {meta['lineage']}"] if meta.get("lineage") else []),
        *[f"growth under way: {name} is not complete (rerun cache-targets with the same config to finish it; "
          f"until then the cache reads as {reader.views} views)" for name in unfinished_parts(reader.fs, reader.root, doc)],
        f"targets: L={meta['num_patches']} C={meta['feat_dim']} H={meta['heads']} k_max={meta['k_max']}; "
        f"feat {_feat_codec(meta)}, attn {meta['attn_dtype']}, {_chunk_codec(meta)}"
        + (", source images stored" if meta.get("store_images") else ""),
        _renderer(meta, doc.get("summary") or {}),
        f"shards: {done} / {reader.num_shards} done ({meta['images_per_shard']} images each)",
        f"bytes on storage: {_size(nbytes)}"
        + (f" ({_size(nbytes / done_views)} per written view)" if done_views else ""),
        *_completeness(reader, missing, damaged),
        "identity:",
        *[f"  {key} = {value}" for key, value in sorted(flatten(meta.get("identity", {})).items())],
    ]
    extra = {k: v for k, v in doc.get("summary", {}).items()
             if k not in ("quantization", "skipped_images", "bytes", "bytes_per_view")}
    if extra:
        lines.append("summary:")
        lines += [f"  {key} = {value}" for key, value in sorted(flatten(extra).items())]
    return "\n".join(lines)


def _renderer(meta: dict, summary: dict) -> str:
    """Who rendered the views (``data.loader``) and how far each other renderer moves the targets."""
    made = cache_loader(meta)
    drift = [f"{name}: feature rel RMS {100 * d['feat_rel_rms']:.2f}%, attn KL {d['attn_kl']:.1e}"
             for name, d in sorted((summary.get("renderer_drift") or {}).items()) if d]
    return f"views rendered by: {made}" + (f" (targets' drift under {'; '.join(drift)})" if drift else "")


def _completeness(reader, missing: list[int], damaged: dict[int, str]) -> list[str]:
    """The 'complete:' line (with what a rerun would write), the quantization error and skipped images."""
    if reader.is_complete() and not damaged:
        summary = reader.doc.get("summary", {})
        lines = ["complete: yes"]
        quant, skipped = summary.get("quantization", {}), summary.get("skipped_images", [])
    else:
        why = [f"missing shards: {_list(missing)}"] if missing else []
        why += [f"shard {s}: {reason}" for s, reason in sorted(damaged.items())]
        lines = [f"complete: no ({'; '.join(why)}); rerun cache-targets with the same config to write "
                 f"{'them' if len(missing) + len(damaged) > 1 else 'it'}"]
        stats = [m["stats"] for s, m in read_markers(reader.fs, reader.root).items() if s not in damaged]
        quant = fidelity.aggregate_errors(stats)
        skipped = [i for s in stats for i in s.get("invalid", [])]
    if quant:
        lines.append(f"quantization error (over {quant.get('error_views', 0)} sampled views): feat relative RMS "
                     f"{100 * quant.get('feat_rel_rms', 0.0):.2f}%, mean cosine {quant.get('feat_cosine', 1.0):.4f}; "
                     f"attn mean KL(tau={quant.get('tau', fidelity.KL_TAU)}) {quant.get('attn_kl', 0.0):.2e}")
    lines.append(f"skipped images: {len(skipped)}" + (f" (first: {_list(skipped)})" if skipped else ""))
    return lines


def _list(items: list, limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
