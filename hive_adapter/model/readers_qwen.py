"""The reader of Qwen2-VL, Qwen2.5-VL and Qwen3-VL's vision encoders: packed native-resolution patches.

Their image processor packs the patches of every image of a batch into one tensor `(patches, channels *
temporal_patch_size * patch_size**2)` and says each image's grid in `image_grid_thw` `(images, 3)`: frames,
rows, columns of patches. Inside one image the patches come block-major: each `m x m` block of neighbours
(`m = spatial_merge_size`, 2) is contiguous, because the encoder's merger concatenates such a block into one
language-model token. Qwen2.5-VL also permutes the blocks into attention windows before its first layer and
only puts them back after its merger, so its per-layer hidden states come in window order.

This reader runs the encoder once with `output_hidden_states`, undoes the window order with transformers' own
`get_vision_window_index` (Qwen2.5-VL), undoes the block-major order so each image is a row-major patch grid,
and hands HIVE one grid per image (padded to the longest, with a mask). The `m x m` merge is then where HIVE's
pooling puts it: `tokens_per_level` pools each image's grid on its rows and columns like any ViT's; the merger
itself (the family's own connector) is never run.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import VisionShape
from .reader_base import ReadImages, VisionReader, register_reader

GRID_INPUT = "image_grid_thw"


@register_reader
class QwenPackedPatchReader(VisionReader):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: `pixel_values` (patches, C*T*p*p) + `image_grid_thw` (images, 3)."""

    name = "qwen-packed-patches"
    input_names = (GRID_INPUT,)

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        parameters = inspect.signature(tower.forward).parameters
        return "grid_thw" in parameters and hasattr(getattr(tower, "config", None), "spatial_merge_size")

    @classmethod
    def shape_of(cls, config: Any) -> VisionShape:
        # Qwen2-VL's vision config calls the encoder width `embed_dim` (its `hidden_size` is the merger's output).
        width = getattr(config, "embed_dim", None) or config.hidden_size
        return VisionShape(num_layers=config.depth, hidden_size=width, patch_size=config.patch_size, image_size=0)

    @property
    def merge(self) -> int:
        return self.config.spatial_merge_size

    @property
    def patch_width(self) -> int:
        config = self.config
        return config.in_channels * config.temporal_patch_size * config.patch_size**2

    def _grid(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.required_input(
            inputs,
            GRID_INPUT,
            "(images, 3): the frames, rows and columns of patches of each image, as the family's image processor "
            "returns them; pass it too",
        )

    def num_images(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> int:
        return self._grid(inputs).shape[0]

    def image_of_row(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        grid = self._grid(inputs)
        images = torch.arange(grid.shape[0], device=pixel_values.device)
        return images.repeat_interleave(grid.prod(dim=-1).to(pixel_values.device))  # (patches,)

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        grid = self._grid(inputs)
        if pixel_values.ndim != 2 or pixel_values.shape[-1] != self.patch_width:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: a {type(self.tower).__name__} takes packed "
                f"patches of shape (patches, {self.patch_width}), as the family's image processor returns them"
            )
        if grid.ndim != 2 or grid.shape[-1] != 3:
            raise ValueError(f"{GRID_INPUT} of shape {tuple(grid.shape)}: expected (images, 3) frames, rows, columns")
        frames, rows, columns = grid.unbind(-1)
        if bool((frames != 1).any()):
            raise ValueError(
                f"{GRID_INPUT} frames {frames.tolist()}: HIVE reads images (one frame each); videos are not supported"
            )
        if bool((rows % self.merge).any() or (columns % self.merge).any()):
            raise ValueError(f"{GRID_INPUT} {grid.tolist()}: rows and columns must be multiples of {self.merge}")
        if int(grid.prod(dim=-1).sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} patches but {GRID_INPUT} {grid.tolist()} adds up to "
                f"{int(grid.prod(dim=-1).sum())}; pass the two together as the image processor returned them"
            )

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        grid = self._grid(inputs).to(pixel_values.device)
        outputs = self.tower(pixel_values, grid_thw=grid, output_hidden_states=True)
        hidden_states = outputs.hidden_states  # embeddings, then the output of every block, each (patches, width)
        order = self._block_order(grid, pixel_values.device)
        sizes = grid.prod(dim=-1).tolist()
        grids = [(int(rows), int(columns)) for _, rows, columns in grid.tolist()]
        states = []
        for index in layers:
            per_image = self._unpack(hidden_states[index + 1], order, sizes, grids)  # each (rows*columns, width)
            states.append(per_image)
        longest = max(sizes)
        if min(sizes) == longest and len(set(grids)) == 1:  # one grid for all: no mask
            return ReadImages([torch.stack(images) for images in states], [grids[0]])
        padded = [
            torch.stack([F.pad(image, (0, 0, 0, longest - image.shape[0])) for image in images]) for images in states
        ]
        lengths = torch.tensor(sizes, device=pixel_values.device)
        patch_mask = torch.arange(longest, device=pixel_values.device) < lengths[:, None]  # (images, longest)
        return ReadImages(padded, grids, patch_mask)

    def _block_order(self, grid: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Where each merge block of the input sits in the encoder's hidden states, for an encoder that permutes
        blocks into attention windows (Qwen2.5-VL); None for one that keeps the input order."""
        window_size = getattr(self.config, "window_size", None)
        if window_size is None or not hasattr(self.config, "fullatt_block_indexes"):
            return None
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=self.merge, window_size=window_size, patch_size=self.config.patch_size
        )
        return torch.argsort(window_index.to(device))  # input block b is hidden-state block order[b]

    def _unpack(self, states: torch.Tensor, order: torch.Tensor | None, sizes: list[int], grids) -> list[torch.Tensor]:
        """(patches, width) in the encoder's order -> per image (rows*columns, width) in row-major grid order."""
        unit = self.merge**2
        if order is not None:
            width = states.shape[-1]
            states = states.reshape(-1, unit, width)[order].reshape(-1, width)  # window order undone
        images = []
        for image, (rows, columns) in zip(states.split(sizes), grids, strict=True):
            m = self.merge
            blocks = image.reshape(rows // m, columns // m, m, m, -1)  # (block rows, block columns, m, m, width)
            images.append(blocks.permute(0, 2, 1, 3, 4).reshape(rows * columns, -1))  # (rows*columns, width)
        return images

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        m = self.merge
        return {
            "pixel_values": torch.zeros(m * m, self.patch_width, device=device),
            GRID_INPUT: torch.tensor([[1, m, m]], device=device),
        }
