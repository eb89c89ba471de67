"""The vision side, the same for every front end: check the pixels, run the tower once, take the chosen
levels on their patch grid, project them (paper §3: a subset of encoder layers, shallow to deep).

`HiveVisionSide` is a plain object (not a module) holding references to a vision tower and a level encoder
registered elsewhere: `HiveModel` / `HiveForConditionalGeneration` keep the tower where the base model has
it, the LLaVA integration keeps it inside LLaVA's `CLIPVisionTower`.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from torch import nn

from .architectures import VisionShape
from .context import HiveVisionContext
from .layout import ImageSlots, no_images
from .levels import HiveLevelEncoder

logger = logging.getLogger(__name__)

# Extra vision inputs some encoders take next to pixel_values (SigLIP2 NaFlex); routed to the tower.
VISION_INPUT_NAMES = ("pixel_attention_mask", "spatial_shapes")


class HiveVisionSide:
    """A vision tower (HF model), its shape, the levels HIVE reads and the modules that project them."""

    def __init__(
        self, *, tower: nn.Module, shape: VisionShape, vision_layers: tuple[int, ...], levels: HiveLevelEncoder
    ):
        self.tower = tower
        self.shape = shape
        self.vision_layers = vision_layers
        self.levels = levels

    def encode(
        self, pixel_values: torch.Tensor, **vision_inputs: Any
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Run the tower once; return the projected levels, each (images, n, media width), and the (images, n)
        mask of real tokens (None when every token is real)."""
        self.check_pixel_values(pixel_values, vision_inputs)
        reference = next(self.tower.parameters())
        pixel_values = pixel_values.to(device=reference.device, dtype=reference.dtype)
        outputs = self.tower(pixel_values=pixel_values, output_hidden_states=True, **vision_inputs)
        hidden_states = outputs.hidden_states  # embeddings, then the output of every encoder layer
        states = [hidden_states[index + 1] for index in self.vision_layers]
        spatial_shapes = vision_inputs.get("spatial_shapes")
        if spatial_shapes is not None:  # NaFlex: a grid per image, padded patches at the end
            grids = [tuple(shape) for shape in spatial_shapes.tolist()]
            patch_mask = vision_inputs.get("pixel_attention_mask")
            if patch_mask is None:
                patch_mask = torch.ones(states[0].shape[:2], dtype=torch.bool, device=states[0].device)
        else:
            patch = self.shape.patch_size
            grids = [(pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)]
            patch_mask = None
        return self.levels(states, grids=grids, patch_mask=patch_mask)

    def check_pixel_values(self, pixel_values: torch.Tensor, vision_inputs: dict[str, Any]) -> None:
        """Refuse pixels the encoder would crop or mis-read, naming the shape (never a silent wrong answer)."""
        shape = self.shape
        channels = getattr(self.tower.config, "num_channels", 3)
        if "spatial_shapes" in vision_inputs:  # patchified input: (images, patches, channels*patch*patch)
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
        """One blank image in the tower's input format, for batches without images.

        Every HIVE module must run on every rank, even when a rank's batch has no image, or ZeRO-3 and FSDP
        wait forever for the skipped parameters (docs/ARCHITECTURE.md §7.1). Nobody sees the dummy.
        """
        shape, channels = self.shape, getattr(self.tower.config, "num_channels", 3)
        if "spatial_shapes" in inspect.signature(self.tower.forward).parameters:  # NaFlex-style encoders
            side = max(1, math.isqrt(getattr(self.tower.config, "num_patches", 16)))
            return {
                "pixel_values": torch.zeros(1, side * side, channels * shape.patch_size**2, device=device),
                "pixel_attention_mask": torch.ones(1, side * side, dtype=torch.long, device=device),
                "spatial_shapes": torch.tensor([[side, side]], device=device),
            }
        return {"pixel_values": torch.zeros(1, channels, shape.image_size, shape.image_size, device=device)}


def usable_images(pixel_values: torch.Tensor, *, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixel_values, usable): images holding NaN or inf stop a training step with an error (their gradients
    would be NaN everywhere); otherwise they are zeroed and `usable` (images,) marks them, so that the text
    after their markers sees no image and nothing else in the batch changes. `usable` is None when all are."""
    if pixel_values.device.type == "meta" or not pixel_values.is_floating_point():
        return pixel_values, None
    usable = torch.isfinite(pixel_values.flatten(1)).all(dim=1)  # (images,)
    if bool(usable.all()):
        return pixel_values, None
    bad = (~usable).nonzero().flatten().tolist()
    message = (
        f"pixel_values of image(s) {bad} (of {len(usable)} in the batch) hold NaN or inf; check those images and "
        "the image processor (a std of 0 divides by zero)"
    )
    if training and torch.is_grad_enabled():
        raise ValueError(f"{message}. Training stops here: one such image makes every gradient NaN.")
    logger.warning("%s; they are left out: the text after their markers sees no image", message)
    keep = usable.view(-1, *([1] * (pixel_values.ndim - 1)))  # (images, 1, ...) against (images, ...)
    return torch.where(keep, pixel_values, pixel_values.new_zeros(())), usable


def build_vision_context(
    vision: HiveVisionSide,
    pixel_values: torch.Tensor | None,
    vision_inputs: dict[str, Any],
    *,
    slots: ImageSlots | None,
    batch_size: int,
    prompt_length: int,
    device: torch.device,
    media_attention: str,
    training: bool,
) -> HiveVisionContext:
    """The vision context of one batch of prompts, for every front end: run the tower once, project the levels
    and lay the images out per sample (`slots`, from the front end's markers: which sample sees which of the
    `pixel_values.shape[0]` images, from which column). Without images (`pixel_values` None, `slots` ignored) one
    blank image runs through every module and nobody sees it; images holding NaN or inf are seen by nobody
    (`usable_images`)."""
    if pixel_values is None:
        dummy = vision.dummy_inputs(device)
        levels, token_mask = vision.encode(**dummy)
        slots = no_images(batch_size, device)
    else:
        pixel_values, usable = usable_images(pixel_values, training=training)
        levels, token_mask = vision.encode(pixel_values, **vision_inputs)
        if slots is None:
            raise ValueError("images were given without their slots (which sample sees which image)")
        slots = slots.without(usable)
    return HiveVisionContext.from_images(
        levels, token_mask, slots, prompt_length=prompt_length, media_attention=media_attention
    )
