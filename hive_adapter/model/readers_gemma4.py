"""The reader of Gemma 4's vision encoder: patchified pixels with their positions.

Gemma 4's image processor patchifies each image itself: `pixel_values` (images, most patches, 3*p*p) and
`image_position_ids` (images, most patches, 2), each patch's (x, y) column and row on its image's patch grid,
(-1, -1) for padding patches. Images keep their aspect ratio, so each has its own grid.

This reader runs the encoder once and reads the chosen layers' outputs with forward hooks (the encoder's
`hidden_states` end with its pooled output instead of its last layer's; its pooler and the projection belong to
the family's connector and are not HIVE's keys), puts each image's real patches onto its row-major grid by their positions,
and hands HIVE one grid per image (padded to the longest, with a mask), pooled on each image's own grid.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .architectures import VisionShape
from .reader_base import ReadImages, VisionReader, register_reader

POSITIONS_INPUT = "image_position_ids"


@register_reader
class PositionedPatchReader(VisionReader):
    """Gemma 4: `pixel_values` (images, patches, 3*p*p) + `image_position_ids` (images, patches, 2), (x, y)."""

    name = "gemma4-positioned-patches"
    input_names = (POSITIONS_INPUT,)

    @classmethod
    def accepts(cls, tower: nn.Module, family_config: Any = None) -> bool:
        return "pixel_position_ids" in inspect.signature(tower.forward).parameters

    @classmethod
    def shape_of(cls, config: Any) -> VisionShape:
        return VisionShape(config.num_hidden_layers, config.hidden_size, config.patch_size, image_size=0)

    def _positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.required_input(
            inputs,
            POSITIONS_INPUT,
            "(images, patches, 2), each patch's column and row, as the family's image processor returns them; "
            "pass it too",
        )

    def check(self, pixel_values: torch.Tensor, inputs: dict[str, Any]) -> None:
        positions = self._positions(inputs)
        width = getattr(self.config, "num_channels", 3) * self.shape.patch_size**2
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != width:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: a {type(self.tower).__name__} takes patchified "
                f"pixels (images, patches, {width}), as the family's image processor returns them"
            )
        if tuple(positions.shape) != (*pixel_values.shape[:2], 2):
            raise ValueError(
                f"{POSITIONS_INPUT} of shape {tuple(positions.shape)} for pixel_values of shape "
                f"{tuple(pixel_values.shape)}: expected (images, patches, 2)"
            )

    def read(self, pixel_values: torch.Tensor, inputs: dict[str, Any], layers: tuple[int, ...]) -> ReadImages:
        positions = self._positions(inputs).to(pixel_values.device)
        # The encoder's own `hidden_states` end with its pooled output, not its last layer's: hooks on the chosen
        # layers read what each returns.
        captured: dict[int, torch.Tensor] = {}
        blocks = self.tower.encoder.layers
        handles = [
            blocks[index].register_forward_hook(
                lambda module, args, output, index=index: captured.__setitem__(
                    index, output[0] if isinstance(output, tuple) else output
                )
            )
            for index in layers
        ]
        try:
            self.tower(pixel_values=pixel_values, pixel_position_ids=positions)
        finally:
            for handle in handles:
                handle.remove()
        real = (positions != -1).all(dim=-1)  # (images, patches)
        columns = positions[..., 0].amax(dim=1) + 1  # (images,)
        rows = positions[..., 1].amax(dim=1) + 1
        grids = [(int(r), int(c)) for r, c in zip(rows.tolist(), columns.tolist(), strict=True)]
        # Where each patch goes on its image's row-major grid; padding patches after the grid (masked out).
        slot = positions[..., 1] * columns[:, None] + positions[..., 0]  # (images, patches)
        slot = torch.where(real, slot, real.shape[1] - 1 - torch.arange(real.shape[1], device=slot.device).flip(0))
        lengths = torch.tensor([r * c for r, c in grids], device=slot.device)
        if bool((lengths != real.sum(dim=1)).any()):
            raise ValueError(
                f"{POSITIONS_INPUT} place {real.sum(dim=1).tolist()} real patches on grids {grids}: each image's "
                "patches must fill its grid exactly once"
            )
        order = torch.argsort(slot, dim=1)  # (images, patches): the patch at each grid slot
        states = []
        for index in layers:
            level = captured[index]  # (images, patches, width)
            states.append(torch.gather(level, 1, order[..., None].expand_as(level)))
        mask = torch.arange(real.shape[1], device=slot.device) < lengths[:, None]  # (images, patches)
        if len(set(grids)) == 1 and bool(mask.all()):
            return ReadImages(states, [grids[0]])
        return ReadImages(states, grids, mask)

    def dummy_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        width = getattr(self.config, "num_channels", 3) * self.shape.patch_size**2
        side = self.config.pooling_kernel_size
        y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        return {
            "pixel_values": torch.zeros(1, side * side, width, device=device),
            POSITIONS_INPUT: torch.stack([x.flatten(), y.flatten()], dim=-1)[None].to(device),
        }
