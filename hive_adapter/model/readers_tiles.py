"""The reader of InternVL's vision encoder (InternViT): an image cut into tiles, the tiles of every image in one batch.

InternVL's image processor (GOT-OCR2's) cuts each image into up to `max_patches` tiles of the encoder's size plus a
thumbnail, and returns them all in one tensor `pixel_values` (tiles, 3, H, W) with `num_patches` (images,): how
many tiles each image has, in order. Without `num_patches` each tile is taken to be one image.

The encoder runs once on every tile with `output_hidden_states`; every tile of an image becomes keys of that
image (`crops_as_keys`: patch tokens side by side, CLS dropped, masked, not pooled when an image has several).
The family's own pixel-shuffle downsampling belongs to its connector and is not run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import VisionShape
from .reader_base import ReadImages, VisionReader, crops_as_keys, register_reader

TILES_INPUT = "num_patches"


def _first(value: Any) -> int:
    """`patch_size` / `image_size` given as one number or as (height, width) of a square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{value}: HIVE reads square patches and tiles only")
        return int(value[0])
    return int(value)


@register_reader
class TilesReader(VisionReader):
    """InternVL: `pixel_values` (tiles, 3, H, W) + `num_patches` (images,) tiles per image."""

    name = "internvl-tiles"
    input_names = (TILES_INPUT,)

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        if getattr(family_config, "downsample_ratio", None) is not None:  # InternVL's pixel-shuffle connector
            return True
        # InternViT alone (a composed model): a ViT that gives its patch size as (height, width)
        return isinstance(getattr(tower.config, "patch_size", None), (list, tuple))

    @classmethod
    def shape_of(cls, config: Any) -> VisionShape:
        return VisionShape(
            config.num_hidden_layers, config.hidden_size, _first(config.patch_size), _first(config.image_size)
        )

    def tiles_per_image(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> list[int]:
        tiles = inputs.get(TILES_INPUT)
        if tiles is None:
            return [1] * pixel_values.shape[0]
        tiles = [int(count) for count in (tiles.tolist() if hasattr(tiles, "tolist") else tiles)]
        if sum(tiles) != pixel_values.shape[0] or min(tiles) < 1:
            raise ValueError(
                f"{TILES_INPUT}={tiles} adds up to {sum(tiles)} tiles, pixel_values holds {pixel_values.shape[0]}; "
                "pass the two together as the image processor returned them"
            )
        return tiles

    def num_images(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> int:
        return len(self.tiles_per_image(pixel_values, inputs))

    def image_of_row(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        tiles = torch.tensor(self.tiles_per_image(pixel_values, inputs), device=pixel_values.device)
        return torch.arange(len(tiles), device=pixel_values.device).repeat_interleave(tiles)  # (tiles,)

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        channels, size = getattr(self.config, "num_channels", 3), self.shape.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: InternViT takes tiles of shape (tiles, {channels}, "
                f"{size}, {size}) with {TILES_INPUT}, as the family's image processor returns them"
            )
        self.tiles_per_image(pixel_values, inputs)

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        outputs = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        grid = (self.shape.image_size // self.shape.patch_size,) * 2
        states = [outputs.hidden_states[index + 1] for index in layers]  # each (tiles, tokens, width)
        return crops_as_keys(states, self.tiles_per_image(pixel_values, inputs), grid)

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        channels, size = getattr(self.config, "num_channels", 3), self.shape.image_size
        return {"pixel_values": torch.zeros(1, channels, size, size, device=device)}
