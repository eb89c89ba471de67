"""The reader of Idefics3 / SmolVLM's vision encoder: crops of images, padded, with a pixel mask.

Their image processor returns `pixel_values` (samples, crops, channels, H, W) and `pixel_attention_mask`
(samples, crops, H, W): a sample's crops in order, all-zero crops padding a sample to the batch's largest count
(the family's own convention), padded pixels at the bottom and right of a smaller crop. With image splitting an
image is `rows x cols` crops plus a downscaled global view; the processor says each image's `rows` and `cols`
when asked (`return_row_col_info=True`). Every crop of an image becomes keys of that image: without `rows` and
`cols` each crop is taken to be one image (`do_image_splitting=False`).

The encoder runs once on the real crops with its own `patch_attention_mask` and `output_hidden_states`. Crops
without padded patches and one crop per image lie on one patch grid, which HIVE's `tokens_per_level` pools like
any ViT's; several crops per image, or padded patches, are keys with a mask and are not pooled
(`ReadImages.poolable`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .reader_base import ReadImages, VisionReader, register_reader


def crops_of_images(rows: Any, cols: Any) -> list[int]:
    """Crops per image from the image processor's per-sample `rows` and `cols` lists: rows*cols + 1 (the global
    view) for a split image, 1 for an image that was not split."""
    flat_rows = [r for sample in rows for r in (sample if isinstance(sample, (list, tuple)) else [sample])]
    flat_cols = [c for sample in cols for c in (sample if isinstance(sample, (list, tuple)) else [sample])]
    if len(flat_rows) != len(flat_cols):
        raise ValueError(f"rows {rows} and cols {cols} list different numbers of images")
    return [int(r) * int(c) + 1 if int(r) * int(c) > 0 else 1 for r, c in zip(flat_rows, flat_cols, strict=True)]


@register_reader
class CropsReader(VisionReader):
    """Idefics3 / SmolVLM: `pixel_values` (samples, crops, 3, H, W) + `pixel_attention_mask` (samples, crops, H, W)."""

    name = "idefics3-crops"
    input_names = ("pixel_attention_mask", "rows", "cols")
    blank_value = 1.0  # an all-zero crop is the family's padding: a left-out crop must not look like one

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        return "patch_attention_mask" in inspect.signature(tower.forward).parameters

    def _real_crops(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(samples*crops,) True for a crop that is not all zeros (the family's padding crops are)."""
        return pixel_values.flatten(2).ne(0).any(dim=-1).flatten()

    def _crops_per_image(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> list[int]:
        real = int(self._real_crops(pixel_values).sum())
        if inputs.get("rows") is None or inputs.get("cols") is None:
            return [1] * real
        crops = crops_of_images(inputs["rows"], inputs["cols"])
        if sum(crops) != real:
            raise ValueError(
                f"rows {inputs['rows']} and cols {inputs['cols']} make {sum(crops)} crops, pixel_values holds {real} "
                "real (not all-zero) crops; pass the rows and cols the image processor returned with these pixels"
            )
        return crops

    def num_images(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> int:
        return len(self._crops_per_image(pixel_values, inputs))

    def image_of_row(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """Rows are crops (samples*crops of them); padding crops count for no image (they are all zeros)."""
        crops = self._crops_per_image(pixel_values, inputs)
        of_real = torch.arange(len(crops), device=pixel_values.device).repeat_interleave(
            torch.tensor(crops, device=pixel_values.device)
        )
        image = torch.zeros(pixel_values.shape[0] * pixel_values.shape[1], dtype=torch.long, device=of_real.device)
        image[self._real_crops(pixel_values)] = of_real
        return image

    def rows_of(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.flatten(0, 1)  # (samples*crops, 3, H, W): a row per crop

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        channels = getattr(self.config, "num_channels", 3)
        if pixel_values.ndim != 5 or pixel_values.shape[2] != channels:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: a {type(self.tower).__name__} takes (samples, "
                f"crops, {channels}, height, width) as the family's image processor returns them"
            )
        patch = self.shape.patch_size
        if pixel_values.shape[-1] % patch or pixel_values.shape[-2] % patch:
            raise ValueError(
                f"crops of {tuple(pixel_values.shape[-2:])} pixels: not a multiple of the patch size {patch}"
            )
        mask = inputs.get("pixel_attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(pixel_values.shape[:2]) + tuple(pixel_values.shape[-2:]):
            raise ValueError(
                f"pixel_attention_mask of shape {tuple(mask.shape)} for pixel_values of shape "
                f"{tuple(pixel_values.shape)}: expected (samples, crops, height, width)"
            )
        self._crops_per_image(pixel_values, inputs)

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        real = self._real_crops(pixel_values)
        crops = pixel_values.flatten(0, 1)[real]  # (real crops, 3, H, W)
        patch = self.shape.patch_size
        pixel_mask = inputs.get("pixel_attention_mask")
        if pixel_mask is None:
            patch_mask = torch.ones(
                crops.shape[0], crops.shape[-2] // patch, crops.shape[-1] // patch, dtype=torch.bool
            )
            patch_mask = patch_mask.to(crops.device)
        else:
            pixel_mask = pixel_mask.flatten(0, 1)[real].to(crops.device)  # (real crops, H, W)
            blocks = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch)  # (crops, H/p, W/p, p, p)
            patch_mask = blocks.flatten(-2).any(dim=-1)  # (crops, H/p, W/p): a patch with a real pixel is real
        outputs = self.tower(pixel_values=crops, patch_attention_mask=patch_mask, output_hidden_states=True)
        states = [outputs.hidden_states[index + 1] for index in layers]  # each (real crops, patches, width)
        grid = tuple(patch_mask.shape[1:])
        per_image = self._crops_per_image(pixel_values, inputs)
        flat_mask = patch_mask.flatten(1)  # (real crops, patches)
        if max(per_image) == 1 and bool(flat_mask.all()):
            return ReadImages(states, [grid])  # one unpadded crop per image: one patch grid, poolable
        return self._per_image(states, flat_mask, per_image)

    @staticmethod
    def _per_image(states: list[torch.Tensor], mask: torch.Tensor, per_image: list[int]) -> ReadImages:
        """Each image's crops side by side as its keys, (images, most crops*patches, width), and the mask."""
        longest = max(per_image) * mask.shape[1]
        masks = [F.pad(m.flatten(), (0, longest - m.numel())) for m in mask.split(per_image)]
        laid_out = [
            torch.stack(
                [F.pad(s.flatten(0, 1), (0, 0, 0, longest - s.shape[0] * s.shape[1])) for s in level.split(per_image)]
            )
            for level in states
        ]  # each (images, longest, width)
        return ReadImages(laid_out, [], torch.stack(masks), poolable=False)

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        size, channels = self.shape.image_size, getattr(self.config, "num_channels", 3)
        return {"pixel_values": torch.ones(1, 1, channels, size, size, device=device)}  # not all zero: a real crop
