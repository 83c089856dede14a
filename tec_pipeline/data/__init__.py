"""Image sources: ImageFolder, webdataset tars of images, the built-in demo set."""
from __future__ import annotations

from pathlib import Path

from .sources import BadImageError, ImageFolderSource, ImageSource, SourceError, decode_rgb

SOURCE_KINDS = ("imagefolder", "webdataset", "demo")


def demo_root(path: str | Path) -> Path:
    """The demo set is an ImageFolder; `tec_pipeline.demo.data.build_demo_data` writes its training
    split to `path/train`."""
    path = Path(path)
    if not (path / "train").is_dir():
        raise SourceError(f"{path}: no demo data (no train/ folder); build it with "
                          "tec_pipeline.demo.data.build_demo_data first")
    return path / "train"


def open_source_at(kind: str, path: str) -> ImageSource:
    """Open a dataset by kind and path (also how `verify` reopens a cache's source)."""
    if not path:
        raise SourceError(f"data.path is empty: give the {kind} dataset's location")
    if kind == "imagefolder":
        return ImageFolderSource(path)
    if kind == "demo":
        return ImageFolderSource(demo_root(path))
    if kind == "webdataset":
        from .webdataset_source import WebDatasetSource

        return WebDatasetSource(path)
    raise SourceError(f"data.kind='{kind}': expected one of {', '.join(SOURCE_KINDS)}")


def open_source(data_cfg) -> ImageSource:
    """The `ImageSource` a `DataConfig` names."""
    return open_source_at(data_cfg.kind, data_cfg.path)


def source_location(kind: str, path: str) -> str:
    """`path` made independent of the working directory (local paths absolute, URLs as given)."""
    parts = path.split("::") if kind == "webdataset" else [path]
    return "::".join(p if "://" in p else str(Path(p).absolute()) for p in parts)


__all__ = ["BadImageError", "ImageFolderSource", "ImageSource", "SourceError", "decode_rgb",
           "demo_root", "open_source", "open_source_at", "source_location", "SOURCE_KINDS"]
