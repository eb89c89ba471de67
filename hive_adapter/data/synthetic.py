"""A synthetic captioning set drawn with PIL: shapes, colours, positions and textures.

Deterministic by (seed, index), so no file needs to exist: sample `i` is always the same picture and
caption. The content words of a caption (colour, texture, shape, position: `ATTRIBUTE_WORDS`) depend on
the image; the structural ones (a / in / the, the end of text) do not. Content-token accuracy with the
sample's own image against another sample's image (`hive_adapter.analysis.image_reading`) measures how
much the model reads from the picture. `attributes` chooses which content the captions name (easier
tasks for the same pictures). The shape doubles as a class label for linear probes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..utils.console import progress
from ..utils.outputs import staged_directory
from .datasets import llava_entry

COLOURS = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (38, 84, 214),
    "yellow": (232, 196, 30),
    "purple": (140, 60, 190),
    "orange": (240, 128, 30),
}
SHAPES = ("square", "circle", "triangle", "cross")
TEXTURES = ("solid", "striped", "dotted")
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
PROMPT = "describe the image ."
ATTRIBUTES = ("colour", "texture", "shape", "position")
# The caption words naming each attribute: content tokens. Every other caption word is structural.
ATTRIBUTE_WORDS = {
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "shape": SHAPES,
    "position": tuple(sorted({word for position in POSITIONS for word in position.split()})),
}


@dataclass(frozen=True)
class ShapeSample:
    colour: str
    shape: str
    texture: str
    position: str

    @property
    def caption(self) -> str:
        return self.caption_naming(ATTRIBUTES)

    def caption_naming(self, attributes: tuple[str, ...]) -> str:
        """The caption with only `attributes` named, e.g. ("colour", "position") -> "a red in the top left"."""
        words = ["a", *(getattr(self, name) for name in ("colour", "texture", "shape") if name in attributes)]
        if "position" in attributes:
            words += ["in", "the", self.position]
        return " ".join(words)

    @property
    def shape_label(self) -> int:
        return SHAPES.index(self.shape)


def checked_attributes(attributes: tuple[str, ...] | str) -> tuple[str, ...]:
    """`attributes` (or "colour,position") in caption order, or a ValueError naming the unknown ones."""
    if isinstance(attributes, str):
        attributes = tuple(name.strip() for name in attributes.split(",") if name.strip())
    if not attributes or set(attributes) - set(ATTRIBUTES):
        raise ValueError(f"attributes={tuple(attributes)}: choose one or more of {ATTRIBUTES}")
    return tuple(name for name in ATTRIBUTES if name in attributes)


def caption_vocabulary() -> list[str]:
    """Every word a synthetic prompt or caption can contain (for a word-level tokenizer)."""
    words = {"a", "in", "the", *PROMPT.split(), *COLOURS, *SHAPES, *TEXTURES}
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


class SyntheticShapes:
    """`len(dataset)` deterministic (image, caption) pairs; images are `image_size` square RGB."""

    def __init__(
        self, size: int = 2000, *, seed: int = 0, image_size: int = 64, attributes: tuple[str, ...] = ATTRIBUTES
    ):
        if size < 1:
            raise ValueError(f"size={size}: a synthetic set needs at least one sample")
        self.size = size
        self.seed = seed
        self.image_size = image_size
        self.attributes = checked_attributes(attributes)

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> ShapeSample:
        rng = random.Random(self.seed * 1_000_003 + index)
        return ShapeSample(
            colour=rng.choice(list(COLOURS)),
            shape=rng.choice(SHAPES),
            texture=rng.choice(TEXTURES),
            position=rng.choice(list(POSITIONS)),
        )

    def _layout(self, index: int) -> tuple[random.Random, int, float, float, float]:
        """The random stream of sample `index` and the geometry it draws first: background shade, centre, radius."""
        sample = self.sample(index)
        rng = random.Random((self.seed * 1_000_003 + index) * 7 + 1)
        side = self.image_size
        shade = rng.randint(225, 250)
        cx, cy = POSITIONS[sample.position]
        cx = (cx + rng.uniform(-0.06, 0.06)) * side
        cy = (cy + rng.uniform(-0.06, 0.06)) * side
        radius = side * rng.uniform(0.14, 0.2)
        return rng, shade, cx, cy, radius

    def object_mask(self, index: int) -> Image.Image:
        """Mode "L" mask of the shape in image `index` (255 on the object): where the caption's object is."""
        _, _, cx, cy, radius = self._layout(index)
        mask = Image.new("L", (self.image_size, self.image_size), 0)
        _draw_shape(ImageDraw.Draw(mask), self.sample(index).shape, cx, cy, radius)
        return mask

    def image(self, index: int) -> Image.Image:
        sample = self.sample(index)
        rng, shade, _, _, _ = self._layout(index)
        side = self.image_size
        image = Image.new("RGB", (side, side), (shade, shade, shade))
        pen = ImageDraw.Draw(image)
        mask = self.object_mask(index)
        fill = Image.new("RGB", (side, side), COLOURS[sample.colour])
        _apply_texture(ImageDraw.Draw(fill), sample.texture, side, (shade, shade, shade))
        image.paste(fill, (0, 0), mask)
        pen.point([(rng.randrange(side), rng.randrange(side)) for _ in range(side)], fill=(200, 200, 200))
        return image

    def texts(self) -> list[tuple[str, str]]:
        """(prompt, caption) of every sample, without drawing an image."""
        return [(PROMPT, self.sample(index).caption) for index in range(self.size)]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return {
            "image": self.image(index),
            "prompt": PROMPT,
            "caption": self.caption(index),
            "label": self.sample(index).shape_label,
            "source": f"synthetic sample {index} (seed {self.seed})",
        }

    def caption(self, index: int) -> str:
        """Sample `index`'s caption, naming this set's `attributes`."""
        return self.sample(index).caption_naming(self.attributes)

    # ------------------------------------------------------------------ writing to disk
    def write_llava_json(self, directory: str | Path, *, name: str = "synthetic.json") -> Path:
        """Images under `directory/images/` and LLaVA's pre-training JSON next to them. `directory` must be new,
        empty, or an earlier output of these writers (replaced whole)."""
        with staged_directory(directory, command="hive-synthetic", replace=True) as tmp:
            self._write_llava_json(tmp, name)
        return Path(directory) / name

    def _write_llava_json(self, directory: Path, name: str) -> None:
        (directory / "images").mkdir()
        records = []
        for index in progress(range(self.size), description="writing synthetic images"):
            file = f"{index:06d}.png"
            self.image(index).save(directory / "images" / file)
            records.append(llava_entry(f"synthetic-{index}", file, [f"<image>\n{PROMPT}", self.caption(index)]))
        (directory / name).write_text(json.dumps(records, indent=1))

    def write_image_folder(self, directory: str | Path) -> Path:
        """`directory/<shape>/<index>.png`, the layout linear probes read. `directory` must be new, empty, or an
        earlier output of these writers (replaced whole)."""
        with staged_directory(directory, command="hive-synthetic", replace=True) as tmp:
            for index in progress(range(self.size), description="writing image folder"):
                sample = self.sample(index)
                (tmp / sample.shape).mkdir(exist_ok=True)
                self.image(index).save(tmp / sample.shape / f"{index:06d}.png")
        return Path(directory)


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        pen.rectangle(box, fill=255)
    elif shape == "circle":
        pen.ellipse(box, fill=255)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    else:  # cross
        w = r / 2.5
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)


def _apply_texture(pen: ImageDraw.ImageDraw, texture: str, side: int, background: tuple[int, int, int]) -> None:
    step = max(4, side // 10)
    if texture == "striped":
        for x in range(0, side, step):
            pen.rectangle((x, 0, x + step // 2 - 1, side), fill=background)
    elif texture == "dotted":
        for x in range(step // 2, side, step):
            for y in range(step // 2, side, step):
                pen.ellipse((x - step / 4, y - step / 4, x + step / 4, y + step / 4), fill=background)
