"""Labelled image sets for the linear probe: an image folder, or one of two built-in offline sets.

- an image folder: `DIR/<class>/<image>` (png, jpg, jpeg, bmp, webp, gif); classes are the sorted
  sub-directory names, read lazily;
- `digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes), split
  80/20 stratified by a seed;
- `shapes`: the synthetic captioning set's shape labels (square, circle, triangle, cross); train and
  test are drawn with different seeds, so no picture is in both;
- `shades`: a fine-grained set no connector trains on: 18 classes, 6 near-identical shades of teal (14 RGB
  units apart) x 3 fill textures; the shape, size, position and background vary and are not the label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
BUILT_IN = ("digits", "shapes", "shades")
# 6 shades of teal, each 14 units from the next on every channel: fine-grained, unlike the captions' 6 colours
SHADES = tuple((20 + 14 * k, 120 + 14 * k, 140 + 14 * k) for k in range(6))


@dataclass
class LabelledImages:
    """`len(images)` labelled images; `load(i)` returns image i as RGB."""

    classes: list[str]
    labels: list[int]
    load: Callable[[int], Image.Image]
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def image_folder(directory: str | Path, classes: list[str] | None = None) -> LabelledImages:
    """`directory/<class>/<image>`; with `classes` (the training set's), the labels follow that order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (expected DIR/<class>/<image>)")
    found = sorted(path.name for path in directory.iterdir() if path.is_dir())
    if not found:
        raise ValueError(f"{directory}: no class sub-directories (expected DIR/<class>/<image>)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{directory}: classes {unknown} are not among the training classes {classes}")
    files, labels = [], []
    for name in found:
        images = sorted(p for p in (directory / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(
                f"{directory / name}: class {name!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files += images
        labels += [classes.index(name)] * len(images)

    def load(index: int) -> Image.Image:
        try:
            with Image.open(files[index]) as image:
                return image.convert("RGB")
        except OSError as error:
            raise ValueError(f"{files[index]}: cannot read this image ({error})") from error

    return LabelledImages(classes=list(classes), labels=labels, load=load, source=str(directory))


def _digits(seed: int, test_fraction: float) -> tuple[LabelledImages, LabelledImages]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # (n, 8, 8) values 0..16 -> uint8 grey, ink dark on white like a scan
    pixels = (255 - digits.images * (255 / 16)).round().astype(np.uint8)
    train_index, test_index = train_test_split(
        np.arange(len(pixels)), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    classes = [str(digit) for digit in range(10)]

    def split(indices) -> LabelledImages:
        indices = list(indices)
        return LabelledImages(
            classes=classes,
            labels=[int(digits.target[i]) for i in indices],
            load=lambda k: Image.fromarray(pixels[indices[k]], mode="L").resize((32, 32), Image.NEAREST).convert("RGB"),
            source="sklearn digits",
        )

    return split(train_index), split(test_index)


def _shapes(seed: int, size: int) -> tuple[LabelledImages, LabelledImages]:
    from ..data.synthetic import SHAPES, SyntheticShapes

    def split(dataset: SyntheticShapes) -> LabelledImages:
        return LabelledImages(
            classes=list(SHAPES),
            labels=[dataset.sample(i).shape_label for i in range(len(dataset))],
            load=dataset.image,
            source=f"synthetic shapes (seed {dataset.seed})",
        )

    train = SyntheticShapes(size, seed=1000 + seed)
    test = SyntheticShapes(max(1, size // 4), seed=2000 + seed)
    return split(train), split(test)


def _shades(seed: int, size: int) -> tuple[LabelledImages, LabelledImages]:
    import random

    from ..data.synthetic import SHAPES, TEXTURES, _apply_texture, _draw_shape

    classes = [f"shade{shade}-{texture}" for shade in range(len(SHADES)) for texture in TEXTURES]
    side = 64

    def draw(split_seed: int, index: int) -> tuple[int, Image.Image]:
        rng = random.Random(split_seed * 1_000_003 + index)
        label = rng.randrange(len(classes))
        shade, texture = SHADES[label // len(TEXTURES)], TEXTURES[label % len(TEXTURES)]
        background = rng.randint(225, 250)
        radius = side * rng.uniform(0.18, 0.3)
        cx, cy = rng.uniform(radius, side - radius), rng.uniform(radius, side - radius)
        image = Image.new("RGB", (side, side), (background,) * 3)
        mask = Image.new("L", (side, side), 0)
        _draw_shape(ImageDraw.Draw(mask), rng.choice(SHAPES), cx, cy, radius)
        fill = Image.new("RGB", (side, side), shade)
        _apply_texture(ImageDraw.Draw(fill), texture, side, (background,) * 3)
        image.paste(fill, (0, 0), mask)
        ImageDraw.Draw(image).point([(rng.randrange(side), rng.randrange(side)) for _ in range(side)], fill=(200,) * 3)
        return label, image

    def split(split_seed: int, count: int) -> LabelledImages:
        return LabelledImages(
            classes=classes,
            labels=[draw(split_seed, i)[0] for i in range(count)],
            load=lambda i: draw(split_seed, i)[1],
            source=f"synthetic shades (seed {split_seed})",
        )

    return split(3000 + seed, size), split(4000 + seed, max(1, size // 4))


def built_in(
    name: str, *, seed: int = 0, size: int = 2000, test_fraction: float = 0.2
) -> tuple[LabelledImages, LabelledImages]:
    """(train, test) of a built-in set; `size`: training images of `shapes` and `shades` (their test sets are a
    quarter)."""
    if name == "digits":
        return _digits(seed, test_fraction)
    if name == "shapes":
        return _shapes(seed, size)
    if name == "shades":
        return _shades(seed, size)
    raise ValueError(f"dataset={name!r}: built-in sets are {BUILT_IN}")
