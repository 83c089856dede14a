"""Image sources: indexable sets of decoded RGB images with optional labels."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Protocol

from PIL import Image

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class BadImageError(UserError):
    """An image that cannot be decoded; the message names it."""


class SourceError(UserError, FileNotFoundError):
    """A dataset that cannot be opened (missing, empty, not a tar); one line naming it.

    Also a FileNotFoundError, so code that catches a missing file that way catches a missing
    dataset too.
    """


class ImageSource(Protocol):
    """What both stages need of a dataset: a fixed order of images."""

    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image: ...  # decoded RGB
    def label(self, index: int) -> int: ...  # -1 when unlabelled
    def name(self, index: int) -> str: ...
    def fingerprint(self) -> str: ...
    def raw(self, index: int) -> bytes: ...  # the encoded file, for caches that keep source images


def decode_rgb(data: bytes | str | Path, name: str) -> Image.Image:
    """Decode fully (so truncation is caught here, not later) and convert any mode to RGB."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit grey
            elif im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            return im.convert("RGB")
    except Exception as err:
        reason = " ".join(str(err).split())  # one line, whatever PIL put in the message
        raise BadImageError(f"{name}: cannot decode image ({type(err).__name__}: {reason})") from None


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) from the file's header alone, as stored (no EXIF rotation, as `decode_rgb`)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except Exception as err:
        reason = " ".join(str(err).split())
        raise BadImageError(f"{name}: cannot decode image (its header: {type(err).__name__}: {reason})") from None


class ImageFolderSource:
    """`root/class/x.jpg` (labels by sorted class folder) or a flat `root/x.jpg` (label -1)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: image folder not found")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise SourceError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.files = [p.relative_to(self.root) for p in files]
        self.classes = sorted({p.parts[0] for p in self.files if len(p.parts) > 1})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[p.parts[0]] if len(p.parts) > 1 else -1 for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        return decode_rgb(self.root / self.files[index], str(self.root / self.files[index]))

    def label(self, index: int) -> int:
        return self.labels[index]

    def name(self, index: int) -> str:
        return self.files[index].as_posix()

    def raw(self, index: int) -> bytes:
        return (self.root / self.files[index]).read_bytes()

    def fingerprint(self) -> str:
        """SHA-256 of the ordered file list and sizes: a changed dataset is a different cache."""
        h = hashlib.sha256()
        for p in self.files:
            h.update(f"{p.as_posix()}\t{(self.root / p).stat().st_size}\n".encode())
        return h.hexdigest()
