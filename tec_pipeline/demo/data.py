"""The built-in demo set: MNIST-M-like digits made from what scikit-learn ships.

The demo needs no network, so its data is rendered locally from scikit-learn's 1,797
handwritten digits (8x8 grey) composited over random crops of its two sample photographs
(china.jpg, flower.jpg). Every image is a 32x32 RGB picture of one source digit in a random
colour, size, position and slant, over a background cut from a photo (its flat colour at the
default difficulty, its texture and stroke fragments of other digits as clutter at higher ones).

Two properties make the numbers it produces mean something:

* **Split by source digit.** Each source digit belongs to exactly one split, so a test
  image never shows a handwriting sample seen in training; several renderings per source
  digit reach the requested image counts.
* **Deterministic.** Every image is drawn from a generator seeded by
  ``(seed, split, image index)`` and written as PNG with fixed settings: the same seed
  gives byte-identical files on any machine with the same library versions.

The result is an ImageFolder (``root/train/<digit>/00000.png``, ``root/test/...``) with a
``manifest.json`` that records the settings, the counts and, per image, its source digit
and label, and one groups file per split (``root/train_groups.csv``, ``root/test_groups.csv``,
`evaluate.groups`): the source digit of each image, what the demo's held-out fifths and
bootstrap intervals group by. The manifest is written last: it marks a complete build.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..errors import UserError
from ..evaluate.groups import write_groups

FORMAT = "tec-pipeline-demo-digits"
RENDERER_VERSION = 3  # bump when rendering changes: old builds then no longer match
IMG_SIZE = 32
TEST_FRACTION = 0.2  # of the source digits of each class
NUM_CLASSES = 10
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
GROUPS_FILES = {s: f"{s}_groups.csv" for s in SPLITS}  # beside the split folders, never inside them
# First word of every seed: which draw it is, so no two draws ever share a stream.
_SPLIT, _ASSIGN, _RENDER = 1, 2, 3


class DemoDataError(UserError):
    """A demo root that holds something else, or a build with other settings."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything the bytes of a build depend on; equal settings give equal files."""

    train_size: int
    test_size: int
    difficulty: float
    seed: int
    img_size: int = IMG_SIZE
    test_fraction: float = TEST_FRACTION
    renderer_version: int = RENDERER_VERSION


# ---------------------------------------------------------------- ingredients


def load_ingredients() -> tuple[np.ndarray, np.ndarray, list[Image.Image]]:
    """(glyphs (1797, 8, 8) float32 in [0, 1], labels (1797,), the sample photos as RGB images)."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = [Image.fromarray(im) for im in load_sample_images().images]
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64), photos


def split_sources(labels: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION) -> dict[str, np.ndarray]:
    """Source-digit indices per split, stratified by class, disjoint, each sorted."""
    rng = np.random.default_rng(np.random.SeedSequence([_SPLIT, seed]))
    test = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        n_test = int(round(len(members) * test_fraction))
        test.append(rng.permutation(members)[:n_test])
    test_set = np.sort(np.concatenate(test))
    train_set = np.setdiff1d(np.arange(len(labels)), test_set)
    return {"train": train_set, "test": test_set}


def assign_sources(sources: np.ndarray, n_images: int, seed: int, split_code: int) -> np.ndarray:
    """The source digit of each image: whole passes over a shuffled order, so every source
    digit of the split is rendered ceil or floor(n_images / len(sources)) times."""
    rng = np.random.default_rng(np.random.SeedSequence([_ASSIGN, seed, split_code]))
    passes = -(-n_images // len(sources))
    order = np.concatenate([rng.permutation(sources) for _ in range(passes)])
    return order[:n_images]


# ---------------------------------------------------------------- rendering


def background(photos: list[Image.Image], rng: np.random.Generator, size: int, texture: float = 1.0) -> np.ndarray:
    """A random square crop (48..160 px) of one photo, flipped half the time, resized
    (bilinear, in PIL: deterministic) to `size`, its texture scaled by `texture` about its mean
    colour (0: the crop's flat mean colour, 1: the crop as is): float32 (size, size, 3) in [0, 1]."""
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(48, 161))
    top, left = int(rng.integers(0, photo.height - side + 1)), int(rng.integers(0, photo.width - side + 1))
    crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    bg = np.asarray(crop, dtype=np.float32) / 255.0
    bg = bg[:, ::-1] if rng.random() < 0.5 else bg
    mean = bg.reshape(-1, 3).mean(0)
    return mean + np.float32(texture) * (bg - mean)  # float32, a new array: the caller may draw on it


