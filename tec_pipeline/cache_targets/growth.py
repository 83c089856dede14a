"""Stage one growing a complete cache (`cache.growth`): the view part reuses the cache's pq parts,
and is recorded in the cache once it is complete."""
from __future__ import annotations

from ..cache.growth import Growth, lineage, record_growth
from ..cache.storage import fs_root
from ..cache.store import open_cache


def adopt_parts(writer, url: str) -> None:
    """A pq cache's view part is encoded with the parts the cache fitted (recorded in the part
    before any of its shards; a resumed part has them already): the added views' codes mean
    what the first views' mean, and nothing is fitted again."""
    if writer.meta["feat_dtype"] == "pq" and writer.feat_codec is None:
        writer.record_feat_codec(open_cache(url).feat_codec)


def finish_growth(url: str, growth: Growth) -> str:
    """Record the complete part in the cache (one atomic write of its metadata file); the lineage."""
    fs, root = fs_root(url)
    return lineage(record_growth(fs, root, growth))
