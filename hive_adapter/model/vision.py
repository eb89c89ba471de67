"""The vision side, the same for every front end: check the pixels, run the tower once, take the chosen
levels on their patch grid, project them (paper §3: a subset of encoder layers, shallow to deep).

`HiveVisionSide` is a plain object (not a module) holding references to a vision tower and a level encoder
registered elsewhere: `HiveModel` / `HiveForConditionalGeneration` keep the tower where the base model has
it, the LLaVA integration keeps it inside LLaVA's `CLIPVisionTower`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .architectures import VisionShape
from .context import HiveVisionContext
from .layout import ImageSlots, no_images
from .levels import HiveLevelEncoder
from .readers import VisionReader, reader_for

logger = logging.getLogger(__name__)


class HiveVisionSide:
    """A vision tower (HF model), its reader, its shape, the levels HIVE reads and the modules that project them."""

    def __init__(
        self,
        *,
        tower: nn.Module,
        shape: VisionShape,
        vision_layers: tuple[int, ...],
        levels: HiveLevelEncoder,
        reader: VisionReader | None = None,
        family_config: Any = None,
    ):
        self.tower = tower
        self.shape = shape
        self.vision_layers = vision_layers
        self.levels = levels
        self.reader = reader if reader is not None else reader_for(tower, family_config)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The inputs beside pixel_values this tower takes (`image_grid_thw`, `pixel_attention_mask`, ...)."""
        return self.reader.input_names

    def num_images(self, pixel_values: torch.Tensor, vision_inputs: dict[str, Any]) -> int:
        return self.reader.num_images(pixel_values, vision_inputs)

    def encode(
        self, pixel_values: torch.Tensor, **vision_inputs: Any
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Run the tower once; return the projected levels, each (images, n, media width), and the (images, n)
        mask of real tokens (None when every token is real)."""
        self.check_pixel_values(pixel_values, vision_inputs)
        reference = self.reader.input_reference()
        pixel_values = pixel_values.to(device=reference.device, dtype=reference.dtype)
        read = self.reader.read(pixel_values, vision_inputs, self.vision_layers)
        return self.levels(read.states, grids=read.grids, patch_mask=read.patch_mask, poolable=read.poolable)

    def check_pixel_values(self, pixel_values: torch.Tensor, vision_inputs: dict[str, Any]) -> None:
        """Refuse pixels the encoder would crop or mis-read, naming the shape (never a silent wrong answer)."""
        self.reader.check(pixel_values, vision_inputs)

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """One blank image in the tower's input format, for batches without images.

        Every HIVE module must run on every rank, even when a rank's batch has no image, or ZeRO-3 and FSDP
        wait forever for the skipped parameters (docs/ARCHITECTURE.md §7.1). Nobody sees the dummy.
        """
        return self.reader.dummy_inputs(device)

    def usable(
        self, pixel_values: torch.Tensor, vision_inputs: dict[str, Any], *, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`usable_images` for this tower's pixel layout (rows of packed patches belong to their image)."""
        rows = self.reader.rows_of(pixel_values)
        image_of_row = self.reader.image_of_row(pixel_values, vision_inputs)
        cleaned, usable = usable_images(
            rows, training=training, image_of_row=image_of_row, blank_value=self.reader.blank_value
        )
        return cleaned.reshape(pixel_values.shape), usable


def usable_images(
    pixel_values: torch.Tensor, *, training: bool, image_of_row: torch.Tensor | None = None, blank_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixel_values, usable): images holding NaN or inf stop a training step with an error (their gradients
    would be NaN everywhere); otherwise they are zeroed and `usable` (images,) marks them, so that the text
    after their markers sees no image and nothing else in the batch changes. `usable` is None when all are.
    `image_of_row` (rows,): the image each row of `pixel_values` belongs to (packed patches); None: a row is an
    image. A left-out image is filled with `blank_value`."""
    if pixel_values.device.type == "meta" or not pixel_values.is_floating_point():
        return pixel_values, None
    finite_rows = torch.isfinite(pixel_values.flatten(1)).all(dim=1)  # (rows,)
    if bool(finite_rows.all()):
        return pixel_values, None
    usable = finite_rows
    if image_of_row is not None:  # an image is usable when all of its rows are
        usable = torch.ones(int(image_of_row.max()) + 1, dtype=torch.bool, device=pixel_values.device)
        usable[image_of_row[~finite_rows]] = False  # (images,)
    bad = (~usable).nonzero().flatten().tolist()
    message = (
        f"pixel_values of image(s) {bad} (of {len(usable)} in the batch) hold NaN or inf; check those images and "
        "the image processor (a std of 0 divides by zero)"
    )
    if training and torch.is_grad_enabled():
        raise ValueError(f"{message}. Training stops here: one such image makes every gradient NaN.")
    logger.warning("%s; they are left out: the text after their markers sees no image", message)
    keep_rows = usable if image_of_row is None else usable[image_of_row]  # (rows,)
    keep = keep_rows.view(-1, *([1] * (pixel_values.ndim - 1)))  # (rows, 1, ...) against (rows, ...)
    return torch.where(keep, pixel_values, pixel_values.new_full((), blank_value)), usable


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
    `vision.num_images(...)` images, from which column). Without images (`pixel_values` None, `slots` ignored) one
    blank image runs through every module and nobody sees it; images holding NaN or inf are seen by nobody
    (`usable_images`)."""
    if pixel_values is None:
        dummy = vision.dummy_inputs(device)
        levels, token_mask = vision.encode(**dummy)
        slots = no_images(batch_size, device)
    else:
        pixel_values, usable = vision.usable(pixel_values, vision_inputs, training=training)
        levels, token_mask = vision.encode(pixel_values, **vision_inputs)
        if slots is None:
            raise ValueError("images were given without their slots (which sample sees which image)")
        slots = slots.without(usable)
    return HiveVisionContext.from_images(
        levels, token_mask, slots, prompt_length=prompt_length, media_attention=media_attention
    )
