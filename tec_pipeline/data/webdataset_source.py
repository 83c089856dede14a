"""Webdataset tars of images as an indexable source.

Stage one draws views of image *i* on any worker in any order, so a tar must be read
by index, not streamed. On open, each tar's headers are walked once (`tarfile` seeks
over member data) to record where every image's bytes lie; `load(i)` is then one seek
and one read. Members are grouped into samples by the webdataset rule: the key is the
member path up to the first dot of its file name, the extension is the rest
(`n01/0001.jpg` + `n01/0001.cls` -> one sample, label from the `.cls` text).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
from dataclasses import dataclass

import fsspec
from braceexpand import braceexpand
from PIL import Image

from .sources import IMAGE_EXTENSIONS, BadImageError, SourceError, decode_rgb

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class TarMember:
    """Where one image's bytes lie: tar number, data offset, size, member name."""

    tar: int
    offset: int
    size: int
    name: str


def expand_urls(pattern: str) -> list[str]:
    """`data/shard-{000..003}.tar` -> four paths; several patterns may be joined by `::`."""
    urls = [u for part in pattern.split("::") for u in braceexpand(part.strip())]
    if not urls or not all(urls):
        raise SourceError(f"data.path='{pattern}': no tar paths")
    return urls


def split_key(member: str) -> tuple[str, str]:
    """webdataset's key/extension split: key up to the first dot of the file name."""
    directory, base = posixpath.split(member)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _read_label(tf: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> int:
    text = tf.extractfile(info).read().decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise SourceError(f"{where}: label '{text[:20]}' is not an integer") from None


def index_tar(url: str, tar: int) -> tuple[list[TarMember], list[int], list[tuple[str, int]]]:
    """Walk one tar's headers: its images (in member order), their labels, (name, size) pairs."""
    images: dict[str, TarMember] = {}
    labels: dict[str, int] = {}
    listing: list[tuple[str, int]] = []
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                listing.append((info.name, info.size))
                key, ext = split_key(info.name)
                if ext in _IMAGE_EXTS and key not in images:
                    images[key] = TarMember(tar, info.offset_data, info.size, info.name)
                elif ext == "cls":
                    labels[key] = _read_label(tf, info, f"{url}:{info.name}")
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"{url}: tar file not found") from None
    except (tarfile.TarError, EOFError) as err:
        reason = " ".join(str(err).split())
        raise SourceError(f"{url}: not a readable uncompressed tar ({type(err).__name__}: {reason})") from None
    except OSError as err:
        raise SourceError(f"{url}: cannot read ({type(err).__name__}: {err})") from None
    members = list(images.values())
    return members, [labels.get(split_key(m.name)[0], -1) for m in members], listing


class WebDatasetSource:
    """Images of one or more webdataset tars, in tar order then member order."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.urls = expand_urls(pattern)
        self.members: list[TarMember] = []
        self.labels: list[int] = []
        digest = hashlib.sha256()
        for t, url in enumerate(self.urls):
            members, labels, listing = index_tar(url, t)
            self.members += members
            self.labels += labels
            for name, size in listing:
                digest.update(f"{posixpath.basename(url)}\t{name}\t{size}\n".encode())
        if not self.members:
            raise SourceError(f"{pattern}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {len(self.urls)} tar(s)")
        self._fingerprint = digest.hexdigest()
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # Open handles do not survive pickling to DataLoader workers; each process reopens.
        return {**self.__dict__, "_files": {}}

    def __len__(self) -> int:
        return len(self.members)

    def _file(self, tar: int):
        if self._pid != os.getpid():  # forked: never share a file position with the parent
            self._files, self._pid = {}, os.getpid()
        if tar not in self._files:
            self._files[tar] = fsspec.open(self.urls[tar], "rb").open()
        return self._files[tar]

    def raw(self, index: int) -> bytes:
        m = self.members[index]
        f = self._file(m.tar)
        f.seek(m.offset)
        data = f.read(m.size)
        if len(data) != m.size:
            raise BadImageError(f"{self.name(index)}: tar ends inside this member (file changed since indexing?)")
        return data

    def load(self, index: int) -> Image.Image:
        return decode_rgb(self.raw(index), self.name(index))

    def label(self, index: int) -> int:
        return self.labels[index]

    def name(self, index: int) -> str:
        m = self.members[index]
        return f"{self.urls[m.tar]}:{m.name}"

    def fingerprint(self) -> str:
        """SHA-256 of every tar's member names and sizes, in order."""
        return self._fingerprint

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
