"""The reader of LLaVA-NeXT and LLaVA-OneVision ("anyres"): each image as several crops of a ViT, `image_sizes`.

Their image processor picks, per image, the best of the model's `image_grid_pinpoints` for the image's size,
cuts the resized image into crops of the encoder's size, and puts a downscaled view of the whole image first:
`pixel_values` (images, most crops, 3, H, W), zero crops padding an image to the batch's largest count, and
`image_sizes` (images, 2) the original heights and widths. The number of real crops of an image follows from its
size and the pinpoints: transformers' own `image_size_to_num_patches` says it (LLaVA-OneVision takes a sample
with several images unsplit, one crop each, given `batch_num_images`).

The tower is a plain ViT (CLIP, SigLIP): it runs once on every real crop, with `output_hidden_states`. Every crop
of an image becomes keys of that image: the patch tokens of its crops side by side (tokens in front of a crop's
patch grid, CLS, dropped), with a mask where images have fewer crops than the batch's longest. Several crops lie
on no single grid, so they are not pooled (`ReadImages.poolable`); images of one crop each are one grid, pooled as
any ViT's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .reader_base import ReadImages, VisionReader, crops_as_keys, register_reader

SIZES_INPUT = "image_sizes"


@register_reader
class AnyresReader(VisionReader):
    """LLaVA-NeXT / LLaVA-OneVision: `pixel_values` (images, crops, 3, H, W) + `image_sizes` (images, 2)."""

    name = "llava-anyres"
    input_names = (SIZES_INPUT, "batch_num_images")

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        return getattr(family_config, "image_grid_pinpoints", None) is not None

    def crops_per_image(self, pixel_values: torch.Tensor | None, inputs: dict[str, Any]) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = self.required_input(
            inputs,
            SIZES_INPUT,
            "(images, 2), each image's height and width before cropping, as the family's image processor returns them",
            owner=f"{type(self.family_config).__name__} model",
        )
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else list(sizes)
        pinpoints = self.family_config.image_grid_pinpoints
        crops = [image_size_to_num_patches(list(size), pinpoints, self.shape.image_size) for size in sizes]
        batch_num_images = inputs.get("batch_num_images")
        if batch_num_images is not None:  # LLaVA-OneVision: a sample with several images keeps them unsplit
            counts = batch_num_images.tolist() if hasattr(batch_num_images, "tolist") else list(batch_num_images)
            unsplit = [count > 1 for count in counts for _ in range(count)]
            crops = [1 if single else crop for crop, single in zip(crops, unsplit, strict=True)]
        return crops

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        channels = getattr(self.config, "num_channels", 3)
        size = self.shape.image_size
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: a {type(self.family_config).__name__} model takes "
                f"(images, crops, {channels}, {size}, {size}) with {SIZES_INPUT}, as its image processor returns them"
            )
        crops = self.crops_per_image(pixel_values, inputs)
        if len(crops) != pixel_values.shape[0] or max(crops) > pixel_values.shape[1]:
            raise ValueError(
                f"{SIZES_INPUT} make {crops} crops per image, pixel_values holds {pixel_values.shape[0]} images of "
                f"{pixel_values.shape[1]} crops; pass the two together as the image processor returned them"
            )

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        crops = self.crops_per_image(pixel_values, inputs)
        real = torch.cat([image[:count] for image, count in zip(pixel_values, crops, strict=True)])  # (crops, 3, H, W)
        outputs = self.tower(pixel_values=real, output_hidden_states=True)
        grid = (self.shape.image_size // self.shape.patch_size,) * 2
        return crops_as_keys([outputs.hidden_states[index + 1] for index in layers], crops, grid)

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        size, channels = self.shape.image_size, getattr(self.config, "num_channels", 3)
        sizes = torch.tensor([[size, size]], device=device)
        (crops,) = self.crops_per_image(None, {SIZES_INPUT: sizes})  # the whole image and its crop(s)
        return {"pixel_values": torch.zeros(1, crops, channels, size, size, device=device), SIZES_INPUT: sizes}
