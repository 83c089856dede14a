"""Groups files: which images belong together, so that a held-out part holds out whole groups.

Renderings of one source sample, crops of one photograph, frames of one video are not
independent: a held-out image whose sibling was fitted on scores higher than a new one would.
A groups file names the group of every image of a folder, and the held-out fifths
(`protocols.validation_split`, the probe's fifth) and the paired bootstrap
(`statistics.paired_difference`) then work on whole groups.

Format: CSV with the header ``image,group``; ``image`` is the image's path relative to the
folder's root as the source names it (``3/00012.png`` for an ImageFolder), ``group`` an integer
or a string id. Every image of the folder has exactly one row.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import EvalError

HEADER = ("image", "group")
_INTEGER = re.compile(r"[+-]?\d+")


def read_groups(path: str | Path, source) -> np.ndarray:
    """The group of each image of `source` (anything with ``len`` and ``name(i)``, e.g. an
    ImageFolderSource), in its order: int64 where every group is an integer (so integer ids
    sort as numbers wherever groups are ordered), else strings.

    Refused with one line naming the file and the row: an unreadable file, a header other than
    ``image,group``, a row that is not two fields, an empty group, an image listed twice or not
    in `source`; and naming the image: an image of `source` without a row.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(_rows(path, csv.reader(f)))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise EvalError(f"{path}: cannot read the groups file ({getattr(err, 'strerror', None) or err})") from None
    names = [source.name(i) for i in range(len(source))]
    position = {name: i for i, name in enumerate(names)}
    found: list[str | None] = [None] * len(names)
    first_row: dict[str, int] = {}
    for line, image, group in rows:
        if image not in position:
            raise EvalError(f"{path}, row {line}: image '{image}' is not in {_where(source)}")
        if image in first_row:
            raise EvalError(f"{path}, row {line}: image '{image}' listed again (first on row {first_row[image]})")
        first_row[image] = line
        found[position[image]] = group
    missing = [name for name, group in zip(names, found) if group is None]
    if missing:
        raise EvalError(f"{path}: no row for image '{missing[0]}' of {_where(source)}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if all(_INTEGER.fullmatch(g) for g in found):
        return np.asarray([int(g) for g in found], dtype=np.int64)
    return np.asarray(found, dtype=str)


def _rows(path: Path, reader) -> list[tuple[int, str, str]]:
    """(row number, image, group) of every data row; the header checked. Rows are the file's
    line numbers, the header being row 1."""
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != HEADER:
        found = "an empty file" if header is None else f"header '{','.join(header)}'"
        raise EvalError(f"{path}, row 1: {found}, expected the header '{','.join(HEADER)}'")
    rows = []
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != 2:
            raise EvalError(f"{path}, row {line}: {len(fields)} fields, expected {','.join(HEADER)}")
        image, group = (f.strip() for f in fields)
        if not image or not group:
            raise EvalError(f"{path}, row {line}: empty {'image' if not image else 'group'}")
        rows.append((line, PurePosixPath(image).as_posix(), group))
    return rows


def _where(source) -> str:
    return str(getattr(source, "root", "the image folder"))


def write_groups(path: str | Path, images: Sequence[str], groups: Sequence) -> Path:
    """Write a groups file: one row per image, in the given order; atomically (a temporary file
    renamed into place), so a reader never sees half a file."""
    path = Path(path)
    if len(images) != len(groups):
        raise ValueError(f"{len(images)} images but {len(groups)} groups")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(zip(images, groups))
    tmp.rename(path)
    return path
