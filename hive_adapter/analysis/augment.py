"""The linear probe's training augmentations (supplementary Table 4), in PIL so no torchvision is needed.

RandomResizedCrop (scale [0.4, 1.0], ratio [0.75, 1.33], bicubic), RandomHorizontalFlip (p = 0.5),
ColorJitter (brightness, contrast, saturation 0.2, hue 0, applied in random order). The crop is
resized to `size`; the encoder's own image processor then normalises it as at test time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class Table4Augment:
    size: tuple[int, int]  # (width, height) of the crop after resizing
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (0.75, 1.33)
    flip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """A random (left, top, right, bottom) with area in `scale` and aspect ratio in `ratio`
        (log-uniform), as torchvision samples it; the centred largest valid crop after 10 misses."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        image = image.convert("RGB")
        image = image.resize(self.size, Image.BICUBIC, box=self.crop_box(*image.size, rng))
        if rng.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        jitters = [
            (ImageEnhance.Brightness, self.brightness),
            (ImageEnhance.Contrast, self.contrast),
            (ImageEnhance.Color, self.saturation),
        ]
        rng.shuffle(jitters)
        for enhancer, strength in jitters:
            if strength > 0:
                image = enhancer(image).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
        return image
