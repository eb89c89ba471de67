"""What a vision reader is (`readers.py` is the registry that picks one): `ReadImages`, what every reader returns;
`VisionReader`, the class a family subclasses; `ViTReader`, the plain-ViT fallback; `crops_as_keys` for images cut
into crops or tiles; `register_reader`, how a reader joins the registry (docs/ARCHITECTURE.md §6.1)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import VisionShape, vision_shape_of


@dataclass(frozen=True)
class ReadImages:
    """What a reader returns for a batch of images.

    states: one tensor per chosen encoder layer, each (images, tokens, width); grids: the patch grid (rows,
    columns) shared by every image (one entry, tokens in front of it allowed: CLS, registers) or, with
    `patch_mask`, one grid per image whose patches come first in row-major order; patch_mask: (images, tokens)
    True where a token is real, or None when every token is; poolable: whether `tokens_per_level` may pool them.
    """

    states: list[torch.Tensor]
    grids: list[tuple[int, int]]
    patch_mask: torch.Tensor | None = None
    poolable: bool = True  # False: the tokens lie on no single grid (several crops of an image); not pooled


class VisionReader:
    """How HIVE reads one encoder family. Subclasses override what differs; see the module docstring."""

    name: ClassVar[str] = "base"
    input_names: ClassVar[tuple[str, ...]] = ()  # the tower's inputs beside pixel_values, routed away from the LM
    blank_value: ClassVar[float] = 0.0  # what an image left out (NaN or inf pixels) is filled with

    def __init__(self, tower: nn.Module, family_config: Any = None):
        self.tower = tower
        self.config = tower.config
        self.family_config = family_config  # the whole VLM's config (LLaVA-NeXT's grid pinpoints), or None
        self.shape = self.shape_of(tower.config)

    def required_input(self, inputs: dict[str, Any], name: str, meaning: str, *, owner: str | None = None) -> Any:
        """`inputs[name]`, an input the family's tower needs beside `pixel_values`; missing, a `ValueError` saying
        what it is (`meaning`) and that the family's image processor returns it. `owner`: who needs it (the
        tower's class by default)."""
        value = inputs.get(name)
        if value is None:
            owner = owner or type(self.tower).__name__
            raise ValueError(f"pixel_values of a {owner} come with {name} {meaning}")
        return value

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        """Is `tower` (inside a VLM of config `family_config`, None for a composed model) of this reader's family?"""
        raise NotImplementedError

    @classmethod
    def shape_of(cls, config: Any) -> VisionShape:
        return vision_shape_of(config)

    def num_images(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> int:
        """How many images `pixel_values` holds (the slots are laid out from this count)."""
        return pixel_values.shape[0]

    def image_of_row(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor | None:
        """(rows,) the image each row of `rows_of(pixel_values)` belongs to, or None when each row is one image."""
        return None

    def rows_of(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` as rows (a row per image, per crop or per patch), for the per-image NaN check."""
        return pixel_values

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        """Refuse inputs the encoder would crop or mis-read, naming the shape (never a silent wrong answer)."""

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        raise NotImplementedError

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def input_reference(self) -> torch.Tensor:
        return next(self.tower.parameters())


class ViTReader(VisionReader):
    """A ViT-style encoder (CLIP, SigLIP, DINOv2, ...): `(images, channels, H, W)` at one size per batch, or
    SigLIP2 NaFlex's patchified pixels `(images, patches, channels*p*p)` with `spatial_shapes` and
    `pixel_attention_mask` (a grid per image, padded patches at the end)."""

    name = "vit"
    input_names = ("pixel_attention_mask", "spatial_shapes")

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        return True

    def _naflex(self) -> bool:
        return "spatial_shapes" in inspect.signature(self.tower.forward).parameters

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        outputs = self.tower(pixel_values=pixel_values, output_hidden_states=True, **inputs)
        hidden_states = outputs.hidden_states  # embeddings, then the output of every encoder layer
        states = [hidden_states[index + 1] for index in layers]
        spatial_shapes = inputs.get("spatial_shapes")
        if spatial_shapes is None:
            patch = self.shape.patch_size
            return ReadImages(states, [(pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)])
        # NaFlex: a grid per image, padded patches at the end
        patch_mask = inputs.get("pixel_attention_mask")
        if patch_mask is None:
            patch_mask = torch.ones(states[0].shape[:2], dtype=torch.bool, device=states[0].device)
        return ReadImages(states, [tuple(shape) for shape in spatial_shapes.tolist()], patch_mask)

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        shape = self.shape
        channels = getattr(self.config, "num_channels", 3)
        if "spatial_shapes" in inputs:  # patchified input: (images, patches, channels*patch*patch)
            if pixel_values.ndim != 3 or pixel_values.shape[-1] != channels * shape.patch_size**2:
                raise ValueError(
                    f"pixel_values of shape {tuple(pixel_values.shape)}: this encoder takes patchified pixels of shape "
                    f"(images, patches, {channels * shape.patch_size**2})"
                )
            return
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, {channels}, height, width); "
                "stack the images of a batch along the first dimension"
            )
        height, width = pixel_values.shape[-2:]
        native = height == width == shape.image_size  # e.g. SigLIP-so400m/14@384: 27x27 patches by design
        if not native and (height % shape.patch_size or width % shape.patch_size):
            raise ValueError(
                f"pixel_values of size {height}x{width}: not a multiple of the encoder's patch size "
                f"{shape.patch_size} (the encoder expects {shape.image_size}x{shape.image_size}); resize the images"
            )

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        shape, channels = self.shape, getattr(self.config, "num_channels", 3)
        if self._naflex():
            side = max(1, math.isqrt(getattr(self.config, "num_patches", 16)))
            return {
                "pixel_values": torch.zeros(1, side * side, channels * shape.patch_size**2, device=device),
                "pixel_attention_mask": torch.ones(1, side * side, dtype=torch.long, device=device),
                "spatial_shapes": torch.tensor([[side, side]], device=device),
            }
        return {"pixel_values": torch.zeros(1, channels, shape.image_size, shape.image_size, device=device)}


def crops_as_keys(states: list[torch.Tensor], crops_per_image: list[int], grid: tuple[int, int]) -> ReadImages:
    """Images cut into crops (LLaVA-NeXT's anyres, InternVL's tiles): each image's crops' patch tokens side by side
    as its keys. states: per layer (crops, tokens, width), crops in image order, tokens in front of a crop's patch
    grid (CLS) dropped here. One crop per image is one grid (pooled as any ViT's); several are not pooled."""
    from .levels import prefix_length

    states = [level[:, prefix_length(level.shape[1], grid) :] for level in states]  # each (crops, patches, width)
    if max(crops_per_image) == 1:
        return ReadImages(states, [grid])
    patches = grid[0] * grid[1]
    longest = max(crops_per_image) * patches
    laid_out = [
        torch.stack(
            [
                F.pad(image.flatten(0, 1), (0, 0, 0, longest - image.shape[0] * patches))
                for image in level.split(crops_per_image)
            ]
        )
        for level in states
    ]  # each (images, longest, width): an image's crops side by side, zero-padded
    lengths = torch.tensor(crops_per_image, device=laid_out[0].device) * patches
    mask = torch.arange(longest, device=lengths.device) < lengths[:, None]  # (images, longest)
    return ReadImages(laid_out, [], mask, poolable=False)


# Newest first; ViTReader, the fallback, is never in this list.
_READERS: list[type[VisionReader]] = []


def register_reader(reader: type[VisionReader]) -> type[VisionReader]:
    """Make `reader` the first one tried (a class decorator). Its `name` must be new."""
    if not (isinstance(reader, type) and issubclass(reader, VisionReader)):
        raise TypeError(f"register_reader takes a VisionReader subclass, got {reader!r}")
    if reader.name in {known.name for known in (*_READERS, ViTReader)}:
        raise ValueError(f"a vision reader named {reader.name!r} is already registered")
    _READERS.insert(0, reader)
    return reader
