"""The reader of Pixtral's vision encoder (Mistral 3, Pixtral): images of their own sizes, one packed sequence.

Their image processor keeps each image near its own size (a multiple of the patch size) and pads the batch to
the largest: `pixel_values` (images, 3, H, W) and `image_sizes` (images, 2), each image's real height and width.
The encoder cuts each image's real patches out, runs them as one sequence with a block-diagonal attention mask,
and returns (1, all images' patches, width): image after image, each row-major on its own grid.

This reader runs the encoder once with `output_hidden_states`, splits the sequence back into images and gives
HIVE one grid per image (padded to the longest, with a mask), pooled on each image's own grid.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .reader_base import ReadImages, VisionReader, register_reader

SIZES_INPUT = "image_sizes"


@register_reader
class VariableSizeReader(VisionReader):
    """Pixtral: `pixel_values` (images, 3, H, W) padded + `image_sizes` (images, 2)."""

    name = "pixtral-variable-sizes"
    input_names = (SIZES_INPUT,)

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        return SIZES_INPUT in inspect.signature(tower.forward).parameters

    def _sizes(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> list[tuple[int, int]]:
        sizes = inputs.get(SIZES_INPUT)
        if sizes is None:  # every image fills the batch's size
            return [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else list(sizes)
        return [(int(height), int(width)) for height, width in sizes]

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        channels = getattr(self.config, "num_channels", 3)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: a {type(self.tower).__name__} takes (images, "
                f"{channels}, height, width), padded to the largest image, with {SIZES_INPUT} (images, 2)"
            )
        sizes = self._sizes(pixel_values, inputs)
        height, width = pixel_values.shape[-2:]
        patch = self.shape.patch_size
        if len(sizes) != pixel_values.shape[0] or any(
            h > height or w > width or h < patch or w < patch for h, w in sizes
        ):
            raise ValueError(
                f"{SIZES_INPUT}={sizes} for pixel_values of shape {tuple(pixel_values.shape)}: one (height, width) per "
                f"image, at least one patch ({patch}) and at most the padded size"
            )

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        sizes = self._sizes(pixel_values, inputs)
        patch = self.shape.patch_size
        grids = [(height // patch, width // patch) for height, width in sizes]
        image_sizes = torch.tensor(sizes, device=pixel_values.device)
        outputs = self.tower(pixel_values, image_sizes=image_sizes, output_hidden_states=True)
        lengths = [rows * columns for rows, columns in grids]
        longest = max(lengths)
        states = []
        for index in layers:
            images = outputs.hidden_states[index + 1][0].split(lengths)  # each (rows*columns, width), row-major
            states.append(torch.stack([F.pad(image, (0, 0, 0, longest - image.shape[0])) for image in images]))
        if len(set(grids)) == 1:
            return ReadImages(states, [grids[0]])
        real = (
            torch.arange(longest, device=pixel_values.device)
            < torch.tensor(lengths, device=pixel_values.device)[:, None]
        )
        return ReadImages(states, grids, real)

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        side, channels = 2 * self.shape.patch_size, getattr(self.config, "num_channels", 3)
        return {
            "pixel_values": torch.zeros(1, channels, side, side, device=device),
            SIZES_INPUT: torch.tensor([[side, side]], device=device),
        }