def glyph_mask(glyph: np.ndarray, height: int, width: int, angle: float) -> np.ndarray:
    """Upsample an 8x8 digit to (height, width), slant it, sharpen the blurry upsampled
    strokes into an alpha mask in [0, 1]."""
    im = Image.fromarray(np.round(glyph * 255).astype(np.uint8))
    im = im.resize((width, height), Image.Resampling.BICUBIC)
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return np.clip(1.6 * a - 0.25, 0.0, 1.0)


def paste(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, top: int, left: int, opacity: float) -> None:
    """Alpha-blend a `colour` mask onto `canvas` in place, clipped to the canvas."""
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, H), min(left + w, W)
    if t0 >= t1 or l0 >= l1:
        return
    a = opacity * alpha[t0 - top:t1 - top, l0 - left:l1 - left, None]
    canvas[t0:t1, l0:l1] = (1 - a) * canvas[t0:t1, l0:l1] + a * colour


def contrasting_colour(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Roughly the complement of the background's mean colour, with a random hue shift:
    visible on its background (so the label stays right) but different every time."""
    return np.clip(1.0 - bg.reshape(-1, 3).mean(0) + rng.normal(0.0, 0.25, 3), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Nuisances:
    """How far each nuisance goes at one difficulty; all grow linearly with it."""

    min_scale: float  # digit height drawn from uniform(min_scale, 0.9) of the image
    jitter: float  # fraction of the free room the digit may move off centre
    slant: float  # largest rotation, degrees
    min_opacity: float  # digit opacity drawn from uniform(min_opacity, 1): contrast loss
    clutter: float  # mean number of stroke fragments of other digits (Poisson)
    noise: float  # std of Gaussian pixel noise
    texture: float  # how much of the photo's texture the background keeps (0: its mean colour)


def nuisances(difficulty: float) -> Nuisances:
    """The one knob, in two halves: 0 (a big centred digit on a flat colour) .. 0.5 (any size
    and place, slanted, fainter; the default) .. 1 (small, faint, cluttered, on photo texture).

    Geometry comes first and texture last because photo texture is what an MAE base of the
    demo's size spends its capacity on: on flat backgrounds it learns digit features a linear
    probe reads, on full photo texture it does not."""
    d = float(difficulty)
    g, t = min(1.0, 2.0 * d), max(0.0, 2.0 * d - 1.0)  # the geometric half, the texture half
    return Nuisances(min_scale=0.9 - 0.45 * g - 0.15 * t, jitter=g, slant=30.0 * g + 5.0 * t,
                     min_opacity=1.0 - 0.25 * g - 0.25 * t, clutter=4.0 * t, noise=0.025 * (g + t),
                     texture=t)


def render_digit(glyph: np.ndarray, clutter_glyphs: list[np.ndarray], photos: list[Image.Image],
                 n: Nuisances, rng: np.random.Generator, size: int = IMG_SIZE) -> np.ndarray:
    """One demo image (size, size, 3) uint8: `glyph` over a photo crop, over `clutter_glyphs`."""
    canvas = background(photos, rng, size, n.texture)
    # Clutter first, under the digit and fainter than it: partial strokes of other digits.
    for other in clutter_glyphs:
        s = int(rng.integers(size // 3, size // 2 + 1))
        frag = glyph_mask(other, s, s, rng.uniform(-30, 30))
        fh, fw = frag.shape
        ch, cw = int(rng.integers(fh // 3, fh + 1)), int(rng.integers(fw // 3, fw + 1))
        ct, cl = int(rng.integers(0, fh - ch + 1)), int(rng.integers(0, fw - cw + 1))
        frag = frag[ct:ct + ch, cl:cl + cw]
        paste(canvas, frag, contrasting_colour(canvas, rng), int(rng.integers(-ch // 2, size - ch // 2)),
              int(rng.integers(-cw // 2, size - cw // 2)), rng.uniform(0.25, 0.5))
    h = int(round(size * rng.uniform(n.min_scale, 0.9)))
    w = int(round(h * rng.uniform(0.75, 1.0)))
    mask = glyph_mask(glyph, h, w, rng.uniform(-n.slant, n.slant))
    mh, mw = mask.shape
    # Free room on each side, plus 2 px so that at full jitter a stroke may touch the edge.
    room_y, room_x = max(size - mh, 0) / 2 + 2, max(size - mw, 0) / 2 + 2
    top = int(round((size - mh) / 2 + n.jitter * rng.uniform(-room_y, room_y)))
    left = int(round((size - mw) / 2 + n.jitter * rng.uniform(-room_x, room_x)))
    paste(canvas, mask, contrasting_colour(canvas, rng), top, left, rng.uniform(n.min_opacity, 1.0))
    canvas += rng.normal(0.0, n.noise, canvas.shape).astype(np.float32)
    return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def render_image(settings: DemoSettings, split: str, index: int, source: int, split_sources: np.ndarray,
                 glyphs: np.ndarray, photos: list[Image.Image]) -> np.ndarray:
    """Image `index` of `split`: its own generator, its clutter drawn from the same split only
    (a test digit's strokes never appear in training images)."""
    rng = np.random.default_rng(np.random.SeedSequence([_RENDER, settings.seed, SPLITS.index(split), index]))
    n = nuisances(settings.difficulty)
    others = [glyphs[int(i)] for i in rng.choice(split_sources, size=int(rng.poisson(n.clutter)))]
    return render_digit(glyphs[source], others, photos, n, rng, settings.img_size)


# ---------------------------------------------------------------- the build


def image_name(label: int, index: int) -> str:
    """Image `index` of a split, as its split folder's reader names it."""
    return f"{label}/{index:05d}.png"


def image_path(split: str, label: int, index: int) -> str:
    return f"{split}/{image_name(label, index)}"


def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    with path.open() as f:
        return json.load(f)


def write_group_files(root: str | Path, manifest: dict) -> dict[str, Path]:
    """Write the groups file of each split from `manifest`: every image's source digit."""
    written = {}
    for s in SPLITS:
        images = manifest["images"][s]
        names = [image_name(label, i) for i, label in enumerate(images["label"])]
        written[s] = write_groups(Path(root) / GROUPS_FILES[s], names, images["source"])
    return written


def group_files(root: str | Path) -> dict[str, Path]:
    """{split: its groups file} of the complete demo build at `root`; a build that lacks them
    (they are derived data) gets them from its manifest first. Refused with one line where
    `root` is not a complete demo build."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None or manifest.get("format") != FORMAT:
        raise DemoDataError(f"{root}: not a complete demo build (no demo {MANIFEST}); build it with "
                            "tec_pipeline.demo.data.build_demo_data first")
    paths = {s: root / GROUPS_FILES[s] for s in SPLITS}
    if not all(p.is_file() for p in paths.values()):
        write_group_files(root, manifest)
    return paths


def _write_split(tmp: Path, settings: DemoSettings, split: str, sources: np.ndarray, assigned: np.ndarray,
                 labels: np.ndarray, glyphs: np.ndarray, photos: list[Image.Image]) -> None:
    for c in range(NUM_CLASSES):
        (tmp / split / str(c)).mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(assigned):
        pixels = render_image(settings, split, i, int(src), sources, glyphs, photos)
        # Fixed PNG settings and no metadata: the bytes depend on the pixels only.
        Image.fromarray(pixels).save(tmp / image_path(split, int(labels[src]), i), format="PNG",
                                     optimize=False, compress_level=6)


def _built_by_an_older_renderer(manifest: dict | None) -> bool:
    """Whether `manifest` marks a complete demo build by an older renderer, which is replaced
    even without `overwrite`: it is derived data, redrawn from what scikit-learn ships at no
    loss, and the demo cannot use it (its images are not what the settings now render), while
    the demo command has no overwrite switch. A build by a newer renderer is refused like any
    build with other settings."""
    return (manifest is not None and manifest.get("format") == FORMAT
            and manifest.get("settings", {}).get("renderer_version", 0) < RENDERER_VERSION)


def build_demo_data(root: str | Path, train_size: int = 5000, test_size: int = 1000, difficulty: float = 0.5,
                    seed: int = 0, overwrite: bool = False) -> dict:
    """Render the demo set into `root` once; return its manifest.

    A build with the same settings is reused as is (its groups files written from the manifest
    where missing), one by an older renderer is replaced, any other build (or a folder that is
    not a demo build) is refused with one line unless `overwrite`. The images are written to a
    temporary folder and moved into place, then the groups files; the manifest, written last,
    marks completion.
    """
    if not 0.0 <= difficulty <= 1.0:
        raise DemoDataError(f"demo difficulty must be within 0..1, got {difficulty}")
    if train_size < 1 or test_size < 1:
        raise DemoDataError(f"demo sizes must be positive, got train_size={train_size}, test_size={test_size}")
    root = Path(root)
    settings = DemoSettings(int(train_size), int(test_size), float(difficulty), int(seed))
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("settings") == asdict(settings) and not overwrite:
        group_files(root)
        return manifest
    check_replaceable(root, manifest, settings, overwrite)

    glyphs, labels, photos = load_ingredients()
    sources = split_sources(labels, settings.seed, settings.test_fraction)
    sizes = {"train": settings.train_size, "test": settings.test_size}
    assigned = {s: assign_sources(sources[s], sizes[s], settings.seed, SPLITS.index(s)) for s in SPLITS}

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted build: ours, never complete
    for s in SPLITS:
        _write_split(tmp, settings, s, sources[s], assigned[s], labels, glyphs, photos)

    (root / MANIFEST).unlink(missing_ok=True)
    for s in SPLITS:
        (root / GROUPS_FILES[s]).unlink(missing_ok=True)
        shutil.rmtree(root / s, ignore_errors=True)
        (tmp / s).rename(root / s)
    tmp.rmdir()
    manifest = demo_manifest(settings, sources, assigned, labels)
    write_group_files(root, manifest)
    with (root / (MANIFEST + ".tmp")).open("w") as f:
        json.dump(manifest, f)
    (root / (MANIFEST + ".tmp")).rename(root / MANIFEST)
    return manifest


def check_replaceable(root: Path, manifest: Optional[dict], settings: DemoSettings, overwrite: bool) -> None:
    """A build may replace what `root` holds only if it holds nothing of a split, an older
    renderer's build, or `overwrite` says so: the build deletes the splits it replaces."""
    occupied = manifest is not None or any((root / s).exists() for s in SPLITS)
    if not occupied or overwrite or _built_by_an_older_renderer(manifest):
        return
    if manifest is not None:
        raise DemoDataError(f"{root}: demo data built with other settings ({manifest.get('settings')}); "
                            f"pass overwrite to rebuild with {asdict(settings)}")
    raise DemoDataError(f"{root}: holds train/ or test/ but no {MANIFEST} (not a complete demo build); "
                        f"pass overwrite to replace it")


def demo_manifest(settings: DemoSettings, sources: dict, assigned: dict, labels: np.ndarray) -> dict:
    """The build's record: settings, classes, per split its counts and source digits, and per image
    (by index within its split) the source digit rendered and its label."""
    return {
        "format": FORMAT,
        "settings": asdict(settings),
        "classes": [str(c) for c in range(NUM_CLASSES)],
        "counts": {s: {"images": len(assigned[s]), "source_digits": int(len(sources[s])),
                       "per_class": np.bincount(labels[assigned[s]], minlength=NUM_CLASSES).tolist()}
                   for s in SPLITS},
        "source_digits": {s: sources[s].tolist() for s in SPLITS},
        "images": {s: {"source": assigned[s].tolist(), "label": labels[assigned[s]].tolist()} for s in SPLITS},
    }
